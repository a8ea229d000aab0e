"""Runs for the report / export / card tests: a real `engine synthesize` run over a tiny COCO
dataset with bad records (so kept, filtered and rejected objects all occur), and a synthetic
large run written straight through pipelines.shards (no images, many objects)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq

from engine.cli import main
from tests.helpers.coco_fixture import write_coco

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "sources" / "demo_data"


def synthesize_demo_scenes(out: Path, limit: int) -> Path:
    """A finished `engine synthesize` run at `out` over the first `limit` bundled demo scenes with
    their ground-truth masks (COCO source, box masker, local executor)."""
    from pipelines.sources.demo import DEMO_DIR, scenes_gt_file

    assert main(["synthesize", "--source", "coco", "--root", str(DEMO_DIR), "--annotations",
                 str(scenes_gt_file()), "--out", str(out), "--executor", "local", "--masker",
                 "box", "--limit", str(limit)]) == 0
    return out


def synthesize_photos(root: Path, extra: list[str] | None = None) -> Path:
    """A finished run in root/run over the dataset in root/data: grabcut + template captions over
    the bundled demo photos as a COCO source, plus bad records (a missing image, a NaN box, an
    unknown category id), so images with only kept objects, with filtered ones and with rejected
    ones all occur."""
    data = root / "data"  # beside the run, never around it (the engine refuses that)
    shutil.copytree(DEMO / "photos", data / "photos")
    coco = json.loads((DEMO / "photos.json").read_text())
    coco["images"].append({"id": 901, "file_name": "photos/missing.jpg", "width": 64,
                           "height": 64})
    first = coco["images"][0]["id"]
    next_id = max(a["id"] for a in coco["annotations"]) + 1
    bad = [(901, 1, [1, 1, 10, 10]), (first, 1, [None, 2, 5, 5]), (first, 999, [2, 2, 30, 30])]
    for k, (image_id, category_id, bbox) in enumerate(bad):
        coco["annotations"].append({"id": next_id + k, "image_id": image_id, "iscrowd": 0,
                                    "category_id": category_id, "bbox": bbox, "area": 100})
    coco["categories"] = coco["categories"] or [{"id": 1, "name": "thing"}]
    ann = data / "annotations.json"
    ann.write_text(json.dumps(coco))
    out = root / "run"
    argv = ["synthesize", "--source", "coco", "--annotations", str(ann), "--root", str(data)]
    argv += ["--out", str(out), "--executor", "local", "--unit-size", "4", *(extra or [])]
    assert main(argv) == 0
    return out


def synthesize_coco(root: Path, n_images: int = 12, extra: list[str] | None = None) -> Path:
    """A finished run in root/run over write_coco(root/data, bad=True) (flat rectangles: GrabCut
    fails on most of them, so most objects are filtered)."""
    ann = write_coco(root / "data", n_images=n_images, objects_per_image=3, bad=True)
    out = root / "run"
    argv = ["synthesize", "--source", "coco", "--annotations", str(ann), "--root", str(ann.parent)]
    argv += ["--out", str(out), "--executor", "local", "--unit-size", "5", *(extra or [])]
    assert main(argv) == 0
    return out


def read_table(run_dir: Path, table: str) -> list[dict]:
    """Every row of `table`, read with pyarrow from the part files the unit log lists (an
    independent reader of the run, not DuckDB)."""
    from schemas.runs import open_run

    run = open_run(run_dir)
    rows: list[dict] = []
    for f in run.files(table):
        rows.extend(pq.read_table(f).to_pylist())
    return rows


def write_large_run(out: Path, n_images: int, objects_per_image: int, units: int = 4) -> Path:
    """A run of n_images * objects_per_image objects with random scores and all three statuses;
    every image row points at one small PNG (out/img.png), so readers that open images work."""
    from pipelines.shards import Manifest, write_unit
    from schemas import masks as rle
    from schemas import table_from_rows

    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out / "img.png"), rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    mask = rle.encode(np.pad(np.ones((1, 8, 8), np.uint8), ((0, 0), (4, 4), (4, 4))))[0]
    manifest = Manifest.create(out, {"run_id": "large", "source": {"name": "synthetic",
                                                                   "root": str(out)}})
    per_unit = n_images // units
    for u in range(units):
        images, objects = [], []
        for i in range(u * per_unit, (u + 1) * per_unit):
            image_id = f"synthetic:{i:07d}"
            images.append({"image_id": image_id, "source": "synthetic", "split": "all",
                           "source_image_id": str(i), "file_path": "img.png", "width": 16,
                           "height": 16, "status": "ok", "num_objects": objects_per_image,
                           "run_id": "large"})
            for j in range(objects_per_image):
                status = ("kept", "filtered", "rejected")[int(rng.integers(0, 3))]
                objects.append({
                    "object_id": f"{image_id}/{j}", "image_id": image_id,
                    "source_ann_id": str(j), "category": f"c{j % 7}", "box": [4.0, 4.0, 8, 8],
                    "iscrowd": False, "mask": mask, "mask_origin": "box",
                    "box_iou": float(rng.random()), "box_fill": float(rng.random()),
                    "n_components": int(rng.integers(1, 4)), "status": status,
                    "keep": status == "kept",
                    "reject_code": {"kept": None, "filtered": "low_box_iou",
                                    "rejected": "box_invalid"}[status],
                    "captions": [], "run_id": "large",
                })
        entry = write_unit(out, u, table_from_rows("images", images),
                           table_from_rows("objects", objects))
        manifest.record_unit(u, entry)
    manifest.save()
    return out
