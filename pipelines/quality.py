"""Quality of a synthesized mask against its prompt box, and the keep/filter decision.

The scores are stored on every object (so thresholds can be re-tuned in SQL later); `decide` applies
the configured thresholds and names every one that failed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class QualityConfig:
    """Thresholds that decide `keep` for synthesized masks (ground-truth masks are never filtered).

    min_box_iou: IoU of the mask's tight box with the prompt box (catches leaks and collapses).
    min_box_fill: mask area / prompt box area (catches near-empty masks).
    max_components: most connected components allowed (0 = no limit).
    min_pred_iou, min_stability: model scores (SA-1B practice: 0.88, 0.95); skipped when the masker
        has no such score (NaN).
    keep_fallback: keep (still labelled in mask_origin) the substitute a masker puts in place of an
        output that failed, e.g. grabcut's inscribed ellipse; filtered as mask_fallback by default.
    """

    min_box_iou: float = 0.5
    min_box_fill: float = 0.05
    max_components: int = 0
    min_pred_iou: float = 0.88
    min_stability: float = 0.95
    keep_fallback: bool = False  # keep masks a method substituted for its failed output

    def __post_init__(self) -> None:
        for name in ("min_box_iou", "min_box_fill", "min_pred_iou", "min_stability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
        if self.max_components < 0:
            raise ValueError(f"--max-components must be >= 0, got {self.max_components}")


@dataclass
class MaskQuality:
    area: int
    mask_box: list[float]  # xywh tight box of the mask, zeros when empty
    box_iou: float
    box_fill: float
    n_components: int


def box_iou_xywh(a: list[float], b: list[float]) -> float:
    """IoU of two [x, y, w, h] boxes (0 when either is empty)."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def tight_box(mask: np.ndarray) -> list[float]:
    """[x, y, w, h] of the pixels set in a (H, W) mask, in the same pixel-edge convention as
    pycocotools' toBbox (a single pixel at (c, r) is [c, r, 1, 1])."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    cols = np.flatnonzero(mask.any(axis=0))
    return [
        float(cols[0]),
        float(rows[0]),
        float(cols[-1] - cols[0] + 1),
        float(rows[-1] - rows[0] + 1),
    ]


def measure(mask: np.ndarray, box_xywh: list[float]) -> MaskQuality:
    """Scores of one (H, W) bool mask against its prompt box [x, y, w, h]."""
    area = int(mask.sum())
    mbox = tight_box(mask)
    n_components = 0
    if area:
        n_labels, _ = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        n_components = int(n_labels) - 1
    box_area = box_xywh[2] * box_xywh[3]
    return MaskQuality(
        area=area,
        mask_box=mbox,
        box_iou=box_iou_xywh(mbox, box_xywh),
        box_fill=area / box_area if box_area > 0 else 0.0,
        n_components=n_components,
    )


def decide(
    q: MaskQuality, pred_iou: float, stability: float, cfg: QualityConfig
) -> tuple[str, str] | None:
    """None if the mask passes every threshold, else (reject_code of the first failure, every
    failure as text joined by '; ')."""
    failed = []
    if q.area == 0:
        failed.append(("empty_mask", "empty mask"))
    if q.box_iou < cfg.min_box_iou:
        failed.append(("low_box_iou", f"box_iou {q.box_iou:.3f} < {cfg.min_box_iou}"))
    if q.box_fill < cfg.min_box_fill:
        failed.append(("low_box_fill", f"box_fill {q.box_fill:.3f} < {cfg.min_box_fill}"))
    if cfg.max_components and q.n_components > cfg.max_components:
        failed.append(
            ("too_many_components", f"n_components {q.n_components} > {cfg.max_components}")
        )
    if not math.isnan(pred_iou) and pred_iou < cfg.min_pred_iou:
        failed.append(("low_pred_iou", f"pred_iou {pred_iou:.3f} < {cfg.min_pred_iou}"))
    if not math.isnan(stability) and stability < cfg.min_stability:
        failed.append(("low_stability", f"stability {stability:.3f} < {cfg.min_stability}"))
    if not failed:
        return None
    return failed[0][0], "; ".join(text for _, text in failed)
