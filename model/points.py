"""Point sampling of mask logits/targets (detectron2's `point_sample` idea, via F.grid_sample).

Masks are compared on a few thousand points instead of every pixel: predictions live at stride 4,
targets at image resolution, and both are read at the same normalised (x, y) in [0, 1] of the
padded image with bilinear interpolation (align_corners=False: pixel centres at (j + 0.5) / w).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample_channels(masks: Tensor, points: Tensor) -> Tensor:
    """masks (N, C, h, w), points (N, P, 2) in [0, 1] (x, y) -> (N, C, P): every channel of an
    item read at that item's points (the matcher compares all of an image's predicted and target
    masks on one set of points)."""
    grid = (2 * points - 1)[:, :, None, :]  # (N, P, 1, 2)
    return F.grid_sample(masks.to(points.dtype), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)[..., 0]


def point_sample(masks: Tensor, points: Tensor) -> Tensor:
    """masks (N, h, w), points (N, P, 2) in [0, 1] (x, y) -> (N, P) bilinear samples."""
    return point_sample_channels(masks[:, None], points)[:, 0]


@torch.no_grad()
def uncertain_points(logits: Tensor, num_points: int, oversample: float = 3.0,
                     importance: float = 0.75) -> Tensor:
    """Mask2Former/PointRend point choice for the mask loss: (N, h, w) logits -> (N, P, 2).

    Draws oversample * P random points, keeps the importance * P most uncertain ones (logit closest
    to 0) and fills the rest with fresh uniform points, so hard boundaries get most of the budget.
    """
    n = logits.shape[0]
    candidates = torch.rand(n, int(num_points * oversample), 2, device=logits.device)
    uncertainty = -point_sample(logits.float(), candidates).abs()
    n_hard = int(importance * num_points)
    top = uncertainty.topk(n_hard, dim=1).indices
    hard = torch.gather(candidates, 1, top[..., None].expand(-1, -1, 2))
    rand = torch.rand(n, num_points - n_hard, 2, device=logits.device)
    return torch.cat([hard, rand], 1)


def grid_points(n: int, height: int, width: int, device=None) -> Tensor:
    """Every pixel centre of a (height, width) map, (x, y) in [0, 1], row-major -> (n, h*w, 2).

    Read at these points a stride-4 prediction gives back its own logits exactly, so a loss on them
    is the full-mask loss (every pixel counted once) instead of a sampled estimate: at small
    sizes (a 32x32 mask has 1024 pixels) the sample is not cheaper than the whole mask."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], -1)[None].expand(n, -1, -1)


@torch.no_grad()
def sample_matched(masks: list[Tensor], sample: Tensor, target: Tensor, points: Tensor) -> Tensor:
    """Target masks read at the points of their matches: T matches, match i of target target[i]
    of sample sample[i] read at points[i] (P, 2) -> (T, P).

    masks: per sample its (M_b, H, W) target masks. Reads one sample at a time, each target at
    the points of all its matches side by side, so the float copies are of
    one sample's masks, never of every match's: a full-size batch with deep supervision has
    thousands of matches of megapixel masks."""
    out = points.new_zeros(points.shape[:2])
    n_points = points.shape[1]
    for b in sample.unique().tolist():
        rows = (sample == b).nonzero()[:, 0]
        tgt = target[rows]
        order = torch.argsort(tgt, stable=True)
        sorted_tgt = tgt[order]
        rank = torch.empty_like(tgt)
        rank[order] = (torch.arange(len(tgt), device=tgt.device)
                       - torch.searchsorted(sorted_tgt, sorted_tgt))
        m = masks[b].shape[0]
        grid = points.new_zeros(m, int(rank.max()) + 1, n_points, 2)
        grid[tgt, rank] = points[rows]
        read = point_sample(masks[b], grid.flatten(1, 2))  # (m, n_max * P)
        out[rows] = read.view(m, -1, n_points)[tgt, rank]
    return out
