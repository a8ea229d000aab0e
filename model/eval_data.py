"""Evaluation samples of one shard folder: model input, target and original-frame ground truth."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from model import transforms as T
from model.mixture import DatasetSpec
from model.shards import ImageEntry, ShardSet
from model.targets import Obj, Plan, build_target, group_box, group_masks, usable_objects
from model.tasks import Task, plan_targets, task_record
from schemas import masks as mask_codec


def iter_eval_samples(shard_dir: str | Path, task: str, image_size: int = 256,
                      masks: tuple[str, ...] = ("gt", "synthesized"), keep_only: bool = True,
                      captions: list[str] | None = None,
                      root: Path | None = None) -> Iterator[dict]:
    """Evaluation samples of one shard folder, in storage order, without augmentation.

    Yields {"image": (3, S, S), "target": target dict (fixed template), "geometry": T.Geometry,
    "gt": {"image_id", "height", "width", "texts", "objects": [{"label", "category", "mask" (RLE
    value at the original size, None for detection), "box" (xywh original pixels), "is_thing",
    "iscrowd"}]}}.
    Referring yields one target per (object, expression). Crowd objects appear only in gt (iscrowd
    True, label of their class) so metrics can treat them as ignore regions. Images with nothing for
    the task (no region, no expression) are skipped. `root` overrides the manifest's image root.
    """
    record = task_record(task)
    spec = DatasetSpec(Path(shard_dir), 1.0, [task], list(masks), keep_only, captions)
    shards = ShardSet(Path(shard_dir), root=root)
    vocab = shards.vocabulary(keep_only) if record.vocabulary else []
    index = {name: i for i, name in enumerate(vocab)}
    for part in shards.parts:
        for entry in shards.images[part]:
            objs = usable_objects(shards.objects(part).get(entry.image_id, []), spec)
            plan = plan_targets(objs, task, vocab, None, eval_mode=True)
            if plan is None:
                continue
            image = shards.read_image(entry)
            geo = T.geometry(image.shape[0], image.shape[1], image_size)
            gt = _original_gt(objs, plan, entry, index, record)
            yield {"image": T.prepare_image(image, geo),
                   "target": build_target(objs, plan, geo, task, entry.image_id),
                   "geometry": geo, "gt": gt}


def _original_gt(objs: list[Obj], plan: Plan, entry: ImageEntry, index: dict,
                 task: Task) -> dict:
    masks = _target_masks(objs, plan) if plan.has_masks and plan.groups else None
    objects = [{"label": label, "category": objs[g[0]].category, "box": group_box(objs, g),
                "mask": masks[k] if masks else None, "iscrowd": False,
                "is_thing": all(objs[i].is_thing for i in g)}
               for k, (label, g) in enumerate(zip(plan.labels, plan.groups, strict=True))]
    if task.crowd_gt:
        objects += [{"label": index[o.category], "category": o.category, "box": o.box,
                     "mask": o.mask if task.gt_masks else None, "iscrowd": True,
                     "is_thing": o.is_thing}
                    for o in objs if o.iscrowd and o.category in index]
    return {"image_id": entry.image_id, "height": entry.height, "width": entry.width,
            "texts": plan.texts, "objects": objects}


def _target_masks(objs: list[Obj], plan: Plan) -> list[dict]:
    """Each target's mask value at the size of the image's first mask. A one-object target keeps
    its object's value as stored (decoding and re-encoding it would give the same pixels, at a
    cost per object); targets that unite several objects are decoded, OR-ed and encoded once."""
    first = objs[plan.groups[0][0]].mask
    size = (first["height"], first["width"])
    values: list[dict | None] = [None] * len(plan.groups)
    merged = []
    for k, group in enumerate(plan.groups):
        own = objs[group[0]].mask
        if len(group) == 1 and (own["height"], own["width"]) == size:
            values[k] = own
        else:
            merged.append(k)
    if merged:
        sub = Plan(plan.texts, [plan.labels[k] for k in merged],
                   [plan.groups[k] for k in merged], True)
        for k, value in zip(merged, mask_codec.encode(group_masks(objs, sub, *size)),
                            strict=True):
            values[k] = value
    return values
