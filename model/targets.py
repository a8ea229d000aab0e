"""Targets of one image for one task: object rows -> Objs -> a Plan -> the batch's target dict.

Batch target (docs/mixture.md describes each task's targets): texts, labels (M,), boxes (M, 4)
cxcywh in [0, 1] of the padded image, masks (M, S, S) bool, has_masks, is_thing (M,), task,
image_id. Geometry (resize, flip, pad) is model/transforms.py's; this module only chooses what the
targets are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from model import transforms as T
from model.mixture import DatasetSpec

# Prompt templates for class names (own wording; in the spirit of CLIP/OpenSeeD prompt engineering).
TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a picture of a {}.", "an image of a {}.",
             "a cropped photo of a {}.", "a photo of a small {}.", "a photo of a large {}.",
             "there is a {} in the scene.")
FOREGROUND_PROMPT = "foreground object"


@dataclass
class Obj:
    """An object row reduced to what targets need. box: xywh pixels of the original image."""

    category: str | None
    box: list[float]
    mask: dict | None  # mask value of the allowed provenance, or None
    is_thing: bool
    iscrowd: bool
    captions: list[str]


def _pick_mask(row: dict, allowed: list[str]) -> dict | None:
    # Ground truth first: a gt_mask beside a synthesized mask is the better label.
    if "gt" in allowed:
        if row.get("gt_mask"):
            return row["gt_mask"]
        if row.get("mask") and row.get("mask_origin") == "gt":
            return row["mask"]
    if "synthesized" in allowed and row.get("mask") and row.get("mask_origin") != "gt":
        return row["mask"]
    return None


def usable_objects(rows: list[dict], spec: DatasetSpec) -> list[Obj]:
    """Object rows of one image -> Objs after the dataset's keep / mask / caption filters."""
    objs = []
    for row in rows:
        if (spec.keep_only and not row["keep"]) or row.get("box") is None:
            continue
        attributes = json.loads(row["attributes"]) if row.get("attributes") else {}
        captions = [c["text"] for c in row.get("captions") or []
                    if spec.captions is None or c["provenance"] in spec.captions]
        objs.append(Obj(row.get("category"), list(row["box"]), _pick_mask(row, spec.masks),
                        bool(attributes.get("isthing", True)), bool(row["iscrowd"]), captions))
    return objs


@dataclass
class Plan:
    """Targets before geometry: texts, and per target its label and the objects it unites."""

    texts: list[str]
    labels: list[int]
    groups: list[list[int]]
    has_masks: bool


def plan_things(objs: list[Obj], texts: list[str], index: dict[str, int], with_masks: bool,
                rng: np.random.Generator | None, eval_mode: bool) -> Plan:
    """instance / detection: one target per named, non-crowd thing (an image may have none)."""
    things = [i for i, o in enumerate(objs)
              if not o.iscrowd and o.category in index and o.is_thing]
    has_masks = with_masks and all(objs[i].mask is not None for i in things)
    return Plan(texts, [index[objs[i].category] for i in things], [[i] for i in things],
                has_masks)


def plan_regions(objs: list[Obj], texts: list[str], index: dict[str, int], per_thing: bool,
                 rng: np.random.Generator | None, eval_mode: bool) -> Plan | None:
    """semantic (per_thing False): one region per class; panoptic: one per thing, one per stuff
    class. Only named, non-crowd, masked objects; None when there is none."""
    groups: dict[object, list[int]] = {}
    for i, o in enumerate(objs):
        if o.iscrowd or o.category not in index or o.mask is None:
            continue
        key = ("thing", i) if per_thing and o.is_thing else o.category
        groups.setdefault(key, []).append(i)
    if not groups:
        return None
    members = list(groups.values())
    return Plan(texts, [index[objs[g[0]].category] for g in members], members, True)


def plan_foreground(objs: list[Obj], texts: list[str], index: dict[str, int],
                    rng: np.random.Generator | None, eval_mode: bool) -> Plan | None:
    """foreground: one target, the union of every non-crowd masked object (named or not)."""
    fg = [i for i, o in enumerate(objs) if not o.iscrowd and o.mask is not None]
    return Plan([FOREGROUND_PROMPT], [0], [fg], True) if fg else None


def plan_referring(objs: list[Obj], texts: list[str], index: dict[str, int],
                   rng: np.random.Generator | None, eval_mode: bool) -> Plan | None:
    """referring: one target per (object, expression) in eval mode, else one expression per object
    drawn afresh each time (as the paper does; the first one without an rng)."""
    referred = [i for i, o in enumerate(objs)
                if not o.iscrowd and o.mask is not None and o.captions]
    if not referred:
        return None
    if eval_mode:
        pairs = [(i, c) for i in referred for c in objs[i].captions]
    else:
        pairs = [(i, objs[i].captions[int(rng.integers(len(objs[i].captions)))]
                  if rng is not None else objs[i].captions[0]) for i in referred]
    return Plan([c for _, c in pairs], list(range(len(pairs))), [[i] for i, _ in pairs], True)


def group_box(objs: list[Obj], group: list[int]) -> list[float]:
    """Enclosing xywh box of a group of objects (a merged region)."""
    xyxy = np.array([[o.box[0], o.box[1], o.box[0] + o.box[2], o.box[1] + o.box[3]]
                     for o in (objs[i] for i in group)])
    x0, y0 = xyxy[:, :2].min(0)
    x1, y1 = xyxy[:, 2:].max(0)
    return [x0, y0, x1 - x0, y1 - y0]


def group_masks(objs: list[Obj], plan: Plan, height: int, width: int) -> np.ndarray:
    """(M, height, width) bool: the union of each target's object masks, resized (nearest)."""
    used = sorted({i for g in plan.groups for i in g})
    if not plan.has_masks or not used:
        return np.zeros((len(plan.groups), height, width), dtype=bool)
    decoded = dict(zip(used, T.decode_resized([objs[i].mask for i in used], height, width),
                       strict=True))
    return np.stack([np.any([decoded[i] for i in g], axis=0) for g in plan.groups])


def build_target(objs: list[Obj], plan: Plan, geo: T.Geometry, task: str, image_id: str) -> dict:
    """A Plan + geometry -> the target dict of the batch interface (see the module docstring)."""
    m, size = len(plan.groups), geo.size
    boxes = np.array([group_box(objs, g) for g in plan.groups]).reshape(m, 4)
    if plan.has_masks and m:
        masks = T.place_masks(group_masks(objs, plan, geo.resized_height, geo.resized_width), geo)
    else:
        masks = torch.zeros(m, size, size, dtype=torch.bool)
    return {
        "texts": plan.texts,
        "labels": torch.tensor(plan.labels, dtype=torch.long),
        "boxes": T.prepare_boxes(boxes, geo),
        "masks": masks,
        "has_masks": plan.has_masks,
        "is_thing": torch.tensor([all(objs[i].is_thing for i in g) for g in plan.groups],
                                 dtype=torch.bool),
        "task": task,
        "image_id": image_id,
    }
