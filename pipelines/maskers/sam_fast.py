"""Speed options for segment-anything's image encoder: fused attention (SDPA) and torch.compile.

The encoder is the cost of box-prompted SAM (one pass per image; ~15 s for vit_b on this CPU).
segment-anything computes attention as softmax(q k^T + relative-position bias) v with explicit
matrices; `use_sdpa` swaps each block's attention for PyTorch's scaled_dot_product_attention
with the same relative-position bias as its float mask (fused kernels on CUDA avoid writing the
attention matrix back and forth). Outputs agree with the original to float rounding: a test
compares them on CPU. `compile_encoder` wraps the encoder in `torch.compile`.

Both are off by default and measured by bench/gpu.sh (`bench/gpu_bench.py`), baseline beside them.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos


def _rel_pos_bias(attn: Attention, q: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B*heads, H*W, H*W) additive bias: segment-anything's add_decomposed_rel_pos without the
    logits it is normally added to."""
    h, w = size
    rh = get_rel_pos(h, h, attn.rel_pos_h)
    rw = get_rel_pos(w, w, attn.rel_pos_w)
    r_q = q.reshape(q.shape[0], h, w, q.shape[-1])
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
    return (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(q.shape[0], h * w, h * w)


def _sdpa_forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    b, h, w, _ = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)
    bias = _rel_pos_bias(self, q, (h, w)).to(q.dtype) if self.use_rel_pos else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
    out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return self.proj(out)


def use_sdpa(sam: torch.nn.Module) -> int:
    """Route every attention block of `sam`'s image encoder through SDPA; returns how many."""
    n = 0
    for module in sam.image_encoder.modules():
        if isinstance(module, Attention):
            module.forward = types.MethodType(_sdpa_forward, module)
            n += 1
    return n


def compile_encoder(sam: torch.nn.Module, mode: str | None = None) -> None:
    """Compile the image encoder in place (the first image pays the compile time)."""
    sam.image_encoder = torch.compile(sam.image_encoder, mode=mode, dynamic=False)
