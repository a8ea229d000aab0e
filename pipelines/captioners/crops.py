"""Context-padded crops: what an image captioner sees of one object.

A tight crop loses the context that names an object ("a dog on a sofa"), a whole image loses the
object; the box grown by a margin of its own size on every side is the usual compromise.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_MARGIN = 0.15


def context_box(
    box: np.ndarray, width: int, height: int, margin: float = DEFAULT_MARGIN
) -> tuple[int, int, int, int]:
    """XYXY box in pixels -> integer pixel bounds (c0, r0, c1, r1) of the padded crop.

    Each side moves out by `margin` times the box's width (left/right) or height (top/bottom),
    then the crop is clipped to the image and rounded outwards; it is at least 1x1 pixel.
    """
    if margin < 0:
        raise ValueError(f"crop margin must be >= 0, got {margin}")
    x0, y0, x1, y1 = (float(v) for v in box)
    pad_x, pad_y = margin * (x1 - x0), margin * (y1 - y0)
    c0 = min(max(math.floor(x0 - pad_x), 0), width - 1)
    r0 = min(max(math.floor(y0 - pad_y), 0), height - 1)
    c1 = max(min(math.ceil(x1 + pad_x), width), c0 + 1)
    r1 = max(min(math.ceil(y1 + pad_y), height), r0 + 1)
    return c0, r0, c1, r1


def context_crops(
    image: np.ndarray, boxes: np.ndarray, margin: float = DEFAULT_MARGIN
) -> list[np.ndarray]:
    """(H, W, 3) image and (N, 4) XYXY boxes -> N (h_i, w_i, 3) crops (views, not copies)."""
    height, width = image.shape[:2]
    crops = []
    for box in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        c0, r0, c1, r1 = context_box(box, width, height, margin)
        crops.append(image[r0:r1, c0:c1])
    return crops
