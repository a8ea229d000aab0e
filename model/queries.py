"""The two query sets of MQ-Former.

- Conditional queries (two-stage, as in DINO / Mask DINO / OpenSeeD): every encoder token gets an
  anchor box; a Linear+LayerNorm turns memory into proposal features, which are scored against the
  sample's texts with the shared class head. The top-K tokens by best text score become the queries'
  content and reference boxes (anchor refined by a box MLP), both detached. With a no-object
  logit (class_loss "softmax") the score is the best text's softmax probability. The undetached
  predictions are returned as `interm_outputs` so the encoder learns to propose (its own loss).
- Learnable queries: `nn.Embedding` content and reference boxes, the same for every image.

Boxes are (cx, cy, w, h) normalised to [0, 1] of the padded image.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.box_ops import inverse_sigmoid
from model.heads import MLP, PredictionHeads, softmax_probs

QUERY_TYPES = ("conditional", "learnable")  # index used in MQFormer's `query_types`


def encoder_proposals(memory: Tensor, spatial_shapes: Tensor) -> tuple[Tensor, Tensor]:
    """One anchor box per token: the token's pixel centre, size 0.05 * 2**level (Deformable DETR).

    memory: (B, N, d). Returns anchors (1, N, 4) as logits (inverse sigmoid of cxcywh) and
    valid (1, N) bool: False for anchors touching the border (their logit would be near infinite);
    callers must never select those.
    """
    anchors = []
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        ys, xs = torch.meshgrid(
            (torch.arange(h, device=memory.device, dtype=memory.dtype) + 0.5) / h,
            (torch.arange(w, device=memory.device, dtype=memory.dtype) + 0.5) / w,
            indexing="ij",
        )
        wh = torch.full_like(xs, 0.05 * 2.0**level)
        anchors.append(torch.stack([xs, ys, wh, wh], -1).reshape(-1, 4))
    boxes = torch.cat(anchors, 0)[None]
    valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1)
    return inverse_sigmoid(boxes), valid


def proposal_scores(logits: Tensor, noobj: Tensor | None) -> Tensor:
    """(B, N, K) text logits, (B, N) no-object logits or None -> (B, N) the score tokens are
    ranked by: the best text's logit, or with a no-object logit the best text's softmax
    probability (the score inference reads, model/heads.py sigmoid_logits: a token whose best
    text logit is high but whose no-object logit is higher is not a proposal)."""
    if noobj is None:
        return logits.max(-1).values
    return softmax_probs(logits, noobj).max(-1).values


class ConditionalQueries(nn.Module):
    """Top-K encoder proposals scored by text similarity.

    forward(memory (B, N, d), spatial_shapes, texts (B, K, d), text_mask (B, K), heads,
    mask_features) -> content (B, K_q, d) detached, boxes (B, K_q, 4) detached, interm dict with
    pred_logits (B, K_q, K), pred_boxes (B, K_q, 4), pred_masks (B, K_q, H/4, W/4) undetached
    (and pred_noobj (B, K_q) with a no-object head).
    """

    def __init__(self, d: int, num_queries: int):
        super().__init__()
        self.num_queries = num_queries
        self.enc_output = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d))
        self.box_head = MLP(d, d, 4, 3)

    def forward(self, memory: Tensor, spatial_shapes: Tensor, texts: Tensor, text_mask: Tensor,
                heads: PredictionHeads, mask_features: Tensor) -> tuple[Tensor, Tensor, dict]:
        if memory.shape[1] < self.num_queries:
            raise ValueError(f"{self.num_queries} conditional queries but only {memory.shape[1]} "
                             "encoder tokens; use larger images or fewer queries")
        anchors, valid = encoder_proposals(memory, spatial_shapes)
        feats = self.enc_output(memory.masked_fill(~valid[..., None], 0.0))
        logits, noobj = heads.cls.scores(heads.norm(feats), texts, text_mask)  # (B, N, K)
        score = proposal_scores(logits, noobj).masked_fill(~valid, float("-inf"))
        index = score.topk(self.num_queries, dim=1).indices  # (B, K_q)
        content = torch.gather(feats, 1, index[..., None].expand(-1, -1, feats.shape[-1]))
        anchor = torch.gather(anchors.expand(memory.shape[0], -1, -1), 1,
                              index[..., None].expand(-1, -1, 4))
        boxes = (self.box_head(content) + anchor).sigmoid()
        interm = {
            "pred_logits": torch.gather(logits, 1,
                                        index[..., None].expand(-1, -1, logits.shape[-1])),
            "pred_boxes": boxes,
            "pred_masks": heads.mask(heads.norm(content), mask_features),
        }
        if noobj is not None:
            interm["pred_noobj"] = torch.gather(noobj, 1, index)
        return content.detach(), boxes.detach(), interm


class LearnableQueries(nn.Module):
    """forward(batch) -> content (B, n, d), boxes (B, n, 4) in [0, 1]; trainable, image-agnostic."""

    def __init__(self, num_queries: int, d: int):
        super().__init__()
        self.content = nn.Embedding(num_queries, d)
        self.box_logits = nn.Embedding(num_queries, 4)
        with torch.no_grad():  # spread the reference centres over the image, mid-size boxes
            self.box_logits.weight[:, :2].uniform_(-2.0, 2.0)
            self.box_logits.weight[:, 2:].fill_(float(inverse_sigmoid(torch.tensor(0.2))))

    def forward(self, batch: int) -> tuple[Tensor, Tensor]:
        content = self.content.weight[None].expand(batch, -1, -1)
        return content, self.box_logits.weight.sigmoid()[None].expand(batch, -1, -1)
