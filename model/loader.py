"""Training batches from a weighted mixture of shard folders (`MixtureLoader`).

Sampling: draw a dataset by weight, a task among its tasks, then the next image of that dataset's
stream (parts in a shuffled order per epoch, images shuffled within a part, so reads stay
part-local). An image that has nothing for the drawn task is passed over. Every random choice comes
from one seeded numpy Generator plus per-(dataset, epoch, part) seeds, so `state_dict()` (generator
state and stream cursors) lets a resumed run produce exactly the batches the uninterrupted run
would have.

Batch: {"images": (B, 3, S, S) float ImageNet-normalised, "targets": [dict per image]} (targets:
model/targets.py).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import torch

from model import transforms as T
from model.mixture import Mixture, load_mixture, sampling_probs
from model.shards import ImageEntry, ShardSet, image_hashes
from model.targets import build_target, usable_objects
from model.tasks import TASKS, plan_targets

log = logging.getLogger(__name__)


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
        vocab = shards.vocabulary(spec.keep_only) if TASKS[task].vocabulary else []
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

    def vocabulary(self) -> dict:
        """{"names", "isthing"}: the class names the vocabulary tasks train on, the sorted union
        over the datasets that have such a task (each its own ShardSet.categories). A name is stuff
        only when every dataset that has it says so: calling a thing stuff would merge its
        instances in panoptic predictions."""
        flags: dict[str, bool] = {}
        for spec, shards in zip(self.mixture.datasets, self.shards, strict=True):
            if not any(TASKS[t].vocabulary for t in spec.tasks):
                continue
            names, is_thing = shards.categories(spec.keep_only)
            for name in names:
                flags[name] = flags.get(name, False) or is_thing[name]
        names = sorted(flags)
        return {"names": names, "isthing": [flags[n] for n in names]}

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
