"""Predictions on the model's padded (S, S) input -> the original (height, width) image frame.

The inverse of model/transforms.py's geometry (resize the long side, flip, pad): boxes here,
masks and maps through `transforms.unpad_resize`. Eval, predict and the mqformer masker all map
back through these, so one image gets one answer whichever command asks.
"""

from __future__ import annotations

import numpy as np
import torch

from model import transforms as T


def boxes_to_original(xyxy: torch.Tensor, geo: T.Geometry) -> np.ndarray:
    """(N, 4) xyxy pixels of the padded input -> (N, 4) xywh pixels of the original image."""
    b = xyxy.detach().cpu().double().numpy().reshape(-1, 4).copy()
    if geo.flipped:
        b[:, [0, 2]] = geo.resized_width - b[:, [2, 0]]
    b[:, [0, 2]] = np.clip(b[:, [0, 2]] * geo.width / geo.resized_width, 0, geo.width)
    b[:, [1, 3]] = np.clip(b[:, [1, 3]] * geo.height / geo.resized_height, 0, geo.height)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def segments_to_original(segments: torch.Tensor, geo: T.Geometry) -> np.ndarray:
    """(S, S) int segment map of the padded input -> (height, width) int32, nearest neighbour."""
    crop = segments.cpu().numpy()[: geo.resized_height, : geo.resized_width]
    if geo.flipped:
        crop = crop[:, ::-1]
    rows = T.nearest_indices(geo.resized_height, geo.height)
    cols = T.nearest_indices(geo.resized_width, geo.width)
    return crop[rows][:, cols].astype(np.int32)


def masks_to_original(masks: torch.Tensor, geo: T.Geometry) -> np.ndarray:
    """(N, S, S) bool masks or float maps of the padded input -> (N, height, width) numpy."""
    return T.unpad_resize(masks.detach().cpu().numpy(), geo)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy()
