"""Set-prediction loss of MQ-Former (Mask DINO's terms and weights).

For every prediction stage (final layer, each earlier stage = deep supervision, and the encoder
proposals) the matcher assigns queries to targets, then:
  loss_class: sigmoid focal loss over all (query, text) pairs of the sample's own texts, a matched
              query's positive being its target's text; sum / num_boxes. When the outputs carry
              pred_noobj (class_loss "softmax", model/build.py): Mask2Former's cross-entropy over
              [the sample's texts, no-object], target the matched text or no-object, no-object
              weighted eos_coef (0.1); the weighted mean over every query of the batch.
  loss_mask, loss_dice: sigmoid BCE (mean over points) and dice on importance-sampled points of
              the matched masks; sum / num_masks. Box-only samples (has_masks False) are left out.
  loss_bbox, loss_giou: L1 and 1 - GIoU of the matched boxes (cxcywh in [0, 1]); sum / num_boxes.
Keys of earlier stages get a suffix `_0`, `_1`, ... and the encoder proposals `_interm`.
Denoising queries (model/denoising.py; present when the model was given targets with dn_groups
> 0) get the same five terms against the target they are a noised copy of (no matching: query
g * m + j <-> target j), normalised by groups x targets, under keys `<term>_dn`, `<term>_dn_0`, ...
`loss` is the weighted total. The criterion also counts (the second value it returns), on the
final stage, which query type matched each target, split by the target's is_thing flag (the paper's
thing/stuff diagnostic), and, under `class/` keys, the sums behind matched-query class accuracy and
the texts' mean pairwise cosine (`class_diagnostics`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from model.box_ops import giou_cxcywh
from model.denoising import dn_indices
from model.matcher import HungarianMatcher
from model.points import grid_points, point_sample, uncertain_points
from model.queries import QUERY_TYPES

DEFAULT_WEIGHTS = {"loss_class": 4.0, "loss_mask": 5.0, "loss_dice": 5.0, "loss_bbox": 5.0,
                   "loss_giou": 2.0}


def mask_losses(logits: Tensor, targets: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
    """Summed (not normalised) BCE and dice of matched masks on the given points.

    logits (n, h, w) mask logits, targets (n, H, W) {0, 1}, points (n, P, 2) in [0, 1] (x, y).
    BCE is the mean over points per mask; dice = 1 - (2 p.t + 1) / (sum p + sum t + 1).
    Returns (bce summed over masks, dice summed over masks).
    """
    pred = point_sample(logits, points)
    with torch.no_grad():
        tgt = point_sample(targets.to(points.dtype), points)
    bce = F.binary_cross_entropy_with_logits(pred, tgt, reduction="none").mean(1).sum()
    prob = pred.sigmoid()
    dice = 1 - (2 * (prob * tgt).sum(1) + 1) / (prob.sum(1) + tgt.sum(1) + 1)
    return bce, dice.sum()


def _global_count(n: float, device: torch.device) -> float:
    """Average of a count over DDP ranks (the normaliser every rank divides by), at least 1."""
    t = torch.tensor(float(n), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t = t / dist.get_world_size()
    return max(t.item(), 1.0)


def count_matches_by_type(indices: list[tuple[Tensor, Tensor]], query_types: Tensor,
                          targets: list[dict]) -> dict[str, int]:
    """How many matched targets each query type took, split by is_thing.

    -> {"conditional/thing": n, "conditional/stuff": n, "learnable/thing": n, "learnable/stuff": n}.
    """
    counts = {f"{q}/{k}": 0 for q in QUERY_TYPES for k in ("thing", "stuff")}
    for (src, tgt), target in zip(indices, targets, strict=True):
        types = query_types.cpu()[src]
        things = target["is_thing"].cpu()[tgt].bool()
        for t, name in enumerate(QUERY_TYPES):
            counts[f"{name}/thing"] += int(((types == t) & things).sum())
            counts[f"{name}/stuff"] += int(((types == t) & ~things).sum())
    return counts


def class_diagnostics(outputs: dict, targets: list[dict],
                      indices: list[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """Sums behind two health signs of the text classifier (issue 11: it collapsed unseen):

    class/correct, class/total: matched queries whose highest-scoring text is their target's text,
        over samples with >= 2 texts (with one text every query is trivially "right");
    class/cosine_sum, class/cosine_n: cosine between the projected embeddings of every pair of a
        sample's texts (the class head compares queries against these; near 1 = indistinguishable).
    """
    out = {"class/correct": 0, "class/total": 0, "class/cosine_sum": 0.0, "class/cosine_n": 0}
    logits = outputs["pred_logits"].detach()
    emb = outputs.get("text_embed")
    for b, ((src, tgt), target) in enumerate(zip(indices, targets, strict=True)):
        k = len(target["texts"])
        if k < 2:
            continue
        if len(src):
            predicted = logits[b, src.to(logits.device), :k].argmax(-1).cpu()
            out["class/correct"] += int((predicted == target["labels"].cpu()[tgt.cpu()]).sum())
            out["class/total"] += len(src)
        if emb is not None:
            unit = F.normalize(emb[b, :k].detach().float(), dim=-1)
            cos = unit @ unit.T
            out["class/cosine_sum"] += float(cos.sum() - cos.diagonal().sum())
            out["class/cosine_n"] += k * (k - 1)
    return out


def softmax_class_loss(logits: Tensor, noobj: Tensor, targets: list[dict],
                       indices: list[tuple[Tensor, Tensor]], eos_coef: float) -> Tensor:
    """Mask2Former's class loss: cross-entropy of every query over [its sample's texts,
    no-object], the matched text the target of a matched query and no-object the target of the
    rest, weights 1 per text and eos_coef for no-object; sum of weighted losses / sum of the
    targets' weights (F.cross_entropy's weighted mean, over the whole batch).

    logits (B, Q, K_max) with padded slots (sliced away per sample), noobj (B, Q)."""
    total = logits.new_zeros(())
    weight_sum = logits.new_zeros(())
    for b, ((src, tgt), target) in enumerate(zip(indices, targets, strict=True)):
        n_texts = len(target["texts"])
        scores = torch.cat([logits[b, :, :n_texts], noobj[b, :, None]], -1)  # (Q, n_texts + 1)
        classes = torch.full((scores.shape[0],), n_texts, dtype=torch.long, device=scores.device)
        classes[src.to(scores.device)] = target["labels"][tgt].to(scores.device)
        weight = scores.new_ones(n_texts + 1)
        weight[n_texts] = eos_coef
        total = total + F.cross_entropy(scores, classes, weight, reduction="sum")
        weight_sum = weight_sum + weight[classes].sum()
    return total / weight_sum.clamp(min=1e-12)


class SetCriterion(nn.Module):
    """forward(outputs, targets) -> (losses dict of scalar tensors incl. "loss", match counts)."""

    def __init__(self, matcher: HungarianMatcher | None = None,
                 weights: dict[str, float] | None = None, num_points: int = 12544,
                 oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 alpha: float = 0.25, gamma: float = 2.0, full_mask: bool = False,
                 eos_coef: float = 0.1):
        """full_mask: the mask losses on every pixel of the stride-4 prediction (targets read at
        the pixel centres) instead of num_points importance-sampled points. eos_coef: the
        no-object class's weight in the softmax class loss (Mask2Former's 0.1: most queries are
        unmatched, and at weight 1 they would drown the matched ones)."""
        super().__init__()
        self.full_mask, self.eos_coef = full_mask, eos_coef
        self.matcher = matcher if matcher is not None else HungarianMatcher(num_points=num_points)
        self.weights = dict(DEFAULT_WEIGHTS, **(weights or {}))
        unknown = set(self.weights) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; "
                             f"valid: {list(DEFAULT_WEIGHTS)}")
        self.num_points, self.oversample, self.importance = (num_points, oversample_ratio,
                                                             importance_sample_ratio)
        self.alpha, self.gamma = alpha, gamma

    def stage_losses(self, outputs: dict, targets: list[dict], indices: list[tuple[Tensor, Tensor]],
                     num_boxes: float, num_masks: float,
                     points: list[Tensor] | None = None) -> dict[str, Tensor]:
        """The five loss terms of one prediction stage for given matches. points: optional per
        sample (n_matched, P, 2) mask points (tests); importance-sampled when None."""
        # float32 losses even when the forward ran under bf16 autocast
        logits, boxes, masks = (outputs[k].float() for k in ("pred_logits", "pred_boxes",
                                                              "pred_masks"))
        noobj = outputs["pred_noobj"].float() if "pred_noobj" in outputs else None
        zero = (logits[torch.isfinite(logits)].sum() + boxes.sum() + masks.sum()) * 0.0
        loss = {k: zero.clone() for k in DEFAULT_WEIGHTS}
        for b, ((src, tgt), target) in enumerate(zip(indices, targets, strict=True)):
            if noobj is None:
                n_texts = len(target["texts"])
                sample_logits = logits[b, :, :n_texts]
                onehot = torch.zeros_like(sample_logits)
                onehot[src.to(onehot.device), target["labels"][tgt].to(onehot.device)] = 1.0
                loss["loss_class"] = loss["loss_class"] + sigmoid_focal_loss(
                    sample_logits, onehot, self.alpha, self.gamma, reduction="sum")
            if len(src) == 0:
                continue
            src_boxes, tgt_boxes = boxes[b, src], target["boxes"][tgt].to(boxes)
            loss["loss_bbox"] = loss["loss_bbox"] + (src_boxes - tgt_boxes).abs().sum()
            giou = torch.diag(giou_cxcywh(src_boxes.float(), tgt_boxes.float()))
            loss["loss_giou"] = loss["loss_giou"] + (1 - giou).sum()
            if target["has_masks"]:
                src_masks = masks[b, src]
                if points is not None:
                    pts = points[b]
                elif self.full_mask:
                    pts = grid_points(len(src), *src_masks.shape[-2:], device=src_masks.device)
                else:
                    pts = uncertain_points(src_masks, self.num_points, self.oversample,
                                           self.importance)
                tgt_masks = target["masks"][tgt].to(src_masks.device)
                bce, dice = mask_losses(src_masks, tgt_masks, pts)
                loss["loss_mask"] = loss["loss_mask"] + bce
                loss["loss_dice"] = loss["loss_dice"] + dice
        for k in ("loss_class", "loss_bbox", "loss_giou"):
            loss[k] = loss[k] / num_boxes
        for k in ("loss_mask", "loss_dice"):
            loss[k] = loss[k] / num_masks
        if noobj is not None:  # a weighted mean already: no num_boxes
            loss["loss_class"] = softmax_class_loss(logits, noobj, targets, indices, self.eos_coef)
        return loss

    def forward(self, outputs: dict, targets: list[dict]) -> tuple[dict[str, Tensor],
                                                                   dict[str, float]]:
        check_targets(targets, outputs["pred_logits"].shape[-1])
        device = outputs["pred_logits"].device
        num_boxes = _global_count(sum(len(t["labels"]) for t in targets), device)
        num_masks = _global_count(sum(len(t["labels"]) for t in targets if t["has_masks"]), device)
        stages = [("", outputs)]
        stages += [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        if "interm_outputs" in outputs:
            stages.append(("_interm", outputs["interm_outputs"]))
        losses: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        total = outputs["pred_boxes"].new_zeros(())
        for suffix, stage in stages:
            indices = self.matcher(stage, targets)
            if suffix == "":
                counts = count_matches_by_type(indices, outputs["query_types"], targets)
                counts.update(class_diagnostics(outputs, targets, indices))
            for k, v in self.stage_losses(stage, targets, indices, num_boxes, num_masks).items():
                losses[k + suffix] = v
                total = total + self.weights[k] * v
        if "dn_outputs" in outputs:
            total = total + self._dn_losses(stages, targets, outputs, num_boxes, num_masks, losses)
        losses["loss"] = total
        return losses, counts

    def _dn_losses(self, stages: list[tuple[str, dict]], targets: list[dict], outputs: dict,
                   num_boxes: float, num_masks: float, losses: dict) -> Tensor:
        """Adds the denoising terms of every stage that has dn_outputs to `losses`; returns their
        weighted sum."""
        groups, per_group = outputs["dn_groups"], outputs["dn_per_group"]
        indices = dn_indices(targets, groups, per_group)
        total = outputs["pred_boxes"].new_zeros(())
        for suffix, stage in stages:
            if "dn_outputs" not in stage:
                continue
            terms = self.stage_losses(stage["dn_outputs"], targets, indices, num_boxes * groups,
                                      num_masks * groups)
            for k, v in terms.items():
                losses[f"{k}_dn{suffix}"] = v
                total = total + self.weights[k] * v
        return total


def check_targets(targets: list[dict], k_max: int) -> None:
    """Raise ValueError naming the sample and field for a target that breaks the batch interface."""
    for i, t in enumerate(targets):
        missing = {"texts", "labels", "boxes", "masks", "has_masks", "is_thing"} - set(t)
        if missing:
            raise ValueError(f"target {i} lacks {sorted(missing)}")
        m, k = len(t["labels"]), len(t["texts"])
        if k > k_max:
            raise ValueError(f"target {i} has {k} texts but the outputs only {k_max}")
        if m and (int(t["labels"].min()) < 0 or int(t["labels"].max()) >= k):
            raise ValueError(f"target {i}: labels must index its {k} texts, got {t['labels']}")
        if t["boxes"].shape != (m, 4) or len(t["is_thing"]) != m:
            raise ValueError(f"target {i}: boxes {tuple(t['boxes'].shape)} / is_thing "
                             f"{len(t['is_thing'])} do not match {m} labels")
        if t["has_masks"] and t["masks"].shape[0] != m:
            raise ValueError(f"target {i}: {t['masks'].shape[0]} masks for {m} labels")
