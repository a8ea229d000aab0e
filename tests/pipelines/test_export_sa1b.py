"""`sa1b` export: one image + JSON pair per image in SA-1B's layout with the keys
segment-anything's automatic mask generator writes; read back with pycocotools."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipelines.export import EXPORTERS
from schemas.runs import open_run
from tests.helpers.runs import read_table, synthesize_photos

AMG_KEYS = {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score",
            "crop_box"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return synthesize_photos(tmp_path_factory.mktemp("sa1b"))


def test_sa1b_files_read_back_with_pycocotools(run_dir, tmp_path):
    dest = tmp_path / "sa1b"
    counts = EXPORTERS["sa1b"](open_run(run_dir), dest, None)
    objects = {o["object_id"]: o for o in read_table(run_dir, "objects")}
    by_hash = {i["sha256"]: i for i in read_table(run_dir, "images")}
    seen = set()
    files = sorted(p for p in dest.glob("*.json") if p.name != "export.json")
    assert len(files) == counts["images"] > 0
    for path in files:
        data = json.loads(path.read_text())
        info = data["image"]
        image_file = dest / info["file_name"]
        record = by_hash[hashlib.sha256(image_file.read_bytes()).hexdigest()]
        assert record["image_id"] == info["image_id"]
        assert (info["width"], info["height"]) == (record["width"], record["height"])
        for ann in data["annotations"]:
            assert AMG_KEYS <= set(ann)
            src = objects[ann["id"]]
            seg = ann["segmentation"]
            m = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()})
            truth = mask_utils.decode({"size": [src["mask"]["height"], src["mask"]["width"]],
                                       "counts": src["mask"]["counts"].encode()})
            assert np.array_equal(m, truth)
            assert ann["area"] == int(m.sum()) == src["mask_area"]
            ys, xs = np.nonzero(m)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                   ys.max() - ys.min() + 1]
            assert ann["crop_box"] == [0, 0, record["width"], record["height"]]
            assert ann["predicted_iou"] == src["pred_iou"]  # grabcut: none, so null
            assert ann["category"] == src["category"] and ann["box_prompt"] == src["box"]
            seen.add(ann["id"])
    assert seen == {k for k, o in objects.items() if o["keep"]}
    assert json.loads((dest / "export.json").read_text())["counts"] == counts


def test_an_image_missing_at_export_time_is_a_one_line_error(run_dir, tmp_path):
    run = open_run(run_dir, root=tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match=r"image coco:\S+: file 'photos/\S+' not found"):
        EXPORTERS["sa1b"](run, tmp_path / "out", None)
    assert list(tmp_path.iterdir()) == []  # no half-written export, no leftover temp folder


@pytest.mark.slow
def test_exports_stream_a_100k_object_run(tmp_path):
    """Every exporter reads through export_select.iter_images: over 100k objects it holds one
    batch at a time, not the run."""
    import tracemalloc

    from pipelines.export_select import iter_images, open_selection
    from tests.helpers.runs import write_large_run

    run = open_run(write_large_run(tmp_path / "large", n_images=25_000, objects_per_image=4))
    tracemalloc.start()
    images = objects = 0
    for _, objs in iter_images(open_selection(run, "true")):
        images += 1
        objects += len(objs)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert (images, objects) == (25_000, 100_000)
    # fetchall() of the same rows peaks at 143 MB (measured): 20 MB proves batches
    assert peak < 20e6, f"peak Python allocation {peak / 1e6:.0f} MB"
