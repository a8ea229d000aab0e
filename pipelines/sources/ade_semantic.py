"""ADE20K-style semantic segmentation (label PNGs + a class list) -> ImageRecords with `gt` masks.

Layout (ADEChallengeData2016):
    <root>/images/<split>/<stem>.jpg          the images
    <root>/annotations/<split>/<stem>.png     one-channel label map: 0 = unlabelled,
                                              v >= 1 = class v
    class list (SourceConfig.annotations)     objectInfo150.csv (columns Idx,...,Name; the first
                                              of the ';'-separated names is used) or a .txt,
                                              one name a line; row k (1-based) names value k

Semantic labels have no instances, so each class present in an image is one object (one region),
with attributes {"isthing": false} unless the CSV has an `isthing` column. Value 255 is ignored
like 0.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from pipelines.images import read_label_map
from pipelines.records import ImageRecord, SourceObject
from pipelines.sources import SourceConfig
from schemas import masks as mask_codec

IGNORE_VALUES = (0, 255)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def read_class_list(path: Path) -> list[tuple[str, bool]]:
    """Class list file -> [(name, isthing)], index k-1 for pixel value k."""
    if not path.is_file():
        raise FileNotFoundError(f"ade_semantic: class list {path} not found")
    if path.suffix.lower() != ".csv":
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        return [(n, False) for n in names]
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "Name" not in rows[0]:
        raise ValueError(f"{path}: a CSV class list needs a 'Name' column")
    classes = []
    for i, row in enumerate(rows):
        if "Idx" in row and row["Idx"] and int(row["Idx"]) != i + 1:
            raise ValueError(f"{path}: row {i + 1} has Idx {row['Idx']}, expected {i + 1}")
        isthing = str(row.get("isthing", "0")).strip().lower() in ("1", "true", "yes")
        classes.append((row["Name"].split(";")[0].strip(), isthing))
    return classes


class AdeSemanticSource:
    """Source over one split of an ADE20K-style folder; records in sorted label-file order."""

    name = "ade_semantic"

    def __init__(self, cfg: SourceConfig):
        if cfg.root is None or cfg.annotations is None:
            raise ValueError(
                "ade_semantic: needs root (dataset folder) and annotations (class list)"
            )
        self.root = Path(cfg.root)
        self.split = cfg.split or "training"
        self.annotation_file = Path(cfg.annotations)
        self.classes = read_class_list(self.annotation_file)
        self.label_dir = self.root / "annotations" / self.split
        if not self.label_dir.is_dir():
            raise FileNotFoundError(f"ade_semantic: label folder {self.label_dir} not found")

    def _image_file(self, stem: str) -> str:
        for suffix in IMAGE_SUFFIXES:
            rel = f"images/{self.split}/{stem}{suffix}"
            if (self.root / rel).is_file():
                return rel
        return f"images/{self.split}/{stem}.jpg"  # the pipeline reports it as missing

    def records(self) -> Iterator[ImageRecord]:
        for png in sorted(self.label_dir.glob("*.png")):
            yield self._record(png)

    def _record(self, png: Path) -> ImageRecord:
        record = ImageRecord(png.stem, self._image_file(png.stem), None, None)
        labels = read_label_map(png, cv2.IMREAD_UNCHANGED)
        if labels is None or labels.ndim != 2:
            record.error = f"label map {png} unreadable or not single-channel"
            return record
        record.height, record.width = labels.shape
        values = [int(v) for v in np.unique(labels) if int(v) not in IGNORE_VALUES]
        if values:
            encoded = mask_codec.encode(np.stack([labels == v for v in values]))
            boxes = mask_codec.tight_box(encoded)
        for i, v in enumerate(values):
            known = v <= len(self.classes)
            name, isthing = self.classes[v - 1] if known else (None, False)
            record.objects.append(
                SourceObject(
                    ann_id=str(v),
                    category=name,
                    box_raw=boxes[i].tolist(),
                    category_id=v,
                    category_name=name,
                    attributes={"isthing": isthing},
                    gt_mask=encoded[i],
                    error=None
                    if known
                    else f"pixel value {v} not in the class list "
                    f"({len(self.classes)} classes, {self.annotation_file})",
                    error_code=None if known else "category_unknown",
                )
            )
        return record


def open_source(cfg: SourceConfig) -> AdeSemanticSource:
    return AdeSemanticSource(cfg)
