"""The `hf` source on tiny `datasets` datasets: save_to_disk folders and Parquet files."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, List, Sequence, Value
from PIL import Image as PILImage

from pipelines.sources import SourceConfig, open_source
from pipelines.sources.hf import HFSource, decide_bbox_format

NAMES = ["person", "bicycle", "car"]


def _png(seed: int, w: int = 40, h: int = 30) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _coco_like(n: int = 4) -> tuple[Dataset, list[dict]]:
    """The detection-datasets/coco layout: objects {bbox_id, category, bbox (xyxy), area}."""
    features = Features({
        "image_id": Value("int64"), "image": Image(), "width": Value("int64"),
        "height": Value("int64"),
        "objects": Sequence({"bbox_id": Value("int64"), "category": ClassLabel(names=NAMES),
                             "bbox": Sequence(Value("float32"), length=4),
                             "area": Value("float32")}),
    })
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        k = i % 3  # image 3 has no objects... image 0 too: k == 0
        x0 = rng.uniform(5, 20, k).round(2)
        y0 = rng.uniform(5, 15, k).round(2)
        boxes = [[x0[j], y0[j], x0[j] + 10 + j, y0[j] + 8] for j in range(k)]
        rows.append({"image_id": 500 + i, "image": {"bytes": _png(i), "path": None},
                     "width": 40, "height": 30,
                     "objects": {"bbox_id": [10 * i + j for j in range(k)],
                                 "category": [(i + j) % 3 for j in range(k)],
                                 "bbox": boxes, "area": [1.0] * k}})
    columns = {key: [r[key] for r in rows] for key in rows[0]}
    return Dataset.from_dict(columns, features=features), rows


def _check(src: HFSource, rows: list[dict]) -> None:
    records = list(src.records())
    assert [r.image_id for r in records] == [str(r["image_id"]) for r in rows]
    for record, row in zip(records, rows, strict=True):
        assert (record.width, record.height, record.error) == (40, 30, None)
        with PILImage.open(src.root / record.file) as im:  # what the pipeline will open
            np.testing.assert_array_equal(
                np.asarray(im), np.asarray(PILImage.open(io.BytesIO(row["image"]["bytes"]))))
        xyxy = np.array(row["objects"]["bbox"], np.float32).reshape(-1, 4)
        xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
        got = np.array([o.box_raw for o in record.objects]).reshape(-1, 4)
        np.testing.assert_allclose(got, xywh, rtol=1e-6)
        assert [o.category for o in record.objects] == [NAMES[c] for c in
                                                        row["objects"]["category"]]
        assert [o.ann_id for o in record.objects] == [str(b) for b in row["objects"]["bbox_id"]]


def test_save_to_disk_and_parquet_read_the_same_with_bytes_cached_once(tmp_path):
    ds, rows = _coco_like()
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train-00000-of-00001.parquet"))
    saved = open_source(SourceConfig(name="hf", root=tmp_path / "saved"))
    parquet = open_source(SourceConfig(name="hf", root=tmp_path / "pq", split="train"))
    for src in (saved, parquet):
        assert src.bbox_format == "xyxy" and src.class_names == NAMES  # auto-detected
        _check(src, rows)
    assert saved.root == saved.image_dir != tmp_path / "saved"  # nothing written into the dataset
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == sorted(
        ["data-00000-of-00001.arrow", "dataset_info.json", "state.json"])
    cached = sorted(saved.image_dir.iterdir())
    assert len(cached) == len(rows)
    mtimes = [p.stat().st_mtime_ns for p in cached]
    list(saved.records())  # a second pass reuses the cached files
    assert [p.stat().st_mtime_ns for p in cached] == mtimes


def test_list_of_structs_xywh_dataset_dict_and_bad_objects(tmp_path):
    features = Features({
        "image": Image(),
        "objects": List({"id": Value("int64"), "category": ClassLabel(names=NAMES),
                         "bbox": List(Value("float64")), "iscrowd": Value("bool")}),
    })
    objects = [
        [{"id": 1, "category": 2, "bbox": [30.0, 20.0, 5.0, 4.0], "iscrowd": False},
         {"id": 2, "category": 0, "bbox": [3.0, 2.0, 1.0], "iscrowd": True}],
        [{"id": 3, "category": 1, "bbox": [25.0, 12.0, 6.0, 6.0], "iscrowd": False}],
    ]
    data = {"image": [{"bytes": _png(7), "path": None}, {"bytes": _png(8), "path": None}],
            "objects": objects}
    DatasetDict({"validation": Dataset.from_dict(data, features=features)}).save_to_disk(
        str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="choose one of: validation"):
        HFSource(tmp_path / "dd", "train")
    src = HFSource(tmp_path / "dd", "validation")
    assert src.bbox_format == "xywh"  # 30+5 fits the 40-wide image, 5 < 30 is impossible as xyxy
    first, second = src.records()
    assert (first.image_id, first.width, first.height) == ("0", 40, 30)  # size from the header
    assert first.objects[0].box_raw == [30.0, 20.0, 5.0, 4.0] and first.objects[0].category == "car"
    assert first.objects[1].error.startswith("bbox is not 4 numbers") and first.objects[1].iscrowd
    assert second.objects[0].ann_id == "3"


def test_path_only_images_and_unknown_labels(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(_png(1))
    outside = tmp_path.parent / f"{tmp_path.name}_outside.png"
    outside.write_bytes(_png(2))
    features = Features({"image": Image(decode=False), "objects": {
        "category": List(Value("int64")), "bbox": List(List(Value("float32")))}})
    data = {"image": [{"bytes": None, "path": "imgs/a.png"},
                      {"bytes": None, "path": str(outside)}],
            "objects": [{"category": [7], "bbox": [[1, 1, 5, 5]]},
                        {"category": [], "bbox": []}]}
    # pyarrow directly: Dataset.to_parquet would embed the files and leave no path-only rows.
    pq.write_table(Dataset.from_dict(data, features=features).data.table, tmp_path / "one.parquet")
    src = HFSource(tmp_path / "one.parquet", bbox_format="xyxy")
    inside, escaped = src.records()
    assert inside.file == "imgs/a.png" and (src.root / inside.file).is_file()
    assert inside.objects[0].category == "7" and inside.objects[0].category_id == 7  # no names
    assert escaped.error_status == "unsafe_path" and "outside the dataset folder" in escaped.error


def test_bbox_format_detection_refuses_to_guess():
    assert decide_bbox_format([([10, 10, 4, 4], 50, 50)]) == "xywh"
    assert decide_bbox_format([([30, 30, 45, 40], 50, 50)]) == "xyxy"
    with pytest.raises(ValueError, match="cannot tell the bbox format"):
        decide_bbox_format([([1, 1, 5, 5], 50, 50)])
    with pytest.raises(ValueError, match="unknown bbox_format"):
        HFSource(__import__("pathlib").Path(__file__), bbox_format="cxcywh")
