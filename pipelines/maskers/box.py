"""The baseline masker: the filled box. Every mask benchmark compares against it."""

from __future__ import annotations

import numpy as np

from pipelines.maskers import MaskOutput
from pipelines.masksets import CropMasks


def box_pixels(height: int, width: int, box) -> tuple[int, int, int, int]:
    """XYXY box -> (r0, r1, c0, c1) of the pixels it covers, clipped to the image.

    A pixel (col c, row r) is inside when its centre (c + 0.5, r + 0.5) lies in the box, so a box
    with integer corners fills exactly w x h pixels.
    """
    x0, y0, x1, y1 = box
    c0, r0 = int(np.floor(x0 + 0.5)), int(np.floor(y0 + 0.5))
    c1, r1 = int(np.floor(x1 + 0.5)), int(np.floor(y1 + 0.5))
    r0, c0 = min(max(r0, 0), height), min(max(c0, 0), width)
    return r0, max(r0, min(r1, height)), c0, max(c0, min(c1, width))


def box_masks(height: int, width: int, boxes: np.ndarray) -> np.ndarray:
    """(N, 4) XYXY boxes -> (N, H, W) bool masks covering each box's pixels (`box_pixels`)."""
    masks = np.zeros((len(boxes), height, width), dtype=bool)
    for mask, box in zip(masks, boxes, strict=True):
        r0, r1, c0, c1 = box_pixels(height, width, box)
        mask[r0:r1, c0:c1] = True
    return masks


class BoxMasker:
    origin = "box"

    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> MaskOutput:
        height, width = image.shape[:2]
        crops = []
        for box in boxes:
            r0, r1, c0, c1 = box_pixels(height, width, box)
            crops.append((r0, c0, np.ones((r1 - r0, c1 - c0), bool)))
        return MaskOutput.unscored(CropMasks(height, width, crops))
