"""Sets of masks of one image that never hold N full-resolution masks at once.

A full (N, H, W) bool array of an image's masks grows with the number of boxes: 5,000 boxes on a
640x480 image take 1.5 GB, and the stage used to hold several such copies (4.6 GB measured). The
masker -> quality -> captioner contract instead hands over a mask set: anything with `shape`
(N, H, W), `len()`, `[i]` (one full (H, W) bool mask, made on demand) and `region(i, rows, cols)`
(a window of mask i). Two kinds:
- `CropMasks`: masks that lie inside a rectangle each (GrabCut and the filled box never leave their
  box): memory is the sum of the rectangles' areas.
- `RleMasks`: masks already encoded as RLE (SAM's chunks, ground truth); a window decodes the mask
  once and keeps only its tight crop.
A plain (N, H, W) numpy array is a mask set too (`region` below accepts both), so small callers and
tests need no wrapper.
"""

from __future__ import annotations

import numpy as np

from schemas import masks as rle


class CropMasks:
    """N masks of an (height, width) image, mask i being zero outside the rectangle at (r0, c0)
    where its `crops[i]` (h, w) bool array lies."""

    def __init__(self, height: int, width: int, crops: list[tuple[int, int, np.ndarray]]):
        self.height, self.width = height, width
        self.crops = crops

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.crops), self.height, self.width)

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, i: int) -> np.ndarray:
        r0, c0, crop = self.crops[i]
        full = np.zeros((self.height, self.width), bool)
        full[r0 : r0 + crop.shape[0], c0 : c0 + crop.shape[1]] = crop
        return full

    def region(self, i: int, rows: slice, cols: slice) -> np.ndarray:
        """Mask i on rows x cols (both within the image), zeros outside its rectangle."""
        r0, c0, crop = self.crops[i]
        out = np.zeros((rows.stop - rows.start, cols.stop - cols.start), bool)
        a0, a1 = max(rows.start, r0), min(rows.stop, r0 + crop.shape[0])
        b0, b1 = max(cols.start, c0), min(cols.stop, c0 + crop.shape[1])
        if a0 < a1 and b0 < b1:
            out[a0 - rows.start : a1 - rows.start, b0 - cols.start : b1 - cols.start] = crop[
                a0 - r0 : a1 - r0, b0 - c0 : b1 - c0
            ]
        return out


class RleMasks:
    """N masks held as RLE values of the contract ({counts, height, width})."""

    def __init__(self, height: int, width: int, encoded: list[dict]):
        self.height, self.width = height, width
        self.encoded = encoded
        self._crops: dict[int, tuple[int, int, np.ndarray]] = {}

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.encoded), self.height, self.width)

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> np.ndarray:
        return rle.decode([self.encoded[i]])[0].astype(bool)

    def region(self, i: int, rows: slice, cols: slice) -> np.ndarray:
        if i not in self._crops:
            self._crops[i] = tight_crop(self[i])
        return CropMasks(self.height, self.width, [self._crops[i]]).region(0, rows, cols)


def tight_crop(mask: np.ndarray) -> tuple[int, int, np.ndarray]:
    """(r0, c0, crop) of the smallest rectangle holding every set pixel of an (H, W) mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return 0, 0, np.zeros((0, 0), bool)
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return int(r0), int(c0), mask[r0:r1, c0:c1].copy()


def region(masks, i: int, rows: slice, cols: slice) -> np.ndarray:
    """Window rows x cols of mask i of a mask set or an (N, H, W) array."""
    if isinstance(masks, np.ndarray):
        return masks[i, rows, cols]
    return masks.region(i, rows, cols)


def stack(masks, indices: list[int]) -> np.ndarray:
    """(len(indices), H, W) bool: the full masks `indices` of a mask set or array."""
    if isinstance(masks, np.ndarray):
        return masks[indices].astype(bool, copy=False)
    _, height, width = masks.shape
    out = np.zeros((len(indices), height, width), bool)
    for k, i in enumerate(indices):
        out[k] = masks[i]
    return out
