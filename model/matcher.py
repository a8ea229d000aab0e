"""Hungarian matching of predictions to targets over ALL queries, whatever their type.

This is MQ-Former's "dynamic selection": no thing/stuff split (unlike OpenSeeD's `split_pano`), the
assignment alone decides whether a learnable or a conditional query predicts an object.
Cost (Mask DINO): 4 * focal class + 5 * sigmoid-BCE + 5 * dice (on random points shared by all
predicted and target masks of the image; skipped for box-only samples) + 5 * L1 + 2 * GIoU.
When the outputs carry pred_noobj (class_loss "softmax"), the class cost is Mask2Former's: minus
the softmax probability of the target's text over [the sample's texts, no-object].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from model.box_ops import giou_cxcywh
from model.heads import softmax_probs
from model.points import point_sample


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float, gamma: float) -> Tensor:
    """(Q, K) logits, (M,) labels -> (Q, M): focal loss of calling it positive minus negative."""
    prob = logits.sigmoid()
    neg = (1 - alpha) * prob**gamma * -F.logsigmoid(-logits)
    pos = alpha * (1 - prob) ** gamma * -F.logsigmoid(logits)
    return pos[:, labels] - neg[:, labels]


def softmax_class_cost(logits: Tensor, noobj: Tensor, labels: Tensor) -> Tensor:
    """(Q, K) logits, (Q,) no-object logits, (M,) labels -> (Q, M): -p(target's text), p the
    softmax over [texts, no-object]."""
    return -softmax_probs(logits, noobj)[:, labels]


def pairwise_bce(pred: Tensor, target: Tensor) -> Tensor:
    """Mean sigmoid BCE of every prediction (Q, P) logits against every target (M, P) -> (Q, M)."""
    pos = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")
    neg = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")
    return (pos @ target.T + neg @ (1 - target).T) / pred.shape[1]


def pairwise_dice(pred: Tensor, target: Tensor) -> Tensor:
    """Dice loss 1 - (2|p.t| + 1) / (|p| + |t| + 1) of every (Q, P) vs every (M, P) -> (Q, M)."""
    prob = pred.sigmoid()
    inter = 2 * prob @ target.T
    return 1 - (inter + 1) / (prob.sum(-1)[:, None] + target.sum(-1)[None, :] + 1)


class HungarianMatcher(nn.Module):
    """forward(outputs, targets) -> list of B (query_index, target_index) LongTensor pairs.

    outputs: pred_logits (B, Q, K_max), pred_boxes (B, Q, 4), pred_masks (B, Q, h, w), and
    pred_noobj (B, Q) from a no-object head (softmax class cost).
    targets: the batch interface of model/mqformer.py (labels, boxes, masks, has_masks, texts).
    """

    def __init__(self, cost_class: float = 4.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 cost_bbox: float = 5.0, cost_giou: float = 2.0, num_points: int = 12544,
                 alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.cost_bbox, self.cost_giou = cost_bbox, cost_giou
        self.num_points, self.alpha, self.gamma = num_points, alpha, gamma

    @torch.no_grad()
    def cost_matrix(self, logits: Tensor, boxes: Tensor, masks: Tensor | None, target: dict,
                    points: Tensor | None = None, noobj: Tensor | None = None) -> Tensor:
        """Cost (Q, M) of one image. logits (Q, K_i), boxes (Q, 4), masks (Q, h, w) or None (no
        mask cost). points (P, 2) in [0, 1] for the mask cost; random uniform when None.
        noobj (Q,) no-object logits: the softmax class cost instead of the focal one."""
        labels = target["labels"]
        if noobj is None:
            class_cost = focal_class_cost(logits.float(), labels, self.alpha, self.gamma)
        else:
            class_cost = softmax_class_cost(logits, noobj, labels)
        cost = self.cost_class * class_cost
        tgt_boxes = target["boxes"].to(boxes)
        cost = cost + self.cost_bbox * torch.cdist(boxes.float(), tgt_boxes.float(), p=1)
        cost = cost - self.cost_giou * giou_cxcywh(boxes.float(), tgt_boxes.float())
        if masks is not None:
            if points is None:
                points = torch.rand(self.num_points, 2, device=masks.device)
            pred = point_sample(masks.float(), points[None].expand(masks.shape[0], -1, -1))
            tgt_masks = target["masks"].to(masks.device)
            tgt = point_sample(tgt_masks.float(), points[None].expand(tgt_masks.shape[0], -1, -1))
            cost = cost + self.cost_mask * pairwise_bce(pred, tgt)
            cost = cost + self.cost_dice * pairwise_dice(pred, tgt)
        return cost

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        indices = []
        for b, target in enumerate(targets):
            n_texts = len(target["texts"])
            if len(target["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.long)
                indices.append((empty, empty.clone()))
                continue
            masks = outputs["pred_masks"][b] if target["has_masks"] else None
            noobj = outputs["pred_noobj"][b] if "pred_noobj" in outputs else None
            cost = self.cost_matrix(outputs["pred_logits"][b, :, :n_texts],
                                    outputs["pred_boxes"][b], masks, target, noobj=noobj)
            if not torch.isfinite(cost).all():
                raise ValueError(f"non-finite matching cost for sample {b} (task "
                                 f"{target.get('task')}): check predictions and boxes")
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.long),
                            torch.as_tensor(cols, dtype=torch.long)))
        return indices
