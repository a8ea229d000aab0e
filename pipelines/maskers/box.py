"""The baseline masker: the filled box. Every mask benchmark compares against it."""

from __future__ import annotations

import numpy as np

from pipelines.maskers import MaskOutput


def box_masks(height: int, width: int, boxes: np.ndarray) -> np.ndarray:
    """(N, 4) XYXY boxes -> (N, H, W) bool masks covering each box's pixels.

    A pixel (col c, row r) is inside when its centre (c + 0.5, r + 0.5) lies in the box, so a box
    with integer corners fills exactly w x h pixels.
    """
    masks = np.zeros((len(boxes), height, width), dtype=bool)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes, strict=True):
        c0, r0 = int(np.floor(x0 + 0.5)), int(np.floor(y0 + 0.5))
        c1, r1 = int(np.floor(x1 + 0.5)), int(np.floor(y1 + 0.5))
        mask[max(r0, 0) : min(r1, height), max(c0, 0) : min(c1, width)] = True
    return masks


class BoxMasker:
    origin = "box"

    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> MaskOutput:
        return MaskOutput.unscored(box_masks(image.shape[0], image.shape[1], boxes))
