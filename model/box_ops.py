"""Box helpers on top of torchvision.ops. Boxes are (cx, cy, w, h) normalised to [0, 1] of the
padded image unless a name says xyxy."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clamped to [eps, 1 - eps] so that boxes on the border stay finite."""
    x = x.clamp(min=eps, max=1 - eps)
    return (x / (1 - x)).log()


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) cxcywh -> (..., 4) xyxy, same units."""
    return box_convert(boxes, "cxcywh", "xyxy")


def giou_cxcywh(a: Tensor, b: Tensor) -> Tensor:
    """Generalized IoU of every box of a (..., N, 4) against every box of b (..., M, 4), cxcywh
    -> (..., N, M): torchvision's generalized_box_iou, for a whole batch of items at once (the
    leading dimensions broadcast)."""
    a, b = cxcywh_to_xyxy(a)[..., :, None, :], cxcywh_to_xyxy(b)[..., None, :, :]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    inter = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)
    union = area_a + area_b - inter.prod(-1)
    hull = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).clamp(min=0)
    return inter.prod(-1) / union - (hull.prod(-1) - union) / hull.prod(-1)
