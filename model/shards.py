"""Reading a shard folder for the model: the image index and the objects of each image.

A shard folder (`engine synthesize` output) is opened through schemas.runs.open_run: the parts are
exactly those manifest.json and _units.jsonl list (a stale part-*.parquet left in the folder is not
read), a run of another major schema version is refused, and the image root is the manifest's
source.root unless overridden (`root:` in mix.yaml, `--root`). Unit k writes one images part and one
objects part (open_run lists both in unit order), and objects are sorted by image_id, so an image's
objects live in its unit's objects part: the reader keeps an image index and reads objects one part
at a time (LRU), grouped by image_id.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.images import decode_rgb, read_regular_file
from schemas.runs import open_run

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ["image_id", "file_path", "width", "height", "sha256", "status"]
OBJECT_COLUMNS = ["image_id", "category", "box", "iscrowd", "attributes", "mask", "mask_origin",
                  "gt_mask", "keep", "captions"]


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

    def categories(self, keep_only: bool) -> tuple[list[str], dict[str, bool]]:
        """(vocabulary, category -> is_thing from the objects' `attributes` {"isthing": ...}; a
        category without the attribute is a thing)."""
        vocab = self.vocabulary(keep_only)
        is_thing = dict.fromkeys(vocab, True)
        for part in self.parts:  # the parts with usable images, in unit order (a later flag wins)
            table = pq.read_table(self._object_files[part], columns=["category", "attributes"])
            for category, attributes in zip(table["category"].to_pylist(),
                                            table["attributes"].to_pylist(), strict=True):
                if attributes and category in is_thing:
                    flag = json.loads(attributes).get("isthing")
                    if flag is not None:
                        is_thing[category] = bool(flag)
        return vocab, is_thing

    def read_image(self, entry: ImageEntry) -> np.ndarray:
        """(h, w, 3) uint8 RGB pixels of an indexed image."""
        path = self.root / entry.file_path
        try:
            data = read_regular_file(path)  # a FIFO in place of an image must not hang training
        except OSError as e:
            raise FileNotFoundError(f"{self.dir}: image {entry.image_id!r}: {e}") from None
        # The engine's one decoder: the EXIF-applied frame the shards' boxes and masks are in.
        return decode_rgb(data, f"{self.dir}: image {entry.image_id!r}: {path}")
