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
from model.matcher import HungarianMatcher, TargetBatch
from model.points import grid_points, point_sample, sample_matched, uncertain_points
from model.queries import QUERY_TYPES

DEFAULT_WEIGHTS = {"loss_class": 4.0, "loss_mask": 5.0, "loss_dice": 5.0, "loss_bbox": 5.0,
                   "loss_giou": 2.0}


def mask_losses(logits: Tensor, targets: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
    """BCE and dice of matched masks on the given points, one value per mask.

    logits (n, h, w) mask logits, targets (n, P) the target masks' values at the points,
    points (n, P, 2) in [0, 1] (x, y). BCE is the mean over points per mask;
    dice = 1 - (2 p.t + 1) / (sum p + sum t + 1). Returns (bce (n,), dice (n,)).
    """
    pred = point_sample(logits, points)
    bce = F.binary_cross_entropy_with_logits(pred, targets, reduction="none").mean(1)
    prob = pred.sigmoid()
    dice = 1 - (2 * (prob * targets).sum(1) + 1) / (prob.sum(1) + targets.sum(1) + 1)
    return bce, dice


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


def _flat_matches(indices: list[tuple[Tensor, Tensor]],
                  device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The matches of N items as three (T,) long tensors: item, query (src) and target (tgt)."""
    items = [torch.full((len(src),), n, dtype=torch.long) for n, (src, _) in enumerate(indices)]
    return (torch.cat(items).to(device), torch.cat([s for s, _ in indices]).to(device),
            torch.cat([t for _, t in indices]).to(device))


class SetCriterion(nn.Module):
    """forward(outputs, targets) -> (losses dict of scalar tensors incl. "loss", match counts).

    The decoder stages (same queries, same targets) are stacked along the batch dimension and
    matched and scored in one pass (items, see model/matcher.py); each term is summed per item and
    the items of a stage make its loss."""

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

    def item_terms(self, outputs: dict, batch: TargetBatch, sample_of: Tensor,
                   indices: list[tuple[Tensor, Tensor]],
                   points: list[Tensor | None] | None = None) -> dict[str, Tensor]:
        """Each loss term summed per item (N,): class (sigmoid focal over the item's own texts; with
        pred_noobj the weighted cross-entropy, and class_weight its weights' sum), bbox, giou and,
        for samples with masks, mask and dice. points: optional per item (n_matched, P, 2) mask
        points (tests); importance-sampled when None."""
        # float32 losses even when the forward ran under bf16 autocast
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        masks = outputs["pred_masks"]  # converted after the gather: only matched masks
        n, q, k = logits.shape
        # every term hangs on the outputs, so that a stage without matches still has a gradient
        zero = (logits[torch.isfinite(logits)].sum() + boxes.sum() + masks.sum()) * 0.0
        terms = {name: zero + logits.new_zeros(n) for name in ("bbox", "giou", "mask", "dice")}
        item, src, tgt = _flat_matches(indices, logits.device)
        sample = sample_of[item]
        labels = batch.labels[sample, tgt]
        if "pred_noobj" in outputs:
            scores = torch.cat([logits, outputs["pred_noobj"].float()[..., None]], -1)
            classes = torch.full((n, q), k, dtype=torch.long, device=logits.device)
            classes[item, src] = labels
            weight = logits.new_ones(k + 1)
            weight[k] = self.eos_coef
            terms["class"] = F.cross_entropy(scores.flatten(0, 1), classes.flatten(), weight,
                                             reduction="none").view(n, q).sum(1)
            terms["class_weight"] = weight[classes].sum(1)
        else:
            texts = (torch.arange(k, device=logits.device)[None]
                     < batch.n_texts[sample_of][:, None])[:, None, :]  # (N, 1, K) real texts
            onehot = torch.zeros_like(logits)
            onehot[item, src, labels] = 1.0
            focal = sigmoid_focal_loss(torch.where(texts, logits, 0.0), onehot, self.alpha,
                                       self.gamma, reduction="none")
            terms["class"] = zero + (focal * texts).sum((1, 2))
        if len(item) == 0:
            return terms
        src_boxes, tgt_boxes = boxes[item, src], batch.boxes[sample, tgt].to(boxes)
        terms["bbox"] = terms["bbox"].index_add(0, item, (src_boxes - tgt_boxes).abs().sum(1))
        giou = giou_cxcywh(src_boxes[:, None], tgt_boxes[:, None])[:, 0, 0]
        terms["giou"] = terms["giou"].index_add(0, item, 1 - giou)
        masked = batch.has_masks[sample]
        if bool(masked.any()):
            m_item, src_masks = item[masked], masks[item[masked], src[masked]].float()
            if points is not None:
                pts = torch.cat([points[i] for i in m_item.unique_consecutive().tolist()])
            elif self.full_mask:
                pts = grid_points(len(m_item), *src_masks.shape[-2:], device=src_masks.device)
            else:
                pts = uncertain_points(src_masks, self.num_points, self.oversample,
                                       self.importance)
            values = sample_matched(batch.masks, sample[masked], tgt[masked], pts)
            bce, dice = mask_losses(src_masks, values, pts)
            terms["mask"] = terms["mask"].index_add(0, m_item, bce.to(logits.dtype))
            terms["dice"] = terms["dice"].index_add(0, m_item, dice.to(logits.dtype))
        return terms

    @staticmethod
    def reduce_terms(terms: dict[str, Tensor], items: slice, num_boxes: float,
                     num_masks: float) -> dict[str, Tensor]:
        """The five loss terms of the items of one stage: sums over its items / num_boxes (class
        focal, boxes) or num_masks (masks); the softmax class loss is the weighted mean over
        every query of the stage."""
        if "class_weight" in terms:
            loss_class = (terms["class"][items].sum()
                          / terms["class_weight"][items].sum().clamp(min=1e-12))
        else:
            loss_class = terms["class"][items].sum() / num_boxes
        return {"loss_class": loss_class, "loss_mask": terms["mask"][items].sum() / num_masks,
                "loss_dice": terms["dice"][items].sum() / num_masks,
                "loss_bbox": terms["bbox"][items].sum() / num_boxes,
                "loss_giou": terms["giou"][items].sum() / num_boxes}

    def stage_losses(self, outputs: dict, targets: list[dict], indices: list[tuple[Tensor, Tensor]],
                     num_boxes: float, num_masks: float,
                     points: list[Tensor | None] | None = None) -> dict[str, Tensor]:
        """The five loss terms of one prediction stage for given matches. points: optional per
        sample (n_matched, P, 2) mask points (tests); importance-sampled when None."""
        device = outputs["pred_logits"].device
        batch = TargetBatch.from_targets(targets, device)
        sample_of = torch.arange(len(targets), device=device)
        terms = self.item_terms(outputs, batch, sample_of, indices, points)
        return self.reduce_terms(terms, slice(None), num_boxes, num_masks)

    def forward(self, outputs: dict, targets: list[dict]) -> tuple[dict[str, Tensor],
                                                                   dict[str, float]]:
        check_targets(targets, outputs["pred_logits"].shape[-1])
        device = outputs["pred_logits"].device
        num_boxes = _global_count(sum(len(t["labels"]) for t in targets), device)
        num_masks = _global_count(sum(len(t["labels"]) for t in targets if t["has_masks"]), device)
        batch = TargetBatch.from_targets(targets, device)
        stages = prediction_stages(outputs)
        losses: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        for group in _stackable(stages):
            stacked, sample_of = _stack([stage for _, stage in group], len(targets))
            indices = self.matcher.match(stacked, batch, sample_of)
            terms = self.item_terms(stacked, batch, sample_of, indices)
            for i, (suffix, _) in enumerate(group):
                items = slice(i * len(targets), (i + 1) * len(targets))
                if suffix == "":
                    counts = count_matches_by_type(indices[items], outputs["query_types"], targets)
                    counts.update(class_diagnostics(outputs, targets, indices[items]))
                for k, v in self.reduce_terms(terms, items, num_boxes, num_masks).items():
                    losses[k + suffix] = v
        if "dn_outputs" in outputs:
            self._dn_losses(stages, batch, outputs, num_boxes, num_masks, losses)
        losses["loss"] = sum(self.weights[_term(k)] * v for k, v in losses.items())
        return losses, counts

    def _dn_losses(self, stages: list[tuple[str, dict]], batch: TargetBatch, outputs: dict,
                   num_boxes: float, num_masks: float, losses: dict) -> None:
        """Adds the denoising terms of every stage that has dn_outputs to `losses`, stacked as the
        matching stages are (their queries pair one-to-one with the targets: no matching)."""
        groups, per_group = outputs["dn_groups"], outputs["dn_per_group"]
        dn = [(suffix, stage["dn_outputs"]) for suffix, stage in stages if "dn_outputs" in stage]
        b = len(batch.counts)
        pairs = dn_indices(batch.targets, groups, per_group)
        for group in _stackable(dn):
            stacked, sample_of = _stack([stage for _, stage in group], b)
            terms = self.item_terms(stacked, batch, sample_of, pairs * len(group))
            for i, (suffix, _) in enumerate(group):
                terms_i = self.reduce_terms(terms, slice(i * b, (i + 1) * b), num_boxes * groups,
                                            num_masks * groups)
                for k, v in terms_i.items():
                    losses[f"{k}_dn{suffix}"] = v


def prediction_stages(outputs: dict) -> list[tuple[str, dict]]:
    """(loss-key suffix, outputs) of every stage the criterion scores: the final layer "", the
    earlier decoder stages "_0", "_1", ... and the encoder proposals "_interm"."""
    stages = [("", outputs)]
    stages += [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
    if "interm_outputs" in outputs:
        stages.append(("_interm", outputs["interm_outputs"]))
    return stages


STACKED_KEYS = ("pred_logits", "pred_boxes", "pred_masks", "pred_noobj")


def _term(key: str) -> str:
    """The weight name of a loss key: loss_mask_3 -> loss_mask, loss_bbox_dn_interm -> loss_bbox."""
    return next(name for name in DEFAULT_WEIGHTS if key == name or key.startswith(name + "_"))


# Stages are stacked only while their masks stay this small (elements): the stack is a copy, and
# full-size masks (hundreds of queries at 256x256, ten stages) would double the largest tensors
# of a training step. Larger stages are scored one at a time, still batched over samples.
STACK_ELEMENTS = 2**25


def _stackable(stages: list[tuple[str, dict]]) -> list[list[tuple[str, dict]]]:
    """Stages grouped by what stacking needs alike (query count, the keys), in first-seen order
    (the decoder stages, then the encoder proposals, which have fewer queries), each group's masks
    at most STACK_ELEMENTS (a stage larger than that alone)."""
    groups: list[tuple[tuple, int, list]] = []  # (key, mask elements so far, members)
    for suffix, stage in stages:
        key = (stage["pred_logits"].shape[1], tuple(k for k in STACKED_KEYS if k in stage))
        size = stage["pred_masks"].numel()
        for i, (other, total, members) in enumerate(groups):
            if other == key and total + size <= STACK_ELEMENTS:
                groups[i] = (key, total + size, members + [(suffix, stage)])
                break
        else:
            groups.append((key, size, [(suffix, stage)]))
    return [members for _, _, members in groups]


def _stack(stages: list[dict], batch_size: int) -> tuple[dict, Tensor]:
    """S stages of B samples as one of S * B items, and each item's sample index."""
    keys = [k for k in STACKED_KEYS if k in stages[0]]
    stacked = {k: torch.cat([s[k] for s in stages]) if len(stages) > 1 else stages[0][k]
               for k in keys}
    device = stacked["pred_logits"].device
    return stacked, torch.arange(len(stages) * batch_size, device=device) % batch_size


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
