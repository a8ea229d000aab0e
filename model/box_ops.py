"""Box helpers on top of torchvision.ops. Boxes are (cx, cy, w, h) normalised to [0, 1] of the
padded image unless a name says xyxy."""

from __future__ import annotations

from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clamped to [eps, 1 - eps] so that boxes on the border stay finite."""
    x = x.clamp(min=eps, max=1 - eps)
    return (x / (1 - x)).log()


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) cxcywh -> (..., 4) xyxy, same units."""
    return box_convert(boxes, "cxcywh", "xyxy")


def giou_cxcywh(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise generalized IoU of (N, 4) and (M, 4) cxcywh boxes -> (N, M)."""
    return generalized_box_iou(cxcywh_to_xyxy(a), cxcywh_to_xyxy(b))
