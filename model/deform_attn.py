"""Multi-scale deformable attention (Deformable DETR) in pure PyTorch, so it runs on CPU.

Each query looks at `n_points` sampled locations on each of `n_levels` feature maps per head, and
mixes them with softmax weights predicted from the query itself. Sampling is bilinear through
`F.grid_sample`; no custom CUDA kernel is needed (it is slower than the kernel on GPU, but exact).

Coordinate frame: every location is normalised to [0, 1] over its level's map, (x, y) order, with
pixel centres at ((j + 0.5) / w, (i + 0.5) / h) (the `align_corners=False` convention).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def level_start_index(spatial_shapes: Tensor) -> Tensor:
    """Offsets of each level in the flattened token sequence. spatial_shapes: (L, 2) of (h, w)."""
    areas = spatial_shapes.prod(1)
    return torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])


def ms_deform_attn_sample(
    value: Tensor, spatial_shapes: Tensor, locations: Tensor, weights: Tensor
) -> Tensor:
    """Weighted bilinear sampling of multi-level value maps.

    value: (B, N, heads, Dh), N = sum of h_l * w_l, levels flattened row-major one after another.
    spatial_shapes: (L, 2) long, (h_l, w_l) per level.
    locations: (B, Lq, heads, L, P, 2) in [0, 1], (x, y); outside the map samples zeros.
    weights: (B, Lq, heads, L, P), attention weights (softmax over L * P done by the caller).
    Returns (B, Lq, heads * Dh).
    """
    batch, _, heads, head_dim = value.shape
    _, n_query, _, n_levels, n_points, _ = locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_levels = value.split(sizes, dim=1)
    grids = 2 * locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        # (B, h*w, heads, Dh) -> (B*heads, Dh, h, w)
        v = value_levels[level].flatten(2).transpose(1, 2).reshape(batch * heads, head_dim, h, w)
        # (B, Lq, heads, P, 2) -> (B*heads, Lq, P, 2)
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # (B*heads, Dh, Lq, P)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (B*heads, Dh, Lq, L*P)
    w = weights.transpose(1, 2).reshape(batch * heads, 1, n_query, n_levels * n_points)
    out = (stacked * w).sum(-1)  # (B*heads, Dh, Lq)
    return out.view(batch, heads * head_dim, n_query).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module.

    forward(query (B, Lq, d), reference (B, Lq, L, 2 or 4), value_in (B, N, d), spatial_shapes)
    -> (B, Lq, d). A 2-d reference is a point (x, y); a 4-d reference is a box (cx, cy, w, h)
    and the offsets are scaled by half its size, as in Deformable DETR's two-stage variant.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
        self.d_model, self.n_levels = d_model, n_levels
        self.n_heads, self.n_points = n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Offsets start as a ring of directions per head, growing with the point index, so that
        # heads look around the reference in different directions before any training.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([angles.cos(), angles.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for layer in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self, query: Tensor, reference: Tensor, value_in: Tensor, spatial_shapes: Tensor
    ) -> Tensor:
        batch, n_query, _ = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        if spatial_shapes.shape[0] != levels:
            raise ValueError(f"got {spatial_shapes.shape[0]} levels, module built for {levels}")
        value = self.value_proj(value_in).view(batch, value_in.shape[1], heads, -1)
        offsets = self.sampling_offsets(query).view(batch, n_query, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, n_query, heads, levels * points)
        weights = weights.softmax(-1).view(batch, n_query, heads, levels, points)
        ref = reference[:, :, None, :, None, :]  # (B, Lq, 1, L, 1, 2|4)
        if reference.shape[-1] == 2:
            # offsets are in pixels of each level: normalise by that level's (w, h)
            wh = spatial_shapes.flip(-1).to(offsets.dtype)  # (L, 2) as (w, h)
            locations = ref + offsets / wh[None, None, None, :, None, :]
        elif reference.shape[-1] == 4:
            locations = ref[..., :2] + offsets / points * ref[..., 2:] * 0.5
        else:
            raise ValueError(f"reference last dim must be 2 or 4, got {reference.shape[-1]}")
        out = ms_deform_attn_sample(value, spatial_shapes, locations, weights)
        return self.output_proj(out)
