"""Mask scoring and clean-up shared by the SAM-family maskers.

The scores are computed the way segment-anything's automatic mask generator (the SA-1B engine)
computes them, by calling its own helpers, so thresholds tuned on SA-1B (pred IoU 0.88, stability
0.95) mean the same thing here. The maskers only report scores; the pipeline's filter stage applies
the thresholds.
"""

from __future__ import annotations

import numpy as np
import torch
from segment_anything.utils.amg import calculate_stability_score, remove_small_regions

# SA-1B practice (segment-anything's SamAutomaticMaskGenerator defaults, "chosen for ViT-H").
PRED_IOU_THRESH = 0.88
STABILITY_THRESH = 0.95
STABILITY_OFFSET = 1.0


def pick_best(iou: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep, for each prompt, the candidate mask with the highest predicted IoU.

    iou: (N, K) predicted IoU of K candidates per prompt; logits: (N, K, h, w) mask logits.
    Returns (N,) IoU and (N, h, w) logits of the chosen candidates.
    """
    best = iou.argmax(dim=1)
    rows = torch.arange(len(best), device=best.device)
    return iou[rows, best], logits[rows, best]


def stability_scores(
    logits: torch.Tensor, mask_threshold: float = 0.0, offset: float = STABILITY_OFFSET
) -> torch.Tensor:
    """(N, H, W) mask logits -> (N,) float32 stability: IoU of the masks thresholded at
    mask_threshold + offset and mask_threshold - offset (segment-anything's definition).

    An all-background mask (empty union) scores NaN: there is nothing to be stable about.
    """
    scores = calculate_stability_score(logits.float(), mask_threshold, offset)
    return scores.float()


def remove_small_parts(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Fill holes and drop islands smaller than min_area pixels in one (H, W) bool mask.

    Same order and helper as SamAutomaticMaskGenerator.postprocess_small_regions: holes first,
    then islands; when every island is small, the largest is kept. min_area <= 0 is a no-op.
    """
    if min_area <= 0 or not mask.any():
        return mask
    mask, _ = remove_small_regions(mask, min_area, mode="holes")
    mask, _ = remove_small_regions(mask, min_area, mode="islands")
    return mask


def encode_chunk(masks: np.ndarray, min_region_area: int = 0) -> list[dict]:
    """A decoded chunk (n, H, W) bool -> n RLE values, after small-region clean-up; encoding each
    chunk as soon as it is made keeps an image's memory bounded by the chunk, not by its boxes."""
    from schemas import masks as rle

    if min_region_area > 0:
        masks = np.stack([remove_small_parts(m, min_region_area) for m in masks])
    return rle.encode(masks)
