"""Inputs of the benchmarks, generated and cached under a data folder (default /tmp/mqengine-bench).

- `small_images`: N small PNGs (64x64, 1-3 flat-coloured boxes each) + a COCO file; image i is the
  same whatever N, so the 1k/10k/100k sets share one image folder and differ only in the annotation
  file. Written in parallel processes.
- `scenes`: generated scenes with real-looking objects (pipelines.scenes) for the maskers.
- `random_masks`: distinct polygon masks as RLE, to make large object tables.
- `object_shards`: an output folder of >= 1M object rows (schemas' tables, realistic columns) made
  directly with pyarrow, plus the COCO JSON of the same objects (`write_coco_json`).
The Objects365-style annotation file comes from `pipelines.sources.fixtures`.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq

from pipelines.shards import part_name
from schemas import FILTERED, KEPT, table_from_rows, validate

SMALL_CATEGORIES = ["red box", "green box", "blue box", "yellow disc", "white disc"]
_SMALL_COLOURS = [(220, 30, 30), (30, 180, 40), (30, 60, 220), (230, 220, 40), (245, 245, 245)]
CHUNK = 1000  # images per sub-folder and per generation task


# --- small images ---------------------------------------------------------------------------------


def _small_image(seed: int, index: int, size: int) -> tuple[np.ndarray, list[dict]]:
    """Image `index` (size x size RGB, smooth background) and its 1-3 objects (xywh, category)."""
    rng = np.random.default_rng([seed, index])
    base = rng.integers(40, 200, size=3)
    ramp = np.linspace(0, 30, size, dtype=np.float32)[None, :, None]
    img = np.clip(base[None, None, :] + ramp, 0, 255).astype(np.uint8).repeat(size, axis=0)
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        cat = int(rng.integers(len(SMALL_CATEGORIES)))
        w, h = (int(v) for v in rng.integers(8, size // 2, size=2))
        x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        colour = _SMALL_COLOURS[cat]
        if cat >= 3:
            cv2.ellipse(img, (x + w // 2, y + h // 2), (w // 2, h // 2), 0, 0, 360, colour, -1)
        else:
            img[y:y + h, x:x + w] = colour
        objects.append({"bbox": [x, y, w, h], "category_id": cat + 1})
    return img, objects


def _small_file(index: int) -> str:
    return f"images/{index // CHUNK:04d}/img_{index:07d}.png"


def _write_small_chunk(root: str, seed: int, size: int, start: int, stop: int) -> list[list[dict]]:
    cv2.setNumThreads(1)
    out = []
    for i in range(start, stop):
        img, objects = _small_image(seed, i, size)
        path = Path(root) / _small_file(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        if not ok:
            raise OSError(f"could not encode {path}")
        path.write_bytes(buf.tobytes())
        out.append(objects)
    return out


def small_images(data_dir: Path, n: int, seed: int = 0, size: int = 64,
                 procs: int | None = None) -> Path:
    """COCO annotation file of the first `n` small images (written, with the images, if missing)."""
    root = Path(data_dir) / f"small-{size}px-s{seed}"
    ann_path = root / f"annotations-{n}.json"
    if ann_path.is_file():
        return ann_path
    root.mkdir(parents=True, exist_ok=True)
    meta_path = root / "objects.jsonl"  # objects of every image written so far, one line each
    known = meta_path.read_text().splitlines() if meta_path.is_file() else []
    if len(known) < n:
        starts = range(len(known), n, CHUNK)
        with ProcessPoolExecutor(procs or os.cpu_count() or 1) as pool:
            futures = [pool.submit(_write_small_chunk, str(root), seed, size, s, min(s + CHUNK, n))
                       for s in starts]
            with open(meta_path, "a") as f:
                for fut in futures:  # in order, so line i is image i
                    f.writelines(json.dumps(objs) + "\n" for objs in fut.result())
        known = meta_path.read_text().splitlines()
    images, anns = [], []
    for i in range(n):
        images.append({"id": i + 1, "file_name": _small_file(i), "width": size, "height": size})
        for obj in json.loads(known[i]):
            x, y, w, h = obj["bbox"]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": obj["category_id"],
                         "bbox": obj["bbox"], "area": w * h, "iscrowd": 0})
    cats = [{"id": k + 1, "name": name} for k, name in enumerate(SMALL_CATEGORIES)]
    tmp = ann_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    os.replace(tmp, ann_path)
    return ann_path


# --- scenes ---------------------------------------------------------------------------------------


def scenes(data_dir: Path, n: int, seed: int = 0) -> Path:
    """The boxes-only COCO file of `n` generated 320x240 scenes (pipelines.scenes)."""
    from pipelines.scenes import write_scenes

    root = Path(data_dir) / f"scenes-{n}-s{seed}"
    done = root / "done"
    if not done.is_file():
        boxes_json, _ = write_scenes(root, n, seed=seed)
        done.write_text(str(boxes_json.name))
    return root / "scenes.json"


# --- large object tables --------------------------------------------------------------------


def random_masks(rng: np.random.Generator, n: int, height: int = 480,
                 width: int = 640) -> list[dict]:
    """n distinct masks {counts, height, width, area, bbox}: random 16-vertex star-shaped polygons
    (as COCO's polygon annotations), 10-200 px across, rasterised to RLE by pycocotools.

    Every mask is different, as in real data: a small pool of repeated masks would let Parquet's
    dictionary encoding store each RLE once and flatter its size.
    """
    from pycocotools import mask as mask_utils

    k = 16
    angles = np.sort(rng.uniform(0, 2 * np.pi, (n, k)), axis=1)
    radius = rng.uniform(0.6, 1.0, (n, k))
    sx, sy = rng.uniform(5, 100, (n, 1)), rng.uniform(5, 80, (n, 1))
    cx, cy = rng.uniform(0, width, (n, 1)), rng.uniform(0, height, (n, 1))
    xs = np.clip(cx + sx * radius * np.cos(angles), 0, width - 1)
    ys = np.clip(cy + sy * radius * np.sin(angles), 0, height - 1)
    polygons = np.stack([xs, ys], -1).reshape(n, -1)
    rles = mask_utils.frPyObjects([p.tolist() for p in polygons], height, width)
    out = []
    for i in range(0, n, 200):  # pycocotools 2.0.11 + numpy 2 overflow on batches over 255
        chunk = rles[i:i + 200]
        areas, boxes = mask_utils.area(chunk), mask_utils.toBbox(chunk)
        for r, area, box in zip(chunk, areas, boxes, strict=True):
            out.append({"counts": r["counts"].decode("ascii"), "height": height, "width": width,
                        "area": int(area), "bbox": [float(v) for v in box]})
    return out


def category_names(n: int = 365) -> list[str]:
    return [f"category {k:03d}" for k in range(n)]


_COLOUR_WORDS = ["red", "green", "blue", "white", "black", "grey", "brown", "yellow"]
_PLACES = ["on the left", "on the right", "in the middle", "at the top", "at the bottom"]


def _object_rows(rng: np.random.Generator, names: list[str], first_image: int,
                 n_images: int, run_id: str) -> tuple[list[dict], list[dict]]:
    """Rows of the images and objects tables for images first_image.. (1-13 objects each)."""
    weights = 1.0 / np.arange(1, len(names) + 1)  # Zipf-like, as real category counts are
    weights /= weights.sum()
    per_image = rng.integers(1, 14, size=n_images)
    masks = iter(random_masks(rng, int(per_image.sum())))
    images, objects = [], []
    for image_no, k in zip(range(first_image, first_image + n_images), per_image, strict=True):
        image_id = f"bench:train:{image_no}"
        k = int(k)
        images.append({"image_id": image_id, "source": "bench", "split": "train",
                       "source_image_id": str(image_no), "file_path": f"images/{image_no:08d}.jpg",
                       "width": 640, "height": 480, "sha256": f"{image_no:064x}", "status": "ok",
                       "error": None, "num_objects": k, "run_id": run_id})
        cats = rng.choice(len(names), size=k, p=weights)
        box_iou = np.clip(rng.beta(6, 1.5, size=k), 0, 1)
        box_fill = np.clip(rng.beta(5, 2, size=k), 0, 1)
        for j in range(k):
            m = next(masks)
            x, y, w, h = m["bbox"]
            keep = bool(box_iou[j] >= 0.5 and box_fill[j] >= 0.05)
            cat = names[int(cats[j])]
            colour = _COLOUR_WORDS[int(rng.integers(len(_COLOUR_WORDS)))]
            place = _PLACES[int(rng.integers(len(_PLACES)))]
            caps = [f"a {cat}", f"a {colour} {cat}", f"a {cat} {place}",
                    f"the {colour} {cat} {place}"]
            objects.append({
                "object_id": f"{image_id}:{j}", "image_id": image_id, "source_ann_id": str(j),
                "category": cat, "source_category_id": int(cats[j]) + 1,
                "source_category_name": cat, "box": [x, y, w, h],
                "box_raw": [x - 0.25, y - 0.25, w + 0.5, h + 0.5], "iscrowd": False,
                "attributes": '{"isfake": 0, "isreflected": 0}',
                "mask": {"counts": m["counts"], "height": m["height"], "width": m["width"]},
                "mask_origin": "grabcut", "gt_mask": None, "mask_area": m["area"],
                "mask_box": [x, y, w, h], "pred_iou": None, "stability": None,
                "box_iou": float(box_iou[j]), "box_fill": float(box_fill[j]),
                "n_components": int(rng.integers(1, 3)),
                "status": KEPT if keep else FILTERED, "keep": keep,
                "reject_code": None if keep else (
                    "low_box_iou" if box_iou[j] < 0.5 else "low_box_fill"),
                "reject_reason": None if keep else "box_iou below 0.5 or box_fill below 0.05",
                "captions": [{"text": t, "provenance": "template", "score": None} for t in caps],
                "run_id": run_id,
            })
    return images, objects


def object_shards(data_dir: Path, n_objects: int, images_per_shard: int = 8192,
                  seed: int = 0) -> tuple[Path, dict]:
    """An output folder (images/, objects/ part files) of about `n_objects` objects (>= n_objects,
    whole images), and the COCO JSON of the same objects. Returns (folder, counts)."""
    out = Path(data_dir) / f"objects-v2-{n_objects}-s{seed}"
    counts_path = out / "counts.json"
    if counts_path.is_file():
        return out, json.loads(counts_path.read_text())
    rng = np.random.default_rng(seed)
    names = category_names()
    n_obj = n_img = shard = 0
    while n_obj < n_objects:
        images, objects = _object_rows(rng, names, n_img, images_per_shard, "bench0000000")
        for name, rows in (("images", images), ("objects", objects)):
            table = table_from_rows(name, rows)
            validate(table, name)
            (out / name).mkdir(parents=True, exist_ok=True)
            pq.write_table(table, out / name / part_name(shard), compression="zstd",
                           row_group_size=64 * 1024)
        n_obj, n_img, shard = n_obj + len(objects), n_img + len(images), shard + 1
    counts = {"objects": n_obj, "images": n_img, "shards": shard}
    write_coco_json(out, out / "coco.json")
    counts_path.write_text(json.dumps(counts))
    return out, counts


# --- COCO JSON of shard rows ---------------------------------------------------------------------

# Columns carried into the COCO JSON as extra annotation keys, so both files hold the same facts.
EXTRA_KEYS = ("object_id", "source_ann_id", "box_raw", "attributes", "mask_origin", "mask_box",
              "pred_iou", "stability", "box_iou", "box_fill", "n_components", "status", "keep",
              "reject_code", "reject_reason", "captions", "run_id")


def write_coco_json(out: Path, path: Path) -> dict:
    """COCO JSON (images, annotations with RLE `segmentation` as strings, categories, plus the
    shard's other columns as extra keys) of output folder `out`, streamed shard by shard.

    Image and category ids are renumbered 1..N (COCO needs integers); `image_key` and the category
    text keep the engine's values. Returns {"images", "annotations", "bytes"}.
    """
    image_ids: dict[str, int] = {}
    cat_ids: dict[str, int] = {}
    n_ann = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write('{"info": {"description": "COCO export of mqengine shards"}, "images": [')
        first = True
        for part in sorted((out / "images").glob("part-*.parquet")):
            for r in pq.read_table(part).to_pylist():
                image_ids[r["image_id"]] = len(image_ids) + 1
                image = {"id": image_ids[r["image_id"]], "file_name": r["file_path"],
                         "width": r["width"], "height": r["height"], "image_key": r["image_id"],
                         "sha256": r["sha256"], "status": r["status"]}
                f.write(("" if first else ",") + json.dumps(image))
                first = False
        f.write('], "annotations": [')
        first = True
        for part in sorted((out / "objects").glob("part-*.parquet")):
            for r in pq.read_table(part).to_pylist():
                cid = cat_ids.setdefault(r["category"], len(cat_ids) + 1)
                ann = {"id": n_ann + 1, "image_id": image_ids[r["image_id"]], "category_id": cid,
                       "bbox": r["box"], "area": r["mask_area"], "iscrowd": int(r["iscrowd"])}
                if r["mask"] is not None:
                    m = r["mask"]
                    ann["segmentation"] = {"size": [m["height"], m["width"]], "counts": m["counts"]}
                ann.update({k: r[k] for k in EXTRA_KEYS})
                f.write(("" if first else ",") + json.dumps(ann))
                first = False
                n_ann += 1
        cats = [{"id": i, "name": name} for name, i in cat_ids.items()]
        f.write('], "categories": ' + json.dumps(cats) + "}")
    os.replace(tmp, path)
    return {"images": len(image_ids), "annotations": n_ann, "bytes": path.stat().st_size}


def arrow_rows(out: Path, table: str) -> int:
    """Rows of every part file of `table` in a folder `object_shards` wrote (it has no manifest;
    for an engine run count what schemas.runs.open_run lists instead)."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in (out / table).glob("part-*.parquet"))

