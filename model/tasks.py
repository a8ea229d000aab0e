"""One record per task: its targets, its inference, its mapping back to the image, its metric.

    task = task_record("instance")
    plan = plan_targets(objs, "instance", vocab, rng)             # targets (model/targets.py)
    pred = task.original(output, geometry, top_k=100)             # inference + original frame
    metric = task.metric(vocab, is_thing); metric.add(gt, pred)   # streaming (model/evaluate.py)

Every user of a task (the training loader, iter_eval_samples, the Evaluator, `engine predict`, the
mqformer masker) goes through `TASKS`; adding a task is adding one record here.

`original(output, geo, **options)` takes one sample's model output (pred_logits (Q, K) against its
own texts, pred_masks (Q, S/4, S/4), pred_boxes (Q, 4) cxcywh in [0, 1] of the padded input) and
returns numpy predictions on the original (height, width) image:

    instance:   scores (N,), labels (N,) text index, boxes (N, 4) xywh px, masks (N, h, w) bool
    detection:  scores, labels, boxes
    semantic:   labels (h, w) int32 text index (arg-max of the per-text score maps)
    panoptic:   segments (h, w) int32 (0 void, i = info[i-1]["id"]), info [{id, label, score,
                is_thing}]
    referring:  scores (K,), boxes (K, 4) xywh px, masks (K, h, w) bool, one per text
    foreground: prob (h, w) float32 in [0, 1], score

Options a task does not take are ignored (instance/detection: top_k, is_thing; panoptic: is_thing).
is_thing is per text, None = all things: instance and detection leave stuff texts out, panoptic
merges the segments of a stuff text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from model import metrics as M
from model import postprocess as P
from model import targets as G
from model import transforms as T
from model.frames import boxes_to_original, masks_to_original, segments_to_original, to_numpy


@dataclass(frozen=True)
class Task:
    name: str
    vocabulary: bool        # texts are the class templates of the dataset's vocabulary
    plan: Callable          # (objs, texts, index, rng, eval_mode) -> targets.Plan | None
    infer: Callable         # model/postprocess.py: (logits, masks, boxes, size, **opts) -> dict
    to_original: Callable   # (inference dict, geometry) -> numpy predictions (module docstring)
    metric: Callable        # (vocab, is_thing) -> streaming metric with add(gt, pred), result()
    options: tuple[str, ...] = ()   # keyword options `infer` takes
    crowd_gt: bool = False  # eval GT keeps crowd objects as ignore regions
    gt_masks: bool = True   # eval GT carries masks (detection: boxes only)

    def original(self, output: dict, geo: T.Geometry, **options) -> dict:
        """One sample's model output -> predictions on the original image."""
        chosen = {k: v for k, v in options.items() if k in self.options}
        pred = self.infer(output["pred_logits"], output["pred_masks"], output["pred_boxes"],
                          (geo.size, geo.size), **chosen)
        return self.to_original(pred, geo)


def _things(pred: dict, geo: T.Geometry) -> dict:
    out = {"scores": to_numpy(pred["scores"]), "labels": to_numpy(pred["labels"]).astype(np.int64),
           "boxes": boxes_to_original(pred["boxes"], geo)}
    if "masks" in pred:
        out["masks"] = masks_to_original(pred["masks"], geo)
    return out


def _semantic(pred: dict, geo: T.Geometry) -> dict:
    return {"labels": masks_to_original(pred["scores"], geo).argmax(0).astype(np.int32)}


def _panoptic(pred: dict, geo: T.Geometry) -> dict:
    return {"segments": segments_to_original(pred["segments"], geo), "info": pred["info"]}


def _referring(pred: dict, geo: T.Geometry) -> dict:
    return {"scores": to_numpy(pred["scores"]), "boxes": boxes_to_original(pred["boxes"], geo),
            "masks": masks_to_original(pred["masks"], geo)}


def _foreground(pred: dict, geo: T.Geometry) -> dict:
    prob = np.clip(masks_to_original(pred["prob"][None], geo)[0], 0.0, 1.0)
    return {"prob": prob.astype(np.float32), "score": float(pred["score"])}


TASKS: dict[str, Task] = {
    "instance": Task("instance", True, partial(G.plan_things, with_masks=True),
                     P.instance_inference, _things, M.InstanceMetric, ("top_k", "is_thing"),
                     crowd_gt=True),
    "detection": Task("detection", True, partial(G.plan_things, with_masks=False),
                      P.detection_inference, _things, M.DetectionMetric, ("top_k", "is_thing"),
                      crowd_gt=True, gt_masks=False),
    "semantic": Task("semantic", True, partial(G.plan_regions, per_thing=False),
                     P.semantic_inference, _semantic, M.SemanticMetric),
    "panoptic": Task("panoptic", True, partial(G.plan_regions, per_thing=True),
                     P.panoptic_inference, _panoptic, M.PanopticMetric, ("is_thing",),
                     crowd_gt=True),
    "referring": Task("referring", False, G.plan_referring, P.referring_inference, _referring,
                      M.ReferringMetric),
    "foreground": Task("foreground", False, G.plan_foreground, P.foreground_inference,
                       _foreground, M.ForegroundMetric),
}
VOCAB_TASKS = tuple(name for name, t in TASKS.items() if t.vocabulary)


def task_record(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def plan_targets(objs: list[G.Obj], task: str, vocab: list[str], rng: np.random.Generator | None,
                 eval_mode: bool = False) -> G.Plan | None:
    """Targets of `task` for one image, or None when the image has nothing for that task.

    rng picks the prompt template and each object's referring expression (None: the first of each).
    eval_mode: referring gets one target per (object, expression) instead of one sampled expression.
    """
    record = task_record(task)
    # The template is drawn for every task, even those without class texts: the draw order is
    # part of what makes a resumed run reproduce its batches.
    template = G.TEMPLATES[int(rng.integers(len(G.TEMPLATES)))] if rng is not None \
        else G.TEMPLATES[0]
    index = {name: i for i, name in enumerate(vocab)}
    texts = [template.format(v) for v in vocab]
    return record.plan(objs, texts, index, rng=rng, eval_mode=eval_mode)
