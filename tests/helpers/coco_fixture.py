"""A tiny COCO-format detection dataset written by tests: real PNG files with coloured rectangles
on a noisy background, boxes that fit them, and optional bad records."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}


def write_coco(
    root: Path,
    n_images: int = 6,
    objects_per_image: int = 3,
    seed: int = 0,
    size: tuple[int, int] = (96, 128),
    bad: bool = False,
) -> Path:
    """Write images under root/images and root/annotations.json; return the annotation path.

    With bad=True it adds one of each: a missing image, a corrupt image, a path escaping the root,
    a NaN box, a zero-size box, a box outside the image, an unknown category id.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    (root / "images").mkdir(parents=True, exist_ok=True)
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(COLOURS)]
    images, anns = [], []
    for i in range(n_images):
        img = rng.integers(90, 140, size=(h, w, 3), dtype=np.uint8)
        for j in range(objects_per_image):
            cat = cats[(i + j) % len(cats)]
            bw, bh = int(rng.integers(14, 30)), int(rng.integers(14, 30))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            img[y : y + bh, x : x + bw] = COLOURS[cat["name"]]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": cat["id"],
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
        name = f"images/img_{i:03d}.png"
        cv2.imwrite(str(root / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
    if bad:
        _add_bad_records(root, images, anns, w, h)
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def _add_bad_records(root: Path, images: list, anns: list, w: int, h: int) -> None:
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    extra = [("images/missing.png", 901), ("images/corrupt.png", 902), ("../escape.png", 903)]
    for name, image_id in extra:
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        anns.append(
            {
                "id": 9000 + image_id,
                "image_id": image_id,
                "category_id": 1,
                "bbox": [1, 1, 10, 10],
                "area": 100,
                "iscrowd": 0,
            }
        )
    first = images[0]["id"]
    for k, bbox in enumerate([[None, 2, 5, 5], [3, 3, 0, 7], [w + 50, h + 50, 10, 10]]):
        anns.append(
            {
                "id": 8000 + k,
                "image_id": first,
                "category_id": 1,
                "bbox": bbox,
                "area": 1,
                "iscrowd": 0,
            }
        )
    anns.append(
        {
            "id": 8100,
            "image_id": first,
            "category_id": 77,
            "bbox": [2, 2, 9, 9],
            "area": 81,
            "iscrowd": 0,
        }
    )
