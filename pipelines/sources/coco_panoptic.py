"""COCO panoptic ground truth (JSON + PNG segments) -> ImageRecords with `gt` masks.

Layout (the official release):
    annotations/panoptic_<split>.json   images, categories and
                                        annotations[{image_id, file_name, segments_info}]
    annotations/panoptic_<split>/       one RGB PNG per image; segment id = R + 256 * G + 256**2 * B
    <root>/<image file_name>            the images themselves (SourceConfig.root)

The PNG folder is the JSON path without its suffix, as in the release. Every segment (a thing
instance or one stuff region) becomes one SourceObject with its mask as a `gt` RLE, category as text
and attributes {"isthing": bool} taken from the category list. Annotations are streamed with ijson
so a large JSON is never held whole; the image and category lists (small) are read in a first pass.
"""

from __future__ import annotations

import logging
import reprlib
from collections.abc import Iterator
from pathlib import Path

import cv2
import ijson
import numpy as np

from pipelines.images import read_label_map, resolve_inside
from pipelines.records import ImageRecord, SourceObject
from pipelines.sources import SourceConfig
from schemas import masks as mask_codec

log = logging.getLogger(__name__)


def _read_list(path: Path, prefix: str) -> list[dict]:
    try:
        with open(path, "rb") as f:
            return list(ijson.items(f, f"{prefix}.item", use_float=True))
    except ijson.JSONError as e:
        raise ValueError(f"{path}: malformed JSON while reading '{prefix}': {e}") from e


def segment_ids(png_rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB panoptic PNG -> (H, W) int64 segment ids (R + 256 G + 256^2 B)."""
    rgb = png_rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


class CocoPanopticSource:
    """Source over a COCO panoptic JSON; `records()` yields one ImageRecord per panoptic
    annotation."""

    name = "coco_panoptic"

    def __init__(self, cfg: SourceConfig):
        if cfg.annotations is None or cfg.root is None:
            raise ValueError("coco_panoptic: needs both root (image folder) and annotations (JSON)")
        self.annotation_file = Path(cfg.annotations)
        self.root = Path(cfg.root)
        if not self.annotation_file.is_file():
            raise FileNotFoundError(
                f"coco_panoptic: annotation file {self.annotation_file} not found"
            )
        self.png_dir = self.annotation_file.with_suffix("")
        if not self.png_dir.is_dir():
            raise FileNotFoundError(
                f"coco_panoptic: PNG folder {self.png_dir} not found (expected next to the JSON)"
            )
        self.split = cfg.split or self.annotation_file.stem.removeprefix("panoptic_")
        cats = _read_list(self.annotation_file, "categories")
        self.categories = {self._int(c, "id", f"categories[{k}]"): c for k, c in enumerate(cats)}
        self.images = {self._int(i, "id", f"images[{k}]"): i
                       for k, i in enumerate(_read_list(self.annotation_file, "images"))}

    def _int(self, item, key: str, where: str) -> int:
        """item[key] as an int, or ValueError naming the file and the entry (a malformed file)."""
        value = item.get(key) if isinstance(item, dict) else None
        if type(value) is not int:
            raise ValueError(f"{self.annotation_file}: {where}: '{key}' must be an integer, got "
                             f"{reprlib.repr(value)}")
        return value

    def records(self) -> Iterator[ImageRecord]:
        seen: set[int] = set()
        with open(self.annotation_file, "rb") as f:
            try:
                for pos, ann in enumerate(ijson.items(f, "annotations.item", use_float=True)):
                    image_id = self._int(ann, "image_id", f"annotations[{pos}]")
                    seen.add(image_id)
                    yield self._record(pos, ann)
            except ijson.JSONError as e:
                raise ValueError(f"{self.annotation_file}: malformed annotations: {e}") from e
        for image_id, info in self.images.items():
            if (
                image_id not in seen
            ):  # an image without a panoptic annotation is reported, not dropped
                yield ImageRecord(
                    str(image_id),
                    info["file_name"],
                    info.get("width"),
                    info.get("height"),
                    error="no panoptic annotation for this image",
                )

    def _record(self, pos: int, ann: dict) -> ImageRecord:
        image_id = int(ann["image_id"])
        info = self.images.get(image_id)
        if info is None:
            return ImageRecord(
                str(image_id),
                ann.get("file_name", ""),
                None,
                None,
                error=f"annotations[{pos}]: image_id {image_id} not in images",
            )
        record = ImageRecord(
            str(image_id), str(info.get("file_name") or ""), info.get("width"), info.get("height")
        )
        png_path = resolve_inside(self.png_dir, str(ann.get("file_name") or ""))
        if png_path is None:
            record.error = f"annotations[{pos}]: PNG name {ann.get('file_name')!r} is unsafe"
            record.error_status = "unsafe_path"
            return record
        png = read_label_map(png_path, cv2.IMREAD_COLOR)
        if png is None:
            record.error, record.error_status = (
                f"panoptic PNG {png_path} missing or unreadable",
                "missing",
            )
            return record
        ids = segment_ids(cv2.cvtColor(png, cv2.COLOR_BGR2RGB))
        segments = ann.get("segments_info") or []
        record.objects = [self._object_or_error(image_id, k, seg, ids)
                          for k, seg in enumerate(segments)]
        return record

    def _object_or_error(self, image_id: int, k: int, seg, ids: np.ndarray) -> SourceObject:
        """One segment, or a rejected object naming what is malformed in it."""
        try:
            return self._object(image_id, seg, ids)
        except (KeyError, TypeError, ValueError) as e:
            seg_id = seg.get("id", k) if isinstance(seg, dict) else k
            return SourceObject(
                str(seg_id), None, [],
                error=f"image {image_id}: segments_info[{k}] is malformed: "
                      f"{type(e).__name__}: {e}",
                error_code="annotation_invalid")

    def _object(self, image_id: int, seg: dict, ids: np.ndarray) -> SourceObject:
        cat = self.categories.get(int(seg["category_id"]))
        mask = ids == int(seg["id"])
        box = seg.get("bbox")
        if box is None and mask.any():
            box = mask_codec.tight_box(mask_codec.encode(mask[None]))[0].tolist()
        obj = SourceObject(
            ann_id=str(seg["id"]),
            category=cat["name"] if cat else None,
            box_raw=[float(v) for v in box] if box is not None else [float("nan")] * 4,
            category_id=int(seg["category_id"]),
            category_name=cat["name"] if cat else None,
            iscrowd=bool(seg.get("iscrowd", 0)),
            attributes={"isthing": bool(cat["isthing"])} if cat else {},
            gt_mask=mask_codec.encode(mask[None])[0],
        )
        if cat is None:
            obj.error = f"unknown category_id {seg['category_id']}"
            obj.error_code = "category_unknown"
        elif not mask.any():
            obj.error = f"segment id {seg['id']} has no pixels in the PNG of image {image_id}"
            obj.error_code = "gt_mask_invalid"
        return obj


def open_source(cfg: SourceConfig) -> CocoPanopticSource:
    return CocoPanopticSource(cfg)
