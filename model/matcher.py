"""Hungarian matching of predictions to targets over ALL queries, whatever their type.

This is MQ-Former's "dynamic selection": no thing/stuff split (unlike OpenSeeD's `split_pano`), the
assignment alone decides whether a learnable or a conditional query predicts an object.
Cost (Mask DINO): 4 * focal class + 5 * sigmoid-BCE + 5 * dice (on random points shared by all
predicted and target masks of the image; skipped for box-only samples) + 5 * L1 + 2 * GIoU.
When the outputs carry pred_noobj (class_loss "softmax"), the class cost is Mask2Former's: minus
the softmax probability of the target's text over [the sample's texts, no-object].

The costs of a whole batch, and of several prediction stages of it at once (the criterion stacks
its stages along the batch dimension: N items, item n a prediction of sample sample_of[n]), are
computed in one pass over targets padded to the batch's most objects (`TargetBatch`); only the
assignment itself (scipy) runs per item. On a CPU-sized model the per-sample loop's thousands of
tiny tensor ops, not the arithmetic, were a quarter of a training step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from model.box_ops import giou_cxcywh
from model.heads import softmax_probs
from model.points import point_sample_channels


@dataclass
class TargetBatch:
    """A batch's targets padded to its most objects M: labels (B, M) long, boxes (B, M, 4),
    has_masks (B,) bool, n_texts (B,) long; unpadded: masks (each sample's (M_b, H, W) bool),
    counts (objects per sample; columns past a sample's count are padding) and the targets."""

    labels: Tensor
    boxes: Tensor
    has_masks: Tensor
    n_texts: Tensor
    masks: list[Tensor]
    counts: list[int]
    targets: list[dict]

    @classmethod
    def from_targets(cls, targets: list[dict], device: torch.device,
                     dtype: torch.dtype = torch.float32) -> TargetBatch:
        counts = [len(t["labels"]) for t in targets]
        b, m = len(targets), max(counts, default=0)
        labels = torch.zeros(b, m, dtype=torch.long, device=device)
        # padding boxes are a real box, so that the padded costs stay finite
        boxes = torch.full((b, m, 4), 0.5, dtype=dtype, device=device)
        for i, (t, n) in enumerate(zip(targets, counts, strict=True)):
            if n:
                labels[i, :n] = t["labels"].to(device)
                boxes[i, :n] = t["boxes"].to(device, dtype)
        return cls(labels, boxes,
                   torch.tensor([bool(t["has_masks"]) for t in targets], device=device),
                   torch.tensor([len(t["texts"]) for t in targets], device=device),
                   [t["masks"].to(device) for t in targets], counts, targets)


def focal_class_cost(logits: Tensor, alpha: float, gamma: float) -> Tensor:
    """Focal loss of calling a logit positive minus calling it negative, elementwise."""
    prob = logits.sigmoid()
    neg = (1 - alpha) * prob**gamma * -F.logsigmoid(-logits)
    pos = alpha * (1 - prob) ** gamma * -F.logsigmoid(logits)
    return pos - neg


def pairwise_bce(pred: Tensor, target: Tensor) -> Tensor:
    """Mean sigmoid BCE of every prediction (N, Q, P) logits against every target (N, M, P) ->
    (N, Q, M)."""
    pos = F.softplus(-pred)  # BCE against 1
    neg = F.softplus(pred)   # BCE against 0
    return (pos @ target.transpose(1, 2) + neg @ (1 - target).transpose(1, 2)) / pred.shape[-1]


def pairwise_dice(pred: Tensor, target: Tensor) -> Tensor:
    """Dice loss 1 - (2|p.t| + 1) / (|p| + |t| + 1) of every (N, Q, P) vs every (N, M, P)."""
    prob = pred.sigmoid()
    inter = 2 * prob @ target.transpose(1, 2)
    return 1 - (inter + 1) / (prob.sum(-1)[..., None] + target.sum(-1)[:, None, :] + 1)


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
    def batched_cost(self, outputs: dict, batch: TargetBatch, sample_of: Tensor,
                     points: Tensor | None = None) -> Tensor:
        """Cost (N, Q, M) of N items (item n predicts sample sample_of[n] of `batch`); columns past
        a sample's own objects are padding. points (B, P, 2) in [0, 1], one set per sample shared
        by its items, for the mask cost; random uniform when None."""
        logits = outputs["pred_logits"].float()
        labels = batch.labels[sample_of]  # (N, M)
        if labels.shape[1] == 0:
            return logits.new_zeros(logits.shape[0], logits.shape[1], 0)
        gather = labels[:, None, :].expand(-1, logits.shape[1], -1)
        if "pred_noobj" in outputs:
            probs = softmax_probs(logits, outputs["pred_noobj"].float())
            class_cost = -probs.gather(2, gather)
        else:
            class_cost = focal_class_cost(logits.gather(2, gather), self.alpha, self.gamma)
        boxes, tgt_boxes = outputs["pred_boxes"].float(), batch.boxes[sample_of].float()
        cost = (self.cost_class * class_cost + self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
                - self.cost_giou * giou_cxcywh(boxes, tgt_boxes))
        with_masks = batch.has_masks[sample_of]
        if bool(with_masks.any()):
            masks = outputs["pred_masks"]  # read in float32 at the points
            if points is None:
                points = torch.rand(len(batch.counts), self.num_points, 2, device=masks.device)
            pred = point_sample_channels(masks, points[sample_of])
            tgt = points.new_zeros(len(batch.counts), labels.shape[1], points.shape[1])
            for b, n in enumerate(batch.counts):  # one sample's masks in float at a time
                if n:
                    tgt[b, :n] = point_sample_channels(batch.masks[b][None], points[b][None])[0]
            tgt = tgt[sample_of]
            mask_cost = (self.cost_mask * pairwise_bce(pred, tgt)
                         + self.cost_dice * pairwise_dice(pred, tgt))
            cost = cost + torch.where(with_masks[:, None, None], mask_cost, 0.0)
        return cost

    @torch.no_grad()
    def cost_matrix(self, logits: Tensor, boxes: Tensor, masks: Tensor | None, target: dict,
                    points: Tensor | None = None, noobj: Tensor | None = None) -> Tensor:
        """Cost (Q, M) of one image. logits (Q, K_i), boxes (Q, 4), masks (Q, h, w) or None (no
        mask cost). points (P, 2) in [0, 1] for the mask cost; random uniform when None.
        noobj (Q,) no-object logits: the softmax class cost instead of the focal one."""
        outputs = {"pred_logits": logits[None], "pred_boxes": boxes[None]}
        if masks is not None:
            outputs["pred_masks"] = masks[None]
        if noobj is not None:
            outputs["pred_noobj"] = noobj[None]
        target = dict(target, has_masks=masks is not None and target["has_masks"])
        batch = TargetBatch.from_targets([target], logits.device)
        zero = torch.zeros(1, dtype=torch.long, device=logits.device)
        return self.batched_cost(outputs, batch, zero,
                                 None if points is None else points[None])[0]

    @torch.no_grad()
    def match(self, outputs: dict, batch: TargetBatch,
              sample_of: Tensor) -> list[tuple[Tensor, Tensor]]:
        """(query_index, target_index) pairs of each of N items (see batched_cost)."""
        cost = self.batched_cost(outputs, batch, sample_of)
        finite = torch.isfinite(cost).flatten(1).all(1)
        cost, finite = cost.cpu().numpy(), finite.cpu().tolist()
        indices = []
        for n, b in enumerate(sample_of.tolist()):
            m = batch.counts[b]
            if m == 0:
                empty = torch.zeros(0, dtype=torch.long)
                indices.append((empty, empty.clone()))
                continue
            if not finite[n] and not torch.isfinite(torch.from_numpy(cost[n, :, :m])).all():
                raise ValueError(f"non-finite matching cost for sample {b} (task "
                                 f"{batch.targets[b].get('task')}): check predictions and boxes")
            rows, cols = linear_sum_assignment(cost[n, :, :m])
            indices.append((torch.as_tensor(rows, dtype=torch.long),
                            torch.as_tensor(cols, dtype=torch.long)))
        return indices

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        device = outputs["pred_logits"].device
        batch = TargetBatch.from_targets(targets, device)
        return self.match(outputs, batch, torch.arange(len(targets), device=device))
