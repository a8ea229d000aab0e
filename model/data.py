"""Training data for MQ-Former: shard reader, weighted mixture sampler, targets per task.

Shard folder (`engine synthesize` output), opened through schemas.runs.open_run: the parts are
exactly those manifest.json and _units.jsonl list (a stale part-*.parquet left in the folder is not
read), a run of another major schema version is refused, and the image root is the manifest's
source.root unless overridden (`root:` in mix.yaml, `--root`). Unit k writes one images part and one
objects part, and objects are sorted by image_id, so an image's objects live in its unit's objects
part: the reader keeps an image index and reads objects one part at a time (LRU), grouped by
image_id.

Sampling (`MixtureLoader`): draw a dataset by weight, a task among its tasks, then the next image of
that dataset's stream (parts in a shuffled order per epoch, images shuffled within a part, so reads
stay part-local). An image that has nothing for the drawn task is passed over. Every random choice
comes from one seeded numpy Generator plus per-(dataset, epoch, part) seeds, so `state_dict()`
(generator state and stream cursors) lets a resumed run produce exactly the batches the
uninterrupted run would have.

Batch: {"images": (B, 3, S, S) float ImageNet-normalised, "targets": [dict per image]}; each target
has texts, labels (M,), boxes (M, 4) cxcywh in [0, 1] of the padded image, masks (M, S, S) bool,
has_masks, is_thing (M,), task, image_id (docs/mixture.md describes each task's targets).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import cv2
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from model import transforms as T
from model.mixture import DatasetSpec, Mixture, load_mixture, sampling_probs
from pipelines.images import decode_rgb, read_regular_file
from schemas import masks as mask_codec
from schemas.runs import open_run

__all__ = ["MixtureLoader", "ShardSet", "iter_eval_samples", "load_mixture", "image_hashes"]

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ["image_id", "file_path", "width", "height", "sha256", "status"]
OBJECT_COLUMNS = ["image_id", "category", "box", "iscrowd", "attributes", "mask", "mask_origin",
                  "gt_mask", "keep", "captions"]
# Prompt templates for class names (own wording; in the spirit of CLIP/OpenSeeD prompt engineering).
TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a picture of a {}.", "an image of a {}.",
             "a cropped photo of a {}.", "a photo of a small {}.", "a photo of a large {}.",
             "there is a {} in the scene.")
FOREGROUND_PROMPT = "foreground object"
VOCAB_TASKS = ("instance", "detection", "semantic", "panoptic")


# ---------------------------------------------------------------------------------------- shards
@dataclass
class ImageEntry:
    image_id: str
    file_path: str
    width: int
    height: int
    part: str  # e.g. "part-00003.parquet"


def image_hashes(shard_dir: Path, root: Path | None = None) -> set[str]:
    """Content hashes (images.sha256) of every image of a run, whatever its status."""
    hashes: set[str] = set()
    for part in open_run(shard_dir, root).parts["images"]:
        hashes.update(h for h in pq.read_table(part, columns=["sha256"])["sha256"].to_pylist() if h)
    return hashes


class ShardSet:
    """Image index (status 'ok', minus excluded hashes) and LRU-cached objects of a run folder.

    The parts are exactly those the run's manifest and unit log list (schemas.runs.open_run, which
    also refuses another major schema version); `root` overrides the manifest's image root.
    """

    def __init__(self, shard_dir: Path, exclude_hashes: set[str] | None = None,
                 cached_parts: int = 2, root: Path | None = None):
        self.run = open_run(Path(shard_dir), root)
        self.dir, self.manifest, self.root = self.run.dir, self.run.manifest, self.run.root
        if not self.root.is_dir():  # data moved: say so before any model is built
            raise FileNotFoundError(f"{self.dir}: image root {self.root} is not a folder (the data "
                                    "moved? give its new place with --root or a `root:` key)")
        # unit k wrote images/part-k and objects/part-k: pair them by unit, not by file name
        self._object_files = {img.name: obj for img, obj in
                              zip(self.run.parts["images"], self.run.parts["objects"],
                                  strict=True)}
        self.parts: list[str] = []
        self.images: dict[str, list[ImageEntry]] = {}
        self.excluded = self.unhashed = 0
        self._objects: OrderedDict[str, dict[str, list[dict]]] = OrderedDict()
        self._cached_parts = cached_parts
        self._vocab: dict[bool, list[str]] = {}
        for path in self.run.parts["images"]:
            entries = self._index_part(path, exclude_hashes or set())
            if entries:
                self.parts.append(path.name)
                self.images[path.name] = entries
        if exclude_hashes and self.unhashed:
            log.warning("%s: %d images have no sha256 and could not be checked against eval sets",
                        self.dir, self.unhashed)

    def _index_part(self, path: Path, exclude: set[str]) -> list[ImageEntry]:
        entries = []
        for row in pq.read_table(path, columns=IMAGE_COLUMNS).to_pylist():
            if row["status"] != "ok":
                continue
            if row["sha256"] is None:
                self.unhashed += 1
            elif row["sha256"] in exclude:
                self.excluded += 1
                continue
            entries.append(ImageEntry(row["image_id"], row["file_path"], row["width"],
                                      row["height"], path.name))
        return entries

    def __len__(self) -> int:
        return sum(len(v) for v in self.images.values())

    def objects(self, part: str) -> dict[str, list[dict]]:
        """image_id -> its object rows (dicts of OBJECT_COLUMNS) in one part; LRU over parts."""
        if part in self._objects:
            self._objects.move_to_end(part)
            return self._objects[part]
        rows = pq.read_table(self._object_files[part], columns=OBJECT_COLUMNS).to_pylist()
        grouped = {k: list(g) for k, g in groupby(rows, key=lambda r: r["image_id"])}
        self._objects[part] = grouped
        while len(self._objects) > self._cached_parts:
            self._objects.popitem(last=False)
        return grouped

    def vocabulary(self, keep_only: bool) -> list[str]:
        """Sorted distinct category texts of the folder (kept objects only if keep_only)."""
        if keep_only not in self._vocab:
            names: set[str] = set()
            for part in self.run.parts["objects"]:
                table = pq.read_table(part, columns=["category", "keep"])
                column = table["category"].filter(table["keep"]) if keep_only else table["category"]
                names.update(v for v in pc.unique(column).to_pylist() if v)
            self._vocab[keep_only] = sorted(names)
        return self._vocab[keep_only]

    def read_image(self, entry: ImageEntry) -> np.ndarray:
        """(h, w, 3) uint8 RGB pixels of an indexed image."""
        path = self.root / entry.file_path
        try:
            data = read_regular_file(path)  # a FIFO in place of an image must not hang training
        except OSError as e:
            raise FileNotFoundError(f"{self.dir}: image {entry.image_id!r}: {e}") from None
        # The engine's one decoder: the EXIF-applied frame the shards' boxes and masks are in.
        return decode_rgb(data, f"{self.dir}: image {entry.image_id!r}: {path}")


# --------------------------------------------------------------------------------------- targets
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


def plan_targets(objs: list[Obj], task: str, vocab: list[str], rng: np.random.Generator | None,
                 eval_mode: bool = False) -> Plan | None:
    """Targets of `task` for one image, or None when the image has nothing for that task.

    rng picks the prompt template and each object's referring expression (None: the first of each).
    eval_mode: referring gets one target per (object, expression) instead of one sampled expression.
    """
    index = {name: i for i, name in enumerate(vocab)}
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))] if rng is not None else TEMPLATES[0]
    named = [i for i, o in enumerate(objs) if not o.iscrowd and o.category in index]
    if task in ("instance", "detection"):
        things = [i for i in named if objs[i].is_thing]
        has_masks = task == "instance" and all(objs[i].mask is not None for i in things)
        return Plan([template.format(v) for v in vocab], [index[objs[i].category] for i in things],
                    [[i] for i in things], has_masks)
    masked = [i for i in named if objs[i].mask is not None]
    if task in ("semantic", "panoptic"):
        groups: dict[object, list[int]] = {}
        for i in masked:  # semantic: one region per class; panoptic: per thing, per stuff class
            key = objs[i].category if task == "semantic" or not objs[i].is_thing else ("thing", i)
            groups.setdefault(key, []).append(i)
        if not groups:
            return None
        members = list(groups.values())
        return Plan([template.format(v) for v in vocab],
                    [index[objs[g[0]].category] for g in members], members, True)
    if task == "foreground":
        fg = [i for i, o in enumerate(objs) if not o.iscrowd and o.mask is not None]
        return Plan([FOREGROUND_PROMPT], [0], [fg], True) if fg else None
    if task == "referring":
        referred = [i for i, o in enumerate(objs)
                    if not o.iscrowd and o.mask is not None and o.captions]
        if not referred:
            return None
        if eval_mode:
            pairs = [(i, c) for i in referred for c in objs[i].captions]
        else:  # one expression per object, drawn afresh each time (as the paper does)
            pairs = [(i, objs[i].captions[int(rng.integers(len(objs[i].captions)))]
                      if rng is not None else objs[i].captions[0]) for i in referred]
        return Plan([c for _, c in pairs], list(range(len(pairs))), [[i] for i, _ in pairs], True)
    raise ValueError(f"unknown task {task!r}")


def _group_box(objs: list[Obj], group: list[int]) -> list[float]:
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
    boxes = np.array([_group_box(objs, g) for g in plan.groups]).reshape(m, 4)
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


# ---------------------------------------------------------------------------------------- loader
class _Stream:
    """One dataset's image stream: parts shuffled per epoch, images shuffled within a part."""

    def __init__(self, shards: ShardSet, seed: int, index: int, shuffle: bool):
        self.shards, self.seed, self.index, self.shuffle = shards, seed, index, shuffle
        self.epoch = self.part_pos = self.image_pos = 0
        self._memo: dict[tuple, np.ndarray] = {}

    def _perm(self, key: tuple, n: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n)
        if key not in self._memo:
            self._memo = {key: np.random.default_rng([self.seed, self.index, *key]).permutation(n)}
        return self._memo[key]

    def next(self) -> ImageEntry:
        parts = self.shards.parts
        while True:
            if self.part_pos >= len(parts):
                self.epoch, self.part_pos, self.image_pos = self.epoch + 1, 0, 0
            part_order = np.random.default_rng([self.seed, self.index, self.epoch]).permutation(
                len(parts)) if self.shuffle else np.arange(len(parts))
            p = int(part_order[self.part_pos])
            images = self.shards.images[parts[p]]
            if self.image_pos >= len(images):
                self.part_pos, self.image_pos = self.part_pos + 1, 0
                continue
            entry = images[int(self._perm((self.epoch, p), len(images))[self.image_pos])]
            self.image_pos += 1
            return entry

    def state(self) -> list[int]:
        return [self.epoch, self.part_pos, self.image_pos]


def collate(samples: list[tuple[torch.Tensor, dict]]) -> dict:
    return {"images": torch.stack([s[0] for s in samples]), "targets": [s[1] for s in samples]}


class MixtureLoader:
    """Batches from a Mixture: infinite and augmented when train, else one ordered pass.

    images (B, 3, S, S), S = image_size (a multiple of 32); see the module docstring for targets.
    Decoded, resized images are kept in an LRU of `cache_images` entries.
    """

    def __init__(self, mixture: Mixture | str | Path, image_size: int = 256, batch_size: int = 2,
                 seed: int = 0, train: bool = True, cache_images: int = 256):
        self.mixture = mixture if isinstance(mixture, Mixture) else load_mixture(mixture)
        T.geometry(1, 1, image_size)  # validates image_size
        self.image_size, self.batch_size = image_size, batch_size
        self.seed, self.train = seed, train
        hashes: set[str] = set()
        for path in self.mixture.exclude:
            hashes |= image_hashes(path)
        self.shards = [ShardSet(d.path, hashes, root=d.root) for d in self.mixture.datasets]
        self.excluded = {d.name: s.excluded for d, s in zip(self.mixture.datasets, self.shards,
                                                              strict=True)}
        for spec, shards in zip(self.mixture.datasets, self.shards, strict=True):
            if len(shards) == 0:
                raise ValueError(f"{spec.path}: no usable image (status 'ok', not excluded)")
            if shards.excluded:
                log.info("%s: %d images excluded (also in an eval set)", spec.name, shards.excluded)
        self.probs = sampling_probs(self.mixture)
        self.rng = np.random.default_rng(seed)
        self.streams = [_Stream(s, seed, i, train) for i, s in enumerate(self.shards)]
        self._cache: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        self._cache_size = cache_images

    def __iter__(self) -> Iterator[dict]:
        if not self.train:
            yield from self._one_pass()
            return
        while True:
            yield self.next_batch()

    def next_batch(self) -> dict:
        return collate([self._draw() for _ in range(self.batch_size)])

    def _draw(self) -> tuple[torch.Tensor, dict]:
        d = int(self.rng.choice(len(self.probs), p=self.probs))
        spec = self.mixture.datasets[d]
        task = spec.tasks[int(self.rng.integers(len(spec.tasks)))]
        for _ in range(len(self.shards[d])):  # at most one pass over the dataset
            sample = self._sample(d, self.streams[d].next(), task, self.rng)
            if sample is not None:
                return sample
        raise ValueError(f"{spec.path}: no image has targets for task {task!r} "
                         f"(check its masks/captions/keep_only filters)")

    def _one_pass(self) -> Iterator[dict]:
        batch = []
        for d, spec in enumerate(self.mixture.datasets):
            for task in spec.tasks:
                for part in self.shards[d].parts:
                    for entry in self.shards[d].images[part]:
                        sample = self._sample(d, entry, task, None)
                        if sample is not None:
                            batch.append(sample)
                        if len(batch) == self.batch_size:
                            yield collate(batch)
                            batch = []
        if batch:
            yield collate(batch)

    def _sample(self, d: int, entry: ImageEntry, task: str,
                rng: np.random.Generator | None) -> tuple[torch.Tensor, dict] | None:
        spec, shards = self.mixture.datasets[d], self.shards[d]
        objs = usable_objects(shards.objects(entry.part).get(entry.image_id, []), spec)
        vocab = shards.vocabulary(spec.keep_only) if task in VOCAB_TASKS else []
        plan = plan_targets(objs, task, vocab, rng)
        if plan is None:
            return None
        flip = rng is not None and bool(rng.random() < 0.5)
        height, width, resized = self._resized(d, entry)
        geo = T.geometry(height, width, self.image_size, flip)
        return T.prepare_resized(resized, geo), build_target(objs, plan, geo, task, entry.image_id)

    def _resized(self, d: int, entry: ImageEntry) -> tuple[int, int, np.ndarray]:
        """(original height, width, image resized to the long side) through the LRU cache."""
        key = (d, entry.image_id)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        image = self.shards[d].read_image(entry)
        geo = T.geometry(image.shape[0], image.shape[1], self.image_size)
        resized = cv2.resize(image, (geo.resized_width, geo.resized_height),
                             interpolation=cv2.INTER_AREA)
        value = (image.shape[0], image.shape[1], resized)
        self._cache[key] = value
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return value

    def state_dict(self) -> dict:
        return {"seed": self.seed, "rng": self.rng.bit_generator.state,
                "streams": [s.state() for s in self.streams],
                "datasets": [str(d.path) for d in self.mixture.datasets]}

    def load_state_dict(self, state: dict) -> None:
        datasets = [str(d.path) for d in self.mixture.datasets]
        if state["datasets"] != datasets or state["seed"] != self.seed:
            raise ValueError(f"loader state is for datasets {state['datasets']} "
                             f"seed {state['seed']}, "
                             f"this loader has {datasets} seed {self.seed}")
        self.rng.bit_generator.state = state["rng"]
        for stream, cursor in zip(self.streams, state["streams"], strict=True):
            stream.epoch, stream.part_pos, stream.image_pos = cursor


# ------------------------------------------------------------------------------------ evaluation
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
    spec = DatasetSpec(Path(shard_dir), 1.0, [task], list(masks), keep_only, captions)
    shards = ShardSet(Path(shard_dir), root=root)
    vocab = shards.vocabulary(keep_only) if task in VOCAB_TASKS else []
    index = {name: i for i, name in enumerate(vocab)}
    for part in shards.parts:
        for entry in shards.images[part]:
            objs = usable_objects(shards.objects(part).get(entry.image_id, []), spec)
            plan = plan_targets(objs, task, vocab, None, eval_mode=True)
            if plan is None:
                continue
            image = shards.read_image(entry)
            geo = T.geometry(image.shape[0], image.shape[1], image_size)
            gt = _original_gt(objs, plan, entry, index, task)
            yield {"image": T.prepare_image(image, geo),
                   "target": build_target(objs, plan, geo, task, entry.image_id),
                   "geometry": geo, "gt": gt}


def _original_gt(objs: list[Obj], plan: Plan, entry: ImageEntry, index: dict, task: str) -> dict:
    masks = None
    if plan.has_masks and plan.groups:
        first = objs[plan.groups[0][0]].mask
        masks = mask_codec.encode(group_masks(objs, plan, first["height"], first["width"]))
    objects = [{"label": label, "category": objs[g[0]].category, "box": _group_box(objs, g),
                "mask": masks[k] if masks else None, "iscrowd": False,
                "is_thing": all(objs[i].is_thing for i in g)}
               for k, (label, g) in enumerate(zip(plan.labels, plan.groups, strict=True))]
    if task in ("instance", "detection", "panoptic"):
        objects += [{"label": index[o.category], "category": o.category, "box": o.box,
                     "mask": o.mask if task != "detection" else None, "iscrowd": True,
                     "is_thing": o.is_thing}
                    for o in objs if o.iscrowd and o.category in index]
    return {"image_id": entry.image_id, "height": entry.height, "width": entry.width,
            "texts": plan.texts, "objects": objects}
