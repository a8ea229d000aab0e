"""Inference per task, from the outputs of one sample (Mask DINO / Mask2Former recipes).

Every function takes one sample's class logits (Q, K) against its own texts, mask logits
(Q, h, w) at stride 4 and, where needed, boxes (Q, 4) cxcywh in [0, 1], plus `size` = (H, W) of the
padded input image; masks are resampled to that size (crop to the unpadded image afterwards).
`postprocess(outputs, tasks, size)` runs the right one for every sample of a batch; model/tasks.py
names each task's function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.box_ops import cxcywh_to_xyxy
from model.heads import inference_logits


def upsample(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """(Q, h, w) mask logits -> (Q, H, W) bilinear."""
    if not len(masks):  # interpolate refuses zero channels (an all-stuff instance vocabulary)
        return masks.new_zeros((0, *size), dtype=torch.float32)
    return F.interpolate(masks[None].float(), size=size, mode="bilinear", align_corners=False)[0]


def to_pixels_xyxy(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, 4) cxcywh in [0, 1] -> (N, 4) xyxy in pixels of an (H, W) image."""
    h, w = size
    return cxcywh_to_xyxy(boxes.float()) * boxes.new_tensor([w, h, w, h]).float()


def _top_pairs(logits: Tensor, top_k: int,
               is_thing: list[bool] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k (query, text) pairs by sigmoid score -> scores, query index, text index.

    is_thing (K,): stuff texts are not instances, so their pairs are left out (Mask2Former's
    instance inference of a panoptic model keeps thing classes only); None keeps every text.
    """
    texts = torch.arange(logits.shape[1], device=logits.device)
    if is_thing is not None:
        texts = texts[torch.tensor(is_thing, dtype=torch.bool, device=logits.device)]
    scores = logits[:, texts].float().sigmoid()
    flat_scores, flat = scores.flatten().topk(min(top_k, scores.numel()))
    return flat_scores, flat // scores.shape[1], texts[flat % scores.shape[1]]


def instance_inference(logits: Tensor, masks: Tensor, boxes: Tensor, size: tuple[int, int],
                       top_k: int = 100, is_thing: list[bool] | None = None) -> dict[str, Tensor]:
    """Top-k over queries x thing texts; score = class prob x mean mask prob inside the binary
    mask (is_thing per text; None: every text is a thing).

    -> scores (N,), labels (N,) text index, masks (N, H, W) bool, boxes (N, 4) xyxy pixels.
    """
    cls_scores, query, label = _top_pairs(logits, top_k, is_thing)
    mask_logits = upsample(masks[query], size)
    binary = mask_logits > 0
    prob = mask_logits.sigmoid()
    mask_scores = (prob * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return {"scores": cls_scores * mask_scores, "labels": label, "masks": binary,
            "boxes": to_pixels_xyxy(boxes[query], size)}


def detection_inference(logits: Tensor, masks: Tensor, boxes: Tensor, size: tuple[int, int],
                        top_k: int = 100, is_thing: list[bool] | None = None) -> dict[str, Tensor]:
    """Top-k over queries x thing texts by class prob -> scores, labels, boxes (N, 4) xyxy px."""
    scores, query, label = _top_pairs(logits, top_k, is_thing)
    return {"scores": scores, "labels": label, "boxes": to_pixels_xyxy(boxes[query], size)}


def semantic_inference(logits: Tensor, masks: Tensor, boxes: Tensor, size: tuple[int, int],
                       temperature: float = 0.06) -> dict[str, Tensor]:
    """Mask DINO: sum_q softmax(sigmoid(logits) / T)[q, k] * sigmoid(mask_q).

    -> scores (K, H, W) per-text score map, labels (H, W) long arg-max text index.
    """
    cls = F.softmax(logits.float().sigmoid() / temperature, dim=-1)
    scores = torch.einsum("qk,qhw->khw", cls, upsample(masks, size).sigmoid())
    return {"scores": scores, "labels": scores.argmax(0)}


def panoptic_inference(logits: Tensor, masks: Tensor, boxes: Tensor, size: tuple[int, int],
                       is_thing: list[bool] | None = None, object_mask_threshold: float = 0.25,
                       overlap_threshold: float = 0.8) -> dict:
    """Mask2Former merge: keep confident queries, give each pixel to the query with the highest
    score x mask prob, drop segments mostly hidden by others, merge stuff segments of one text.

    is_thing: per text (K,); None treats every text as a thing (no merging).
    -> segments (H, W) int32 (0 = void, i = segment i), info: list of {id, label, score, is_thing}.
    """
    scores, labels = logits.float().sigmoid().max(-1)
    keep = scores > object_mask_threshold
    if not bool(keep.any()):  # interpolate refuses an empty batch
        return {"segments": torch.zeros(size, dtype=torch.int32, device=masks.device), "info": []}
    probs = upsample(masks[keep], size).sigmoid()
    scores, labels = scores[keep], labels[keep]
    segments = torch.zeros(size, dtype=torch.int32, device=masks.device)
    info: list[dict] = []
    if probs.shape[0] == 0:
        return {"segments": segments, "info": info}
    owner = (scores[:, None, None] * probs).argmax(0)
    stuff_ids: dict[int, int] = {}
    for k in range(probs.shape[0]):
        label = int(labels[k])
        thing = True if is_thing is None else bool(is_thing[label])
        region = (owner == k) & (probs[k] >= 0.5)
        original = int((probs[k] >= 0.5).sum())
        if original == 0 or int(region.sum()) == 0:
            continue
        if int((owner == k).sum()) / original < overlap_threshold:
            continue
        if not thing and label in stuff_ids:
            segments[region] = stuff_ids[label]
            continue
        seg_id = len(info) + 1
        segments[region] = seg_id
        info.append({"id": seg_id, "label": label, "score": float(scores[k]), "is_thing": thing})
        if not thing:
            stuff_ids[label] = seg_id
    return {"segments": segments, "info": info}


def referring_inference(logits: Tensor, masks: Tensor, boxes: Tensor,
                        size: tuple[int, int]) -> dict[str, Tensor]:
    """Each expression (text) takes the query that scores it highest.

    -> masks (K, H, W) bool, scores (K,), boxes (K, 4) xyxy pixels, query (K,) chosen query.
    """
    best = logits.float().argmax(0)  # (K,)
    scores = logits.float().sigmoid()[best, torch.arange(logits.shape[1], device=logits.device)]
    return {"masks": upsample(masks[best], size) > 0, "scores": scores,
            "boxes": to_pixels_xyxy(boxes[best], size), "query": best}


def foreground_inference(logits: Tensor, masks: Tensor, boxes: Tensor,
                         size: tuple[int, int]) -> dict[str, Tensor]:
    """Fixed prompt (the sample's first text, e.g. "foreground object"): the best query's
    sigmoid mask -> prob (H, W) float in [0, 1] (saliency maps are scored by MSE), score."""
    best = int(logits[:, 0].float().argmax())
    return {"prob": upsample(masks[best:best + 1], size)[0].sigmoid(),
            "score": logits[best, 0].float().sigmoid()}


@torch.no_grad()
def postprocess(outputs: dict, tasks: list[str], size: tuple[int, int],
                options: dict[str, dict] | None = None) -> list[dict]:
    """Run each sample's task inference. outputs: MQFormer.forward's dict; tasks: one per sample;
    options: extra keyword arguments per task (e.g. {"panoptic": {"is_thing": [...]}}).
    A softmax model's logits are converted first (model/heads.py inference_logits)."""
    from model.tasks import TASKS  # the task records hold these functions: import at call time

    logits = inference_logits(outputs)
    results = []
    for b, task in enumerate(tasks):
        if task not in TASKS:
            raise ValueError(f"unknown task '{task}' for sample {b}; choose one of: "
                             f"{', '.join(TASKS)}")
        n_texts = int(outputs["text_mask"][b].sum())
        results.append(TASKS[task].infer(
            logits[b, :, :n_texts], outputs["pred_masks"][b],
            outputs["pred_boxes"][b], size, **(options or {}).get(task, {})))
    return results
