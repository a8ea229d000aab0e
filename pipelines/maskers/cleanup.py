"""Clean-up of box-prompted masks: what turns plain GrabCut into the `grabcut` masker.

Each step fixes a failure of GrabCut seen on generated scenes with exact ground truth
(bench/mask_quality.py; thresholds chosen on a tuning seed, not on the benchmark's):
- `refine_edges`: GrabCut's smoothness term places the boundary within a pixel or two of the true
  edge; mixed pixels are re-decided by comparing them with the local object and background colours.
- `guard_collapse`: when the colour models cannot separate, GrabCut returns almost nothing (a few
  specks) or almost the whole box; the ellipse inscribed in the box is a better guess than either
  (and than the box itself).
- `resolve_overlaps`: a box often contains part of a nearer object, which GrabCut swallows. Masks of
  visible pixels do not overlap, so each contested pixel goes to the smaller mask (the larger one is
  the one that swallowed a neighbour, far more often than the reverse).
Keeping only the largest connected part and filling holes were measured too and made things slightly
worse (an occluded object is legitimately split or holed), so they are not used.
"""

from __future__ import annotations

import cv2
import numpy as np

MIN_FILL = 0.15  # foreground fraction of the box below which GrabCut counts as collapsed
MAX_FILL = 0.97  # ... and above which it separated nothing
MIN_EXTENT = (
    0.6  # a thin mask whose main part spans this much of the box is an object, not a collapse
)
EDGE_BAND = 1  # pixels on each side of the boundary that refine_edges may flip
EDGE_SIGMA = 2.0  # scale (pixels) of the local colour means used by refine_edges
MIN_CONTRAST = 100.0  # squared RGB distance between local means below which an edge is left alone


def inscribed_ellipse(height: int, width: int) -> np.ndarray:
    """(height, width) bool: the ellipse touching the middle of each side of the frame."""
    rows = (np.arange(height) + 0.5 - height / 2) / (height / 2)
    cols = (np.arange(width) + 0.5 - width / 2) / (width / 2)
    return rows[:, None] ** 2 + cols[None, :] ** 2 <= 1.0


def main_part_extent(mask: np.ndarray) -> float:
    """Area of the largest 8-connected part's bounding box, as a fraction of the mask's frame."""
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n < 2:
        return 0.0
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return stats[largest, cv2.CC_STAT_WIDTH] * stats[largest, cv2.CC_STAT_HEIGHT] / mask.size


def guard_collapse(
    mask: np.ndarray,
    min_fill: float = MIN_FILL,
    max_fill: float = MAX_FILL,
    min_extent: float = MIN_EXTENT,
) -> np.ndarray:
    """(h, w) bool mask of a box -> itself, or the inscribed ellipse if it collapsed.

    Collapsed: it fills more than `max_fill` of the box, or less than `min_fill` while its largest
    part spans little of the box. A thin object lying across its box (a pencil on the diagonal)
    fills little but spans it all, and is kept.
    """
    if collapsed(mask, min_fill, max_fill, min_extent):
        return inscribed_ellipse(*mask.shape)
    return mask.astype(bool)


def collapsed(
    mask: np.ndarray,
    min_fill: float = MIN_FILL,
    max_fill: float = MAX_FILL,
    min_extent: float = MIN_EXTENT,
) -> bool:
    """Whether `guard_collapse` would replace this (h, w) box mask by the ellipse."""
    if mask.size == 0:
        return False
    fill = float(mask.mean())
    return fill > max_fill or (fill < min_fill and main_part_extent(mask) < min_extent)


def _local_mean(img: np.ndarray, weight: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-weighted mean colour of the pixels where weight is 1, and the weight's density."""
    w = weight.astype(np.float32)
    den = cv2.GaussianBlur(w, (0, 0), sigma)
    num = cv2.GaussianBlur(img * w[..., None], (0, 0), sigma)
    return num / np.maximum(den, 1e-6)[..., None], den


def refine_edges(
    mask: np.ndarray, crop: np.ndarray, band: int = EDGE_BAND, sigma: float = EDGE_SIGMA
) -> np.ndarray:
    """Re-decide the pixels within `band` of the mask's boundary by a local two-colour model.

    mask: (h, w) bool in the box's frame; crop: (h, w, 3) uint8, the image under the box.
    For a boundary pixel I with nearby object colour F and background colour B (means over pixels
    safely inside / outside the mask), alpha = <I - B, F - B> / |F - B|^2 is its object fraction,
    and it is foreground when alpha >= 0.5. Where F and B are too alike the pixel is left as it was.
    """
    if not mask.any() or mask.all():
        return mask.astype(bool)
    img = crop.astype(np.float32)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band + 1, 2 * band + 1))
    m = mask.astype(np.uint8)
    inner = cv2.erode(m, kernel, borderType=cv2.BORDER_REPLICATE)
    outer = 1 - cv2.dilate(m, kernel, borderType=cv2.BORDER_REPLICATE)
    fg, fg_w = _local_mean(img, inner, sigma)
    bg, bg_w = _local_mean(img, outer, sigma)
    diff = fg - bg
    contrast = (diff * diff).sum(-1)
    alpha = ((img - bg) * diff).sum(-1) / np.maximum(contrast, 1e-6)
    in_band = (m != inner) | ((1 - m) != outer)
    decide = in_band & (fg_w > 1e-3) & (bg_w > 1e-3) & (contrast > MIN_CONTRAST)
    out = mask.astype(bool)
    out[decide] = alpha[decide] >= 0.5
    return out


def resolve_overlaps(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> the masks made disjoint: a contested pixel goes to the smallest mask."""
    if len(masks) < 2:
        return masks
    areas = masks.reshape(len(masks), -1).sum(1)
    taken = np.zeros(masks.shape[1:], bool)
    out = np.zeros_like(masks)
    for i in np.argsort(areas, kind="stable"):
        out[i] = masks[i] & ~taken
        taken |= masks[i]
    return out
