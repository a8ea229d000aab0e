"""Foreground / salient-object datasets (an image folder + a binary mask folder) -> ImageRecords.

Layout (DUTS, HRSOD, UHRSD, DIS, ThinObject... all reduce to this):
    <root>/<stem>.jpg|.png          the images (SourceConfig.root)
    <annotations>/<stem>.png        one mask per image, same stem; pixels > 127 are foreground
                                    (the maps are 0/255, sometimes with anti-aliased edges)

Each image yields one object, category "foreground", attributes {"isthing": true}, with the mask as
a `gt` RLE and its tight box. Records follow the sorted mask files; a mask without an image is
reported as a `missing` record, an empty mask as an object error.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2

from pipelines.images import read_label_map
from pipelines.records import ImageRecord, SourceObject
from pipelines.sources import SourceConfig
from schemas import masks as mask_codec

CATEGORY = "foreground"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
THRESHOLD = 127


class ForegroundSource:
    """Source pairing <root>/<stem>.<img> with <annotations>/<stem>.png."""

    name = "foreground"

    def __init__(self, cfg: SourceConfig):
        if cfg.root is None or cfg.annotations is None:
            raise ValueError("foreground: needs root (image folder) and annotations (mask folder)")
        self.root = Path(cfg.root)
        self.annotation_file = Path(cfg.annotations)
        self.split = cfg.split or "train"
        for folder in (self.root, self.annotation_file):
            if not folder.is_dir():
                raise FileNotFoundError(f"foreground: folder {folder} not found")

    def _image_file(self, stem: str) -> str | None:
        for suffix in IMAGE_SUFFIXES:
            if (self.root / f"{stem}{suffix}").is_file():
                return f"{stem}{suffix}"
        return None

    def records(self) -> Iterator[ImageRecord]:
        for mask_path in sorted(self.annotation_file.glob("*.png")):
            yield self._record(mask_path)

    def _record(self, mask_path: Path) -> ImageRecord:
        stem = mask_path.stem
        file = self._image_file(stem)
        if file is None:
            return ImageRecord(
                stem,
                f"{stem}.jpg",
                None,
                None,
                error_status="missing",
                error=f"no image for mask {mask_path} in {self.root}",
            )
        gray = read_label_map(mask_path, cv2.IMREAD_GRAYSCALE)
        if gray is None:
            return ImageRecord(stem, file, None, None, error=f"mask {mask_path} unreadable")
        mask = gray > THRESHOLD
        encoded = mask_codec.encode(mask[None])[0]
        box = mask_codec.tight_box([encoded])[0].tolist()
        obj = SourceObject(
            ann_id="0",
            category=CATEGORY,
            box_raw=box,
            category_name=CATEGORY,
            attributes={"isthing": True},
            gt_mask=encoded,
            error=None if mask.any() else f"mask {mask_path} is empty",
            error_code=None if mask.any() else "gt_mask_invalid",
        )
        return ImageRecord(stem, file, mask.shape[1], mask.shape[0], objects=[obj])


def open_source(cfg: SourceConfig) -> ForegroundSource:
    return ForegroundSource(cfg)
