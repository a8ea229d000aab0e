"""Mixed-query decoder: conditional and learnable queries refined together, layer by layer.

Queries are one tensor (B, Q, d) with the conditional set first (`n_cond` of them) and the
learnable set after it. Each layer does, in order (the paper fixes only that C->L and L->C exist):
  a. self-attention, jointly over all Q queries (Mask DINO / OpenSeeD) or within each set;
  b. C->L: learnable queries attend to conditional ones;
  c. L->C: conditional queries attend to the (updated) learnable ones;
  d. deformable cross-attention into the encoder memory around each query's reference box;
  e. FFN.
After every layer the shared box head refines the reference boxes in logit space
(r = sigmoid(delta(q) + logit(r))), detached between layers, and the shared heads predict class and
mask logits (deep supervision). With one set empty (the ablation modes) b and c are skipped.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from model.box_ops import inverse_sigmoid
from model.deform_attn import MSDeformAttn
from model.heads import MLP, BoxHead, PredictionHeads


def sine_box_embedding(boxes: Tensor, d: int) -> Tensor:
    """DINO's sine embedding of (B, Q, 4) cxcywh boxes in [0, 1] -> (B, Q, 2 * d), d/2 per coord."""
    half = d // 2
    freqs = 10000 ** (2 * (torch.arange(half, device=boxes.device, dtype=boxes.dtype) // 2) / half)
    pos = boxes[..., None] * (2 * math.pi) / freqs  # (B, Q, 4, half)
    pos = torch.stack([pos[..., 0::2].sin(), pos[..., 1::2].cos()], -1).flatten(-2)
    return pos.flatten(-2)


class DecoderLayer(nn.Module):
    """One mixed-query layer. forward(q (B, Q, d), pos (B, Q, d), boxes (B, Q, 4), n_cond, memory,
    spatial_shapes) -> q (B, Q, d)."""

    def __init__(self, d: int, n_levels: int, n_heads: int, n_points: int, ffn: int,
                 joint_self_attn: bool = True, dropout: float = 0.0):
        super().__init__()
        self.joint_self_attn = joint_self_attn
        self.self_attn = nn.MultiheadAttention(d, n_heads, dropout=dropout, batch_first=True)
        self.c2l = nn.MultiheadAttention(d, n_heads, dropout=dropout, batch_first=True)
        self.l2c = nn.MultiheadAttention(d, n_heads, dropout=dropout, batch_first=True)
        self.cross = MSDeformAttn(d, n_levels, n_heads, n_points)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(ffn, d))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(5))

    def forward(self, q: Tensor, pos: Tensor, boxes: Tensor, n_cond: int, memory: Tensor,
                spatial_shapes: Tensor, n_match: int | None = None,
                dn_mask: Tensor | None = None) -> Tensor:
        """n_match: the first n_match queries are the matching ones (default all); the rest are
        DN queries, kept apart in self-attention by dn_mask (True = blocked)."""
        n_match = q.shape[1] if n_match is None else n_match
        mask = dn_mask
        if not self.joint_self_attn:  # True = blocked: each set attends only to itself
            index = torch.arange(q.shape[1], device=q.device)
            is_cond = index < n_cond
            split = (is_cond[:, None] != is_cond[None, :]) & (index[:, None] < n_match) \
                & (index[None, :] < n_match)
            mask = split if mask is None else mask | split
        qk = q + pos
        q = self.norms[0](q + self.self_attn(qk, qk, q, attn_mask=mask, need_weights=False)[0])
        if 0 < n_cond < n_match:
            qc, ql, qd = q[:, :n_cond], q[:, n_cond:n_match], q[:, n_match:]
            pc, pl = pos[:, :n_cond], pos[:, n_cond:n_match]
            ql = self.norms[1](ql + self.c2l(ql + pl, qc + pc, qc, need_weights=False)[0])
            qc = self.norms[2](qc + self.l2c(qc + pc, ql + pl, ql, need_weights=False)[0])
            q = torch.cat([qc, ql, qd], 1)
        reference = boxes[:, :, None, :].expand(-1, -1, self.cross.n_levels, -1)
        q = self.norms[3](q + self.cross(q + pos, reference, memory, spatial_shapes))
        return self.norms[4](q + self.ffn(q))


class MixedQueryDecoder(nn.Module):
    """forward(q (B, Q, d), boxes (B, Q, 4), n_cond, memory, spatial_shapes, heads, texts,
    text_mask, mask_features) -> list of 1 + num_layers predictions, each a dict with
    pred_logits (B, Q, K), pred_masks (B, Q, H/4, W/4), pred_boxes (B, Q, 4) cxcywh in [0, 1].
    The first entry is predicted from the initial queries, the last is the model's output.
    With a no-object head (class_loss "softmax") each dict also holds pred_noobj (B, Q).
    With `dn` (model/denoising.py DNQueries) each entry also holds `dn_outputs`: the same three
    predictions for the DN queries."""

    def __init__(self, d: int, num_layers: int = 9, n_levels: int = 4, n_heads: int = 8,
                 n_points: int = 4, ffn: int = 2048, joint_self_attn: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.d = d
        self.layers = nn.ModuleList(
            DecoderLayer(d, n_levels, n_heads, n_points, ffn, joint_self_attn, dropout)
            for _ in range(num_layers)
        )
        self.ref_point_head = MLP(2 * d, d, d, 2)
        self.box_head = BoxHead(d)  # shared by all layers, as in Mask DINO

    def forward(self, q: Tensor, boxes: Tensor, n_cond: int, memory: Tensor,
                spatial_shapes: Tensor, heads: PredictionHeads, texts: Tensor,
                text_mask: Tensor, mask_features: Tensor, dn=None) -> list[dict[str, Tensor]]:
        n_match = q.shape[1]
        dn_mask = None
        if dn is not None:
            q, boxes = torch.cat([q, dn.content], 1), torch.cat([boxes, dn.boxes], 1)
            dn_mask = dn.attn_mask
        outputs = [self._predict(q, boxes, n_match, heads, texts, text_mask, mask_features)]
        for layer in self.layers:
            ref = boxes.detach()
            pos = self.ref_point_head(sine_box_embedding(ref, self.d))
            q = layer(q, pos, ref, n_cond, memory, spatial_shapes, n_match, dn_mask)
            boxes = (self.box_head(q) + inverse_sigmoid(ref)).sigmoid()
            outputs.append(self._predict(q, boxes, n_match, heads, texts, text_mask,
                                         mask_features))
        return outputs

    @staticmethod
    def _predict(q: Tensor, boxes: Tensor, n_match: int, heads: PredictionHeads, texts: Tensor,
                 text_mask: Tensor, mask_features: Tensor) -> dict:
        pred = dict(heads.predict(q, texts, text_mask, mask_features), pred_boxes=boxes)
        out = {k: v[:, :n_match] for k, v in pred.items()}
        if q.shape[1] > n_match:
            out["dn_outputs"] = {k: v[:, n_match:] for k, v in pred.items()}
        return out
