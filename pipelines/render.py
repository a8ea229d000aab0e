"""Draw one image's objects (mask overlay, box, first caption) into a PNG, for eyeballing a run."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipelines.images import load_image
from schemas import masks as rle

# Distinct colours (RGB); status colours make filtered/rejected objects stand out.
PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
]
STATUS_EDGE = {"kept": None, "filtered": (255, 140, 0), "rejected": (255, 0, 0)}


def render(
    root: Path, file_path: str, objects: list[dict], dest: Path, alpha: float = 0.45
) -> Path:
    """objects: rows with box, mask, category, status, captions. Writes `dest` and returns it."""
    loaded = load_image(root, file_path, None, None)
    if loaded.pixels is None:
        raise FileNotFoundError(f"cannot show {file_path}: {loaded.error}")
    canvas = loaded.pixels.astype(np.float32)
    for k, obj in enumerate(objects):
        colour = np.array(PALETTE[k % len(PALETTE)], np.float32)
        if obj.get("mask"):
            m = rle.decode([obj["mask"]])[0].astype(bool)
            canvas[m] = (1 - alpha) * canvas[m] + alpha * colour
    out = canvas.clip(0, 255).astype(np.uint8)
    for k, obj in enumerate(objects):
        if not obj.get("box"):
            continue
        x, y, w, h = (int(round(v)) for v in obj["box"])
        edge = STATUS_EDGE.get(obj["status"]) or PALETTE[k % len(PALETTE)]
        cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), edge, 2)
        caps = obj.get("captions") or []
        label = caps[0]["text"] if caps else (obj.get("category") or "")
        if obj["status"] != "kept":
            label = f"[{obj['status']}] {label}"
        cv2.putText(
            out,
            label[:40],
            (x + 2, max(y - 4, 10)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.4,
            (255, 255, 255),
            1,
            cv2.LINE_AA,
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(dest), cv2.cvtColor(out, cv2.COLOR_RGB2BGR)):
        raise ValueError(f"cannot write {dest} (use a .png or .jpg name)")
    return dest
