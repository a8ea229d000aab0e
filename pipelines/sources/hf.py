"""`hf` source: a local Hugging Face `datasets` dataset with a per-image `objects` feature.

Accepted layouts: a `save_to_disk` folder (Dataset or DatasetDict), one Parquet file, or a folder of
Parquet files (`<split>-*.parquet` / `<split>/…parquet` as on the Hub, e.g. detection-datasets/coco:
`image_id`, `image` {bytes, path}, `width`, `height`, `objects` {bbox_id, category ClassLabel, bbox,
area}). `objects` may be stored as a struct of lists (`Sequence({...})`) or a list of structs.

Boxes: `bbox_format` is "xyxy" (detection-datasets/coco), "xywh" (COCO-style, e.g. cppe-5) or
"auto": the first AUTO_SAMPLE boxes decide. A box with x1 < x0 or y1 < y0 cannot be xyxy; a box that
as xywh runs more than a pixel past the image cannot be xywh. If the sample rules out neither (or
both), the source raises ValueError asking for an explicit format rather than guessing.

Category text comes from the ClassLabel names of `objects.category` (a string category is used as
is). Images: rows carry bytes (embedded) or a path; the first image row decides which kind the
dataset is. Embedded bytes are written once to `<image dir>/<sha1 of bytes>.<ext>`
(content-addressed, so reruns and reordering reuse them), and `Source.root` is that folder: the
engine gives its run's own `_images/` folder (`use_image_dir`), so nothing is ever written into the
dataset; used on its own, the source keeps them in a temporary folder. Paths are taken relative to
the dataset dir (`Source.root` then); an absolute path outside it becomes an `unsafe_path` error,
and so does a path-only image in a dataset of embedded images (its images have no common folder).
Memory: rows are read in batches of BATCH_ROWS (Arrow memory-maps `save_to_disk` data).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.records import ImageRecord, SourceObject, box_from_xyxy
from pipelines.sources import SourceConfig
from schemas.masks import from_segmentation

log = logging.getLogger(__name__)

BATCH_ROWS = 64
AUTO_SAMPLE = 2000
BBOX_FORMATS = ("auto", "xyxy", "xywh")
_ID_KEYS = ("bbox_id", "id")
_CATEGORY_KEYS = ("category", "label", "category_id")
_EXIF_ORIENTATION = 0x0112
_KNOWN_OBJECT_KEYS = {"bbox", "area", "iscrowd", "segmentation", *_ID_KEYS, *_CATEGORY_KEYS}


def _parquet_files(path: Path, split: str | None) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(path.rglob("*.parquet"))
    if split is not None:
        files = [f for f in files if f.parent.name == split or f.name.startswith(f"{split}-")
                 or f.name.startswith(f"{split}_") or f.stem == split]
    if not files:
        where = f" for split {split!r}" if split else ""
        raise FileNotFoundError(f"hf: no Parquet files{where} under {path}")
    return files


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in ("dataset_dict.json", "state.json"))


def _class_names(features: Any) -> list[str] | None:
    """ClassLabel names of objects.category (or label/category_id), whatever the nesting."""
    node = features.get("objects") if features is not None else None
    while node is not None and not isinstance(node, dict):
        node = getattr(node, "feature", None)  # List/Sequence wrappers
    if node is None:
        return None
    for key in _CATEGORY_KEYS:
        inner = node.get(key)
        while inner is not None and not hasattr(inner, "names") and hasattr(inner, "feature"):
            inner = inner.feature
        if inner is not None and hasattr(inner, "names"):
            return list(inner.names)
    return None


def _objects(value: Any) -> list[dict]:
    """`objects` as a list of dicts, from a struct of lists or a list of structs."""
    if value is None:
        return []
    if isinstance(value, list):
        return [o for o in value if o is not None]
    lengths = {len(v) for v in value.values() if isinstance(v, list)}
    n = max(lengths, default=0)
    return [{k: (v[i] if isinstance(v, list) and i < len(v) else None) for k, v in value.items()}
            for i in range(n)]


def _four_numbers(bbox: Any) -> list[float] | None:
    if not isinstance(bbox, list | tuple) or len(bbox) != 4:
        return None
    if not all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in bbox):
        return None
    return [math.nan if v is None else float(v) for v in bbox]


def displayed_size(im: Any) -> tuple[int, int]:
    """(width, height) of an opened PIL image as displayed: EXIF orientations 5..8 turn it by 90
    degrees (pipelines.images.decode_rgb applies them), so the stored size is swapped."""
    width, height = im.size
    if im.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
        return height, width
    return width, height


def decide_bbox_format(samples: list[tuple[list[float], int | None, int | None]]) -> str:
    """'xyxy' or 'xywh' from (bbox, width, height) samples; ValueError when they cannot tell."""
    not_xyxy = sum(1 for b, _, _ in samples if b[2] < b[0] or b[3] < b[1])
    not_xywh = sum(1 for b, w, h in samples if w is not None and h is not None
                   and (b[0] + b[2] > w + 1 or b[1] + b[3] > h + 1))
    if not_xyxy and not not_xywh:
        return "xywh"
    if not_xywh and not not_xyxy:
        return "xyxy"
    raise ValueError(
        f"hf: cannot tell the bbox format from {len(samples)} boxes ({not_xyxy} impossible as "
        f"xyxy, {not_xywh} impossible as xywh); pass --bbox-format xyxy or xywh"
    )


class HFSource:
    """A local `datasets` dataset (see module doc). `annotation_file` is the dataset path read."""

    def __init__(self, path: Path, split: str | None = None, *, bbox_format: str = "auto",
                 name: str = "hf"):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"hf: dataset not found: {self.path}")
        if bbox_format not in BBOX_FORMATS:
            raise ValueError(f"unknown bbox_format {bbox_format!r}; choose one of: "
                             f"{', '.join(BBOX_FORMATS)}")
        self.name = name
        self.dataset_dir = self.path.parent if self.path.is_file() else self.path
        self.root = self.dataset_dir
        self.image_dir: Path | None = None
        self.annotation_file: Path | None = self.path
        self._dataset = None
        if _is_saved_dataset(self.path):
            self._dataset, self.split = self._load_saved(split)
            self.features = self._dataset.features
        else:
            self._files = _parquet_files(self.path, split)
            self.split = split or "train"
            from datasets import Features

            self.features = Features.from_arrow_schema(pq.read_schema(self._files[0]))
        self.class_names = _class_names(self.features)
        self.bbox_format = bbox_format if bbox_format != "auto" else self._detect_format()
        self.embedded = self._has_embedded_images()
        if self.embedded:
            self.use_image_dir(None)

    def use_image_dir(self, folder: Path | None) -> None:
        """Where embedded images are written (and so the image root): `folder`, or a temporary
        folder removed with the source when None. A dataset of image paths keeps its own root."""
        if not self.embedded:
            return
        if folder is None:
            folder = Path(tempfile.mkdtemp(prefix="mqengine-hf-images-"))
            weakref.finalize(self, shutil.rmtree, folder, True)
        self.image_dir = self.root = Path(folder)

    def _has_embedded_images(self) -> bool:
        if "image" not in self.features:
            return False
        for batch in self._batches(["image"]):
            for image in batch.column("image").to_pylist():
                if isinstance(image, dict) and (image.get("bytes") or image.get("path")):
                    return bool(image.get("bytes"))
        return False

    def _load_saved(self, split: str | None):
        from datasets import DatasetDict, load_from_disk

        data = load_from_disk(str(self.path))
        if not isinstance(data, DatasetDict):
            return data, split or "train"
        if split is None and len(data) == 1:
            split = next(iter(data))
        if split not in data:
            raise ValueError(f"hf: split {split!r} not in {self.path}; choose one of: "
                             f"{', '.join(data)}")
        return data[split], split

    def _batches(self, columns: list[str] | None = None) -> Iterator[pa.Table | pa.RecordBatch]:
        if self._dataset is not None:
            ds = self._dataset.select_columns(columns) if columns else self._dataset
            yield from ds.with_format("arrow").iter(batch_size=BATCH_ROWS)
            return
        for file in self._files:
            pf = pq.ParquetFile(file)
            cols = [c for c in columns if c in pf.schema_arrow.names] if columns else None
            yield from pf.iter_batches(batch_size=BATCH_ROWS, columns=cols)

    def _detect_format(self) -> str:
        names = set(self.features)
        cols = [c for c in ("objects", "width", "height") if c in names]
        samples = []
        for batch in self._batches(cols):
            for row in batch.to_pylist():
                for obj in _objects(row.get("objects")):
                    box = _four_numbers(obj.get("bbox"))
                    if box is not None and not any(math.isnan(v) for v in box):
                        samples.append((box, row.get("width"), row.get("height")))
            if len(samples) >= AUTO_SAMPLE:
                break
        fmt = decide_bbox_format(samples[:AUTO_SAMPLE])
        log.info("hf: %s boxes look like %s", self.path, fmt)
        return fmt

    def records(self) -> Iterator[ImageRecord]:
        index = 0
        for batch in self._batches():
            for row in batch.to_pylist():
                yield self._record(row, index)
                index += 1

    def _record(self, row: dict, index: int) -> ImageRecord:
        image_id = str(row["image_id"]) if row.get("image_id") is not None else str(index)
        record = ImageRecord(image_id=image_id, file="", width=row.get("width"),
                             height=row.get("height"))
        self._attach_image(record, row.get("image"))
        record.objects = [self._object(o, k, record) for k, o in
                          enumerate(_objects(row.get("objects")))]
        return record

    def _attach_image(self, record: ImageRecord, image: Any) -> None:
        if not isinstance(image, dict) or not (image.get("bytes") or image.get("path")):
            record.error, record.error_status = "row has no image bytes or path", "missing"
            return
        if image.get("bytes"):
            record.file, size = self._cache_bytes(image["bytes"])
            if record.width is None and size is not None:
                record.width, record.height = size
            return
        path = Path(image["path"])
        if self.embedded:
            record.file = str(path)
            record.error = (f"image given by path {path} in a dataset of embedded images "
                            f"({self.dataset_dir}); embed it, or give every image by path")
            record.error_status = "unsafe_path"
            return
        if path.is_absolute():
            try:
                path = path.relative_to(self.dataset_dir)
            except ValueError:
                record.file = str(path)
                record.error = f"image path {path} is outside the dataset folder {self.dataset_dir}"
                record.error_status = "unsafe_path"
                return
        record.file = path.as_posix()

    def _cache_bytes(self, data: bytes) -> tuple[str, tuple[int, int] | None]:
        """Write embedded image bytes once (content-addressed) into the image dir; return (file
        under it, size)."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                ext, size = (im.format or "bin").lower(), displayed_size(im)
        except Exception:  # any unreadable header (a bomb, bad EXIF...): the pipeline's decode
            ext, size = "bin", None  # reports it as image_corrupt with the reason
        rel = f"{hashlib.sha1(data).hexdigest()}.{ext}"
        target = self.image_dir / rel
        if not (target.is_file() and target.stat().st_size == len(data)):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")  # outdir's temp naming
            tmp.write_bytes(data)
            tmp.replace(target)  # atomic: a reader never sees half a file
        return rel, size

    def _object(self, obj: dict, k: int, record: ImageRecord) -> SourceObject:
        ann_id = next((obj[key] for key in _ID_KEYS if obj.get(key) is not None), k)
        problems: list[tuple[str, str]] = []  # (reject code, detail); the first gives the code
        box = _four_numbers(obj.get("bbox"))
        if box is None:
            problems.append(("box_invalid", f"bbox is not 4 numbers: {obj.get('bbox')!r}"[:100]))
            box_raw: list[float] = []
        else:
            box_raw = box_from_xyxy(*box) if self.bbox_format == "xyxy" else box
        category, cid, cname = self._category(obj, problems)
        mask = None
        if obj.get("segmentation"):
            try:
                mask = from_segmentation(obj["segmentation"], record.height or 0, record.width or 0)
            except ValueError as e:  # from_segmentation validates before pycocotools sees it
                problems.append(("gt_mask_invalid",
                                 f"object {ann_id}: unreadable segmentation: {e}"))
        attributes = {key: v for key, v in obj.items() if key not in _KNOWN_OBJECT_KEYS}
        return SourceObject(ann_id=str(ann_id), category=category, box_raw=box_raw,
                            category_id=cid, category_name=cname,
                            iscrowd=bool(obj.get("iscrowd") or False), attributes=attributes,
                            gt_mask=mask, error="; ".join(d for _, d in problems) or None,
                            error_code=problems[0][0] if problems else None)

    def _category(self, obj: dict,
                  problems: list[tuple[str, str]]) -> tuple[str | None, int | None, str | None]:
        value = next((obj[key] for key in _CATEGORY_KEYS if obj.get(key) is not None), None)
        if isinstance(value, str):
            return value, None, value
        if isinstance(value, int) and not isinstance(value, bool):
            if self.class_names is None:
                return str(value), value, None
            if 0 <= value < len(self.class_names):
                name = self.class_names[value]
                return name, value, name
            problems.append(("category_unknown", f"unknown category id {value}"))
            return None, value, None
        problems.append(("category_missing", "object has no category"))
        return None, None, None


def open_source(cfg: SourceConfig) -> HFSource:
    """`--source hf --root PATH [--split NAME]`: a save_to_disk folder or Parquet file/folder."""
    path = cfg.root if cfg.root is not None else cfg.annotations
    if path is None:
        raise ValueError("source 'hf' needs --root PATH (a save_to_disk folder or Parquet files)")
    return HFSource(Path(path), cfg.split, bbox_format=getattr(cfg, "bbox_format", "auto"))
