"""Segmentation (pixel) encoder: deformable attention over multi-scale maps + FPN to stride 4.

As in Mask DINO's `MaskDINOEncoder`: C3..C5 are projected to d channels, an extra stride-64 level is
made from C5, the flattened tokens of all levels go through `num_layers` deformable self-attention
layers (`memory`), and the stride-8 level of memory is upsampled and merged with C2 into the
stride-4 `mask_features` that every mask head dots its query embedding with.

Images in a batch are assumed fully valid (the data loader pads to one size and the padding is part
of the image), so no padding mask is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from math import gcd

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.deform_attn import MSDeformAttn, level_start_index


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups of 8+ channels (Mask DINO at 256 channels), fewer when narrow.

    At least 8 channels per group keeps 1x1 maps (the stride-64 level of a small image) valid."""
    return nn.GroupNorm(gcd(32, max(channels // 8, 1)), channels)


def sine_position_2d(height: int, width: int, dim: int, device, dtype=torch.float32) -> Tensor:
    """DETR sine position embedding of a (height, width) grid -> (height * width, dim).

    Half of dim encodes y, half x, positions normalised to (0, 2*pi]. dim must be a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"position dim must be a multiple of 4, got {dim}")
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height * 2 * math.pi
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width * 2 * math.pi
    freqs = 10000 ** (2 * (torch.arange(dim // 4, device=device, dtype=dtype)) / (dim // 2))
    y = ys[:, None] / freqs  # (h, dim/4)
    x = xs[:, None] / freqs
    y = torch.cat([y.sin(), y.cos()], -1)[:, None, :].expand(height, width, dim // 2)
    x = torch.cat([x.sin(), x.cos()], -1)[None, :, :].expand(height, width, dim // 2)
    return torch.cat([y, x], -1).reshape(height * width, dim)


def grid_reference_points(spatial_shapes: Tensor, n_levels: int, dtype=torch.float32) -> Tensor:
    """Pixel centres of every level, normalised to [0, 1] (x, y) -> (1, N, n_levels, 2)."""
    points = []
    for h, w in spatial_shapes.tolist():
        ys, xs = torch.meshgrid(
            (torch.arange(h, dtype=dtype, device=spatial_shapes.device) + 0.5) / h,
            (torch.arange(w, dtype=dtype, device=spatial_shapes.device) + 0.5) / w,
            indexing="ij",
        )
        points.append(torch.stack([xs.flatten(), ys.flatten()], -1))
    return torch.cat(points, 0)[None, :, None, :].expand(1, -1, n_levels, 2)


class EncoderLayer(nn.Module):
    """Deformable self-attention over all tokens + FFN, post-norm. (B, N, d) -> (B, N, d)."""

    def __init__(self, d: int, n_levels: int, n_heads: int, n_points: int, ffn: int,
                 dropout: float = 0.0):
        super().__init__()
        self.attn = MSDeformAttn(d, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(ffn, d))
        self.norm2 = nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, reference: Tensor, shapes: Tensor) -> Tensor:
        src = self.norm1(src + self.dropout(self.attn(src + pos, reference, src, shapes)))
        return self.norm2(src + self.dropout(self.ffn(src)))


@dataclass
class EncoderOutput:
    """memory: (B, N, d) tokens of all levels (strides 8, 16, 32, 64), row-major, level by level.
    spatial_shapes: (L, 2) long (h, w) per level. mask_features: (B, mask_dim, H/4, W/4)."""

    memory: Tensor
    spatial_shapes: Tensor
    mask_features: Tensor


class PixelEncoder(nn.Module):
    """forward(features [C2, C3, C4, C5]) -> EncoderOutput. in_channels lists C2..C5 channels."""

    def __init__(self, in_channels: list[int], d: int = 256, mask_dim: int = 256,
                 num_layers: int = 6, n_heads: int = 8, n_points: int = 4, ffn: int = 1024,
                 dropout: float = 0.0):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"expected channels of C2..C5, got {in_channels}")
        self.d = d
        self.n_levels = 4  # C3, C4, C5 and an extra stride-64 level
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d, 1), group_norm(d)) for c in in_channels[1:]
        )
        self.input_proj.append(nn.Sequential(nn.Conv2d(in_channels[3], d, 3, stride=2, padding=1),
                                             group_norm(d)))
        self.level_embed = nn.Parameter(torch.randn(self.n_levels, d) * 0.02)
        self.layers = nn.ModuleList(
            EncoderLayer(d, self.n_levels, n_heads, n_points, ffn, dropout)
            for _ in range(num_layers)
        )
        self.lateral = nn.Sequential(nn.Conv2d(in_channels[0], d, 1, bias=False), group_norm(d))
        self.output = nn.Sequential(nn.Conv2d(d, d, 3, padding=1, bias=False), group_norm(d),
                                    nn.ReLU())
        self.mask_proj = nn.Conv2d(d, mask_dim, 1)

    def forward(self, features: list[Tensor]) -> EncoderOutput:
        c2, c3, c4, c5 = features
        maps = [proj(f) for proj, f in zip(self.input_proj[:3], (c3, c4, c5), strict=True)]
        maps.append(self.input_proj[3](c5))
        shapes = torch.tensor([m.shape[-2:] for m in maps], dtype=torch.long, device=c2.device)
        tokens = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)  # (B, N, d)
        pos = torch.cat([
            sine_position_2d(h, w, self.d, c2.device, tokens.dtype) + self.level_embed[lvl]
            for lvl, (h, w) in enumerate(shapes.tolist())
        ], 0)[None]
        reference = grid_reference_points(shapes, self.n_levels, tokens.dtype)
        memory = tokens
        for layer in self.layers:
            memory = layer(memory, pos, reference, shapes)
        starts = level_start_index(shapes).tolist()
        h8, w8 = shapes[0].tolist()
        stride8 = memory[:, starts[0]:starts[0] + h8 * w8].transpose(1, 2)
        stride8 = stride8.reshape(memory.shape[0], self.d, h8, w8)
        up = F.interpolate(stride8, size=c2.shape[-2:], mode="bilinear", align_corners=False)
        mask_features = self.mask_proj(self.output(self.lateral(c2) + up))
        return EncoderOutput(memory, shapes, mask_features)
