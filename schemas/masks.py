"""Mask encoding of the contract: COCO compressed RLE through pycocotools, never a hand-written
codec.

A mask value in the tables is `{"counts": str, "height": int, "width": int}`; `counts` is
pycocotools' compressed RLE string (ASCII 48..111, column-major), so it round-trips with
`pycocotools.mask` as is.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def encode(masks: np.ndarray) -> list[dict]:
    """(N, H, W) bool/uint8 masks -> N mask values. One batched pycocotools call."""
    if masks.ndim != 3:
        raise ValueError(f"encode expects (N, H, W) masks, got shape {masks.shape}")
    n, h, w = masks.shape
    if n == 0:
        return []
    # pycocotools wants H x W x N in Fortran order; this transpose of a C-ordered (N,H,W) is
    # exactly that.
    fortran = np.asfortranarray(masks.astype(np.uint8, copy=False).transpose(1, 2, 0))
    rles = mask_utils.encode(fortran)
    return [{"counts": r["counts"].decode("ascii"), "height": h, "width": w} for r in rles]


def to_rle(value: dict) -> dict:
    """A mask value -> the pycocotools RLE dict ({'size': [h, w], 'counts': bytes})."""
    return {"size": [int(value["height"]), int(value["width"])], "counts": value["counts"].encode()}


def from_rle(rle: dict) -> dict:
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE (COCO iscrowd annotations)
        rle = mask_utils.frPyObjects(rle, *rle["size"])
        counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"counts": counts, "height": int(rle["size"][0]), "width": int(rle["size"][1])}


def decode(values: list[dict]) -> np.ndarray:
    """N mask values of one size -> (N, H, W) uint8."""
    if not values:
        raise ValueError("decode needs at least one mask")
    stacked = mask_utils.decode([to_rle(v) for v in values])
    return np.ascontiguousarray(stacked.transpose(2, 0, 1))


# pycocotools 2.0.11's `area` overflows (uint8 count) with more than 255 masks per call under
# numpy 2, so it is called in chunks.
_AREA_CHUNK = 255


def area(values: list[dict]) -> np.ndarray:
    rles = [to_rle(v) for v in values]
    chunks = [mask_utils.area(rles[i : i + _AREA_CHUNK]) for i in range(0, len(rles), _AREA_CHUNK)]
    return np.concatenate(chunks).astype(np.int64) if chunks else np.zeros(0, np.int64)


def tight_box(values: list[dict]) -> np.ndarray:
    """(N, 4) xywh tight boxes of the masks (pycocotools toBbox; zeros for an empty mask)."""
    return mask_utils.toBbox([to_rle(v) for v in values]).astype(np.float64)


def from_polygons(polygons: list[list[float]], height: int, width: int) -> dict:
    """COCO polygon segmentation -> one mask value (rasterised once, merged)."""
    rles = mask_utils.frPyObjects(polygons, height, width)
    return from_rle(mask_utils.merge(rles))


def from_segmentation(segmentation, height: int, width: int) -> dict:
    """Any COCO `segmentation` (polygon list, RLE or uncompressed RLE) -> one mask value."""
    if isinstance(segmentation, list):
        return from_polygons(segmentation, height, width)
    if isinstance(segmentation, dict) and "counts" in segmentation:
        return from_rle(segmentation)
    raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")
