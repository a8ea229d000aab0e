"""Export in the Ultralytics YOLO segmentation layout:

    DEST/data.yaml                      path, one key per split, names (class id -> category)
    DEST/images/<split>/<name>.<ext>    the image files, copied
    DEST/labels/<split>/<name>.txt      one line per object: `class x1 y1 x2 y2 ...`, coordinates
                                        normalised by the image width / height

Polygons come from the masks with OpenCV contours (cv2.findContours, outer boundaries, lossless
CHAIN_APPROX_SIMPLE). YOLO has one polygon per object, so a mask of several pieces becomes one
polygon that visits them in turn through zero-width bridges (what Ultralytics' own converter,
`merge_multi_segment`, does); holes are not representable and are filled. Class ids number the
selected categories in sorted order. Ultralytics needs `train` and `val` keys: a split the run does
not have points at the run's first split, and data.yaml says so in a comment.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import yaml

from pipelines.export_select import (
    categories,
    copy_file,
    image_path,
    iter_images,
    open_selection,
    safe_name,
    staging,
    write_receipt,
)
from schemas import masks as rle
from schemas.runs import Run


def export_yolo_seg(run: Run, dest: Path, where: str | None = None) -> dict:
    """Write the selected objects (default: kept) of `run` into folder `dest`; returns counts."""
    con = open_selection(run, where)
    with staging(dest) as tmp:
        counts, splits, names = _write(run, con, tmp)
        _write_data_yaml(tmp, dest, splits, names, run, where)
        write_receipt(tmp, "yolo-seg", run, where, counts)
    return counts


def _write(run: Run, con, dest: Path) -> tuple[dict, list[str], list[str]]:
    names = categories(con)
    class_ids = {name: k for k, name in enumerate(names)}
    counts = {"images": 0, "objects": 0, "skipped_no_mask": 0, "skipped_no_category": 0,
              "categories": len(names)}
    splits: list[str] = []
    for image, objects in iter_images(con):
        lines = []
        for obj in objects:
            if obj["mask"] is None:
                counts["skipped_no_mask"] += 1
            elif obj["category"] is None:
                counts["skipped_no_category"] += 1
            else:
                polygon = mask_polygon(rle.decode([obj["mask"]])[0])
                if polygon is None:
                    counts["skipped_no_mask"] += 1
                    continue
                lines.append(_label_line(class_ids[obj["category"]], polygon, image))
        if not lines:
            continue
        split = image["split"] or "train"
        if split not in splits:
            splits.append(split)
            (dest / "images" / split).mkdir(parents=True, exist_ok=True)
            (dest / "labels" / split).mkdir(parents=True, exist_ok=True)
        name = safe_name(image["image_id"], image["file_path"])
        copy_file(image_path(run, image), dest / "images" / split / name)
        _write_text(dest / "labels" / split / (Path(name).stem + ".txt"), "\n".join(lines) + "\n")
        counts["images"] += 1
        counts["objects"] += len(lines)
    return counts, splits, names


def mask_polygon(mask: np.ndarray) -> np.ndarray | None:
    """(H, W) uint8 mask -> one (K, 2) polygon in pixel coordinates (outer boundaries of all its
    pieces, bridged), or None for an empty mask."""
    # RETR_CCOMP: outer boundaries and the boundaries of their holes; bridged into one polygon,
    # a hole is cut out (its boundary runs the other way round)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP,
                                   cv2.CHAIN_APPROX_SIMPLE)
    pieces = [c.reshape(-1, 2) for c in contours if len(c) >= 1]
    if not pieces:
        return None
    pieces.sort(key=lambda p: -cv2.contourArea(p.astype(np.float32)))
    return _bridge(pieces)


def _bridge(pieces: list[np.ndarray]) -> np.ndarray:
    """Join polygons into one: from the current path, jump to the nearest point of the next piece,
    go round it, and come back along the same segment (a zero-width bridge adds no area)."""
    path = pieces[0]
    for piece in pieces[1:]:
        d = ((path[:, None, :] - piece[None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(np.argmin(d), d.shape)
        loop = np.concatenate([piece[j:], piece[: j + 1]])
        path = np.concatenate([path[: i + 1], loop, path[i:]])
    return path


def _label_line(class_id: int, polygon: np.ndarray, image: dict) -> str:
    # contour points are pixel centres; +0.5 puts them on the pixel grid's corners' scale so a
    # rasterised polygon covers the mask's pixels symmetrically
    w, h = image["width"], image["height"]
    xy = (polygon.astype(np.float64) + 0.5) / np.array([w, h], np.float64)
    coords = " ".join(f"{v:.6f}" for v in np.clip(xy, 0, 1).reshape(-1))
    return f"{class_id} {coords}"


def _write_data_yaml(
    tmp: Path, dest: Path, splits: list[str], names: list[str], run: Run, where
) -> None:
    first = splits[0] if splits else "train"
    data = {"path": str(dest.resolve())}  # where the folder will be once renamed
    data.update({s: f"images/{s}" for s in splits})
    missing = [s for s in ("train", "val") if s not in data]
    for s in missing:
        data[s] = f"images/{first}"
    data["names"] = dict(enumerate(names))
    header = (f"# mqengine yolo-seg export of {run.dir} (run {run.run_id}), objects WHERE "
              f"{where or 'keep'}\n")
    if missing:
        header += f"# the run has no {' / '.join(missing)} split: pointing at '{first}'\n"
    _write_text(tmp / "data.yaml", header + yaml.safe_dump(data, sort_keys=False))


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
