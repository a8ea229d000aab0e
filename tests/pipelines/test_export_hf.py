"""`hf` export: read back with datasets.load_from_disk; every mask decoded by pycocotools and
compared with the run's own mask, area and tight box; every image's bytes with its sha256."""

from __future__ import annotations

import hashlib
import json

import datasets
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipelines.export import EXPORTERS
from schemas.runs import open_run
from tests.helpers.runs import read_table, synthesize_photos


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return synthesize_photos(tmp_path_factory.mktemp("hf"))


def _decode(mask: dict) -> np.ndarray:
    return mask_utils.decode({"size": mask["size"], "counts": mask["counts"].encode()})


def test_hf_export_round_trips_through_datasets(run_dir, tmp_path):
    counts = EXPORTERS["hf"](open_run(run_dir), tmp_path / "hf", None)
    objects = {o["object_id"]: o for o in read_table(run_dir, "objects")}
    images = {i["image_id"]: i for i in read_table(run_dir, "images")}
    kept = {k for k, o in objects.items() if o["keep"]}
    loaded = datasets.load_from_disk(str(tmp_path / "hf"))
    assert isinstance(loaded, datasets.DatasetDict)
    split = {i["split"] for i in images.values()}
    assert set(loaded) == split
    ds = loaded[split.pop()]
    assert isinstance(ds.features["image"], datasets.Image)
    names = ds.features["objects"].feature["category_id"].names
    seen = set()
    for row in ds:
        record = images[row["image_id"]]
        assert row["image"].size == (record["width"], record["height"])
        for obj in row["objects"]:
            src = objects[obj["object_id"]]
            m = _decode(obj["mask"])
            assert m.shape == (record["height"], record["width"])
            expected = mask_utils.decode({"size": [src["mask"]["height"], src["mask"]["width"]],
                                          "counts": src["mask"]["counts"].encode()})
            assert np.array_equal(m, expected)
            assert int(m.sum()) == obj["area"] == src["mask_area"]
            ys, xs = np.nonzero(m)
            tight = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert tight == pytest.approx(src["mask_box"])
            assert obj["bbox"] == pytest.approx(src["box"])
            assert names[obj["category_id"]] == obj["category"] == src["category"]
            assert [c["text"] for c in obj["captions"]] == [c["text"] for c in src["captions"]]
            assert obj["box_iou"] == pytest.approx(src["box_iou"])
            seen.add(obj["object_id"])
    assert seen == kept  # kept only by default, every one of them
    assert counts["objects"] == len(kept) and counts["images"] == len(ds)
    receipt = json.loads((tmp_path / "hf" / "export.json").read_text())
    assert receipt["where"] == "keep" and receipt["counts"]["objects"] == len(kept)


def test_hf_image_bytes_are_the_source_files(run_dir, tmp_path):
    EXPORTERS["hf"](open_run(run_dir), tmp_path / "hf", None)
    images = {i["image_id"]: i for i in read_table(run_dir, "images")}
    ds = next(iter(datasets.load_from_disk(str(tmp_path / "hf")).values()))
    ds = ds.cast_column("image", datasets.Image(decode=False))
    for row in ds:
        digest = hashlib.sha256(row["image"]["bytes"]).hexdigest()
        assert digest == images[row["image_id"]]["sha256"]


def test_where_selects_other_objects(run_dir, tmp_path):
    where = "status = 'filtered'"
    counts = EXPORTERS["hf"](open_run(run_dir), tmp_path / "f", where)
    filtered = {o["object_id"] for o in read_table(run_dir, "objects") if o["status"] == "filtered"}
    ds = next(iter(datasets.load_from_disk(str(tmp_path / "f")).values()))
    assert {o["object_id"] for row in ds for o in row["objects"]} == filtered
    assert counts["objects"] == len(filtered) > 0
    assert json.loads((tmp_path / "f" / "export.json").read_text())["where"] == where


def test_bad_where_and_used_destination_are_one_line_errors(run_dir, tmp_path):
    with pytest.raises(ValueError, match="not a valid SQL condition"):
        EXPORTERS["hf"](open_run(run_dir), tmp_path / "x", "no_such_column > 1")
    assert not (tmp_path / "x").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("")
    with pytest.raises(ValueError, match="not an empty folder"):
        EXPORTERS["hf"](open_run(run_dir), tmp_path / "used", None)
