"""Image/box/mask geometry for the trainer: resize the long side, optional flip, pad to a square.

Frames: the original image is (h, w) pixels; `prepare` resizes it by scale s = size / max(h, w) to
(nh, nw) = (round(h s), round(w s)), flips it horizontally if asked, and pads bottom/right with
zeros to (size, size). Boxes come in as xywh absolute pixels of the original image and leave as
cxcywh normalised by `size` (the padded image). `unpad_resize` maps masks predicted on the padded
image back to (h, w).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils

from schemas import masks as mask_codec

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
CV2_MAX_CHANNELS = 512  # cv2.resize handles at most this many channels in one call
_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


@dataclass
class Geometry:
    """How an original (height, width) image was placed in the (size, size) padded input."""

    height: int
    width: int
    resized_height: int
    resized_width: int
    size: int
    flipped: bool

    @property
    def scale(self) -> float:
        return self.resized_height / self.height


def geometry(height: int, width: int, size: int, flipped: bool = False) -> Geometry:
    if size % 32:
        raise ValueError(f"image_size must be a multiple of 32, got {size}")
    scale = size / max(height, width)
    nh, nw = max(1, round(height * scale)), max(1, round(width * scale))
    return Geometry(height, width, min(nh, size), min(nw, size), size, flipped)


def resize_masks(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """(M, h, w) uint8/bool -> (M, height, width) bool, nearest neighbour, 512 channels per cv2
    call."""
    if len(masks) == 0:
        return np.zeros((0, height, width), dtype=bool)
    out = np.empty((len(masks), height, width), dtype=bool)
    for start in range(0, len(masks), CV2_MAX_CHANNELS):
        chunk = masks[start : start + CV2_MAX_CHANNELS].astype(np.uint8).transpose(1, 2, 0)
        resized = cv2.resize(chunk, (width, height), interpolation=cv2.INTER_NEAREST)
        if resized.ndim == 2:  # cv2 drops a single channel
            resized = resized[..., None]
        out[start : start + resized.shape[2]] = resized.transpose(2, 0, 1) > 0
    return out


def prepare_image(image: np.ndarray, geo: Geometry) -> torch.Tensor:
    """(h, w, 3) uint8 RGB -> (3, size, size) float, ImageNet-normalised, zero (= mean) padding."""
    resized = cv2.resize(
        image, (geo.resized_width, geo.resized_height), interpolation=cv2.INTER_LINEAR
    )
    return prepare_resized(resized, geo)


def prepare_resized(resized: np.ndarray, geo: Geometry) -> torch.Tensor:
    """An image already at (nh, nw, 3) uint8 -> the normalised, flipped, padded (3, size, size)."""
    image = torch.from_numpy(resized).permute(2, 0, 1).float().div_(255.0)
    if geo.flipped:
        image = image.flip(2)
    out = torch.zeros(3, geo.size, geo.size)
    out[:, : geo.resized_height, : geo.resized_width] = image.sub_(_MEAN).div_(_STD)
    return out


def nearest_indices(src: int, dst: int) -> np.ndarray:
    """Source index of each of `dst` output pixels when resizing `src` pixels (pixel centres)."""
    return np.minimum(((np.arange(dst) + 0.5) * src / dst).astype(np.int64), src - 1)


def decode_resized(values: list[dict], height: int, width: int) -> np.ndarray:
    """Mask values of one size -> (N, height, width) bool, nearest neighbour.

    Samples pycocotools' (H, W, N) output directly, so the full-size stack is never copied.
    """
    full = mask_utils.decode([mask_codec.to_rle(v) for v in values])
    h, w = full.shape[:2]
    if (h, w) != (height, width):
        # Columns first: in this Fortran-ordered stack a column is contiguous (5x faster).
        full = full[:, nearest_indices(w, width)][nearest_indices(h, height)]
    return full.transpose(2, 0, 1).astype(bool)


def place_masks(resized: np.ndarray, geo: Geometry) -> torch.Tensor:
    """(M, nh, nw) masks at the resized size -> (M, size, size) bool on the padded, flipped input.
    """
    masks = torch.from_numpy(np.ascontiguousarray(resized, dtype=bool))
    if geo.flipped:
        masks = masks.flip(2)
    out = torch.zeros(len(resized), geo.size, geo.size, dtype=torch.bool)
    out[:, : geo.resized_height, : geo.resized_width] = masks
    return out


def prepare_boxes(boxes_xywh: np.ndarray, geo: Geometry) -> torch.Tensor:
    """(M, 4) xywh pixels of the original image -> (M, 4) cxcywh in [0, 1] of the padded input."""
    boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    sx, sy = geo.resized_width / geo.width, geo.resized_height / geo.height
    x, y, w, h = boxes[:, 0] * sx, boxes[:, 1] * sy, boxes[:, 2] * sx, boxes[:, 3] * sy
    if geo.flipped:
        x = geo.resized_width - x - w
    cxcywh = np.stack([x + w / 2, y + h / 2, w, h], axis=1) / geo.size
    return torch.from_numpy(np.clip(cxcywh, 0.0, 1.0)).float()


def unpad_resize(masks: np.ndarray, geo: Geometry) -> np.ndarray:
    """(M, size, size) masks or probabilities on the padded input -> (M, h, w) on the original
    image.

    Undoes the flip, crops the padding and resizes (bilinear for float maps, nearest for bool).
    """
    crop = np.asarray(masks)[:, : geo.resized_height, : geo.resized_width]
    if geo.flipped:
        crop = crop[:, :, ::-1]
    if crop.dtype == bool:
        return resize_masks(crop, geo.height, geo.width)
    out = np.empty((len(crop), geo.height, geo.width), dtype=np.float32)
    for i, m in enumerate(crop):
        out[i] = cv2.resize(
            m.astype(np.float32), (geo.width, geo.height), interpolation=cv2.INTER_LINEAR
        )
    return out
