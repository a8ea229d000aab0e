"""`coco` source: any COCO-format detection JSON (COCO, LVIS, V3Det, Objects365...) -> ImageRecords.

Boxes are COCO `[x, y, w, h]` in absolute pixels and are passed through untouched as `box_raw` (the
pipeline clips them). `segmentation` (polygons, RLE or uncompressed RLE) becomes `gt_mask` through
`schemas.masks.from_segmentation`, rasterised once with pycocotools. Annotation keys other than the
standard ones (e.g. Objects365's `isfake`, `isreflected`) are kept in `attributes`.

The file is read through `pipelines.sources.stream`: never loaded whole, records in `images` order,
built from the index's Arrow rows (`build_records`), for the whole file (`records`) or for one
range of records (`range_records`: a plan unit, read by a worker straight from the index).
Per-record problems are data, not exceptions (see `_flag` and `_object`):
- unknown or non-integer category id, bbox that is not 4 numbers, duplicate annotation id,
  unreadable segmentation -> `SourceObject.error`;
- duplicate image id -> an ImageRecord with error "duplicate image id", status `duplicate` (the
  annotations stay with the first occurrence);
- annotations whose image id is not in `images` -> one ImageRecord per unknown id, appended after
  all images, with error "annotation refers to unknown image id N", status `invalid`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from functools import lru_cache
from itertools import islice
from pathlib import Path

import pyarrow as pa

from pipelines.records import ImageRecord, SourceObject
from pipelines.sources import SourceConfig
from pipelines.sources.scan import paused_gc
from pipelines.sources.stream import (
    INDEX_MARKER,
    CocoIndex,
    build_index,
    iter_records,
    read_records,
)
from schemas.masks import from_segmentation

# file_name -> (error, error_status) for images known to be unusable, or None.
ImageCheck = Callable[[str], "tuple[str, str] | None"]


class CocoSource:
    """A COCO-format annotation file; image `file_name`s are relative to `root`.

    category_text: maps the file's category name to the category text the engine stores (default:
        the name unchanged). Objects365 uses it to fix typos and trailing spaces.
    image_check: flags known-bad images by file name (Objects365's known-missing list).
    cache_dir: where the Parquet index is kept (reused across runs while the JSON is unchanged);
        default: a temporary folder removed when the source is garbage-collected. A synthesis run
        sets it to its `_plan/` folder: the plan's units are ranges of this index.
    memory_limit: DuckDB's memory limit while sorting annotations by image, once, when the index is
        built (it spills to disk beyond); reading records afterwards needs a few batches only.
        Default: a quarter of the file's size, within 64 MB..1 GB (`sort_memory`).
    """

    def __init__(
        self,
        name: str,
        split: str,
        root: Path,
        annotation_file: Path,
        *,
        category_text: Callable[[str], str] | None = None,
        image_check: ImageCheck | None = None,
        cache_dir: Path | None = None,
        memory_limit: str | None = None,
    ):
        self.name = name
        self.split = split
        self.root = Path(root)
        self.annotation_file = Path(annotation_file)
        if not self.annotation_file.is_file():
            raise FileNotFoundError(f"{name}: annotation file not found: {self.annotation_file}")
        self.category_text = category_text or _unchanged
        self.image_check = image_check
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.memory_limit = memory_limit or sort_memory(self.annotation_file.stat().st_size)
        self._index: CocoIndex | None = None

    def index(self) -> CocoIndex:
        """Build (once) or reuse the Parquet index of the annotation file."""
        if self._index is None:
            self._index = self._load_or_build()
        return self._index

    def _load_or_build(self) -> CocoIndex:
        if self.cache_dir is None:
            base = Path(tempfile.mkdtemp(prefix="mqengine-coco-"))
            weakref.finalize(self, shutil.rmtree, base, True)
        else:
            base = self.cache_dir
        stat = self.annotation_file.stat()
        ident = f"{self.annotation_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        folder = base / f"coco-index-{hashlib.sha1(ident.encode()).hexdigest()[:16]}"
        if (folder / INDEX_MARKER).is_file():
            return load_index(folder, self.annotation_file)
        try:
            index = build_index(self.annotation_file, folder, self.memory_limit)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # ours, and incomplete: nothing to reuse
            raise
        meta = {"categories": index.categories, "n_images": index.n_images,
                "n_annotations": index.n_annotations, "n_orphans": index.n_orphans}
        tmp = folder / f".{INDEX_MARKER}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, folder / INDEX_MARKER)  # written last and atomically: the index is complete
        return index

    def records(self) -> Iterator[ImageRecord]:
        index = self.index()
        for images, anns in iter_records(index):
            yield from self.build_records(index, images, anns)

    def range_records(self, folder: Path, first: int, last: int) -> list[ImageRecord]:
        """Records [first, last) of the index in `folder` (a plan unit), numbered from `first`."""
        index = load_index(Path(folder), self.annotation_file)
        records = self.build_records(index, *read_records(index, first, last))
        for i, record in enumerate(records):
            record.index = first + i
        return records

    def build_records(self, index: CocoIndex, images: pa.Table,
                      anns: pa.Table) -> list[ImageRecord]:
        """Index rows (see `stream.read_records`) -> records. Most objects take the short branch:
        no scan-time error, known category, no duplicate id, no segmentation."""
        with paused_gc():
            return self._build(index, images, anns)

    def _build(self, index: CocoIndex, images: pa.Table, anns: pa.Table) -> list[ImageRecord]:
        categories = {c["id"]: c["name"] for c in index.categories}
        texts = {cid: self.category_text(name) for cid, name in categories.items()}
        a = anns.select(list(_ANN_COLUMNS)).to_pydict()
        rows = zip(*a.values(), strict=True)
        out = []
        im = images.select(["ord", "key", "file_name", "width", "height", "duplicate",
                            "ann_count"]).to_pydict()
        for ord_, key, file_name, width, height, duplicate, count in zip(*im.values(),
                                                                         strict=True):
            record = ImageRecord(image_id=key, file=file_name, width=width, height=height)
            objects = record.objects
            for row in islice(rows, count):
                ann_key, cid, x, y, w, h, crowd, seg, attributes, error, dup = row
                if error is None and seg is None and not dup and cid in categories:
                    objects.append(SourceObject(
                        ann_id=ann_key, category=texts[cid], box_raw=[x, y, w, h],
                        category_id=cid, category_name=categories[cid], iscrowd=crowd,
                        attributes=_attributes(attributes)))
                else:
                    ann = dict(zip(_ANN_COLUMNS, row, strict=True))
                    objects.append(self._object(ann, categories, texts, record))
            self._flag(record, ord_, key, duplicate)
            out.append(record)
        return out

    def _flag(self, record: ImageRecord, ord_: int | None, key: str, duplicate: bool) -> None:
        if ord_ is None:
            record.error = f"annotation refers to unknown image id {key}"
            record.error_status = "invalid"
        elif duplicate:
            record.error, record.error_status = "duplicate image id", "duplicate"
        elif self.image_check is not None and (flag := self.image_check(record.file)):
            record.error, record.error_status = flag

    def _object(self, ann: dict, categories: dict, texts: dict,
                record: ImageRecord) -> SourceObject:
        cid = ann["category_id"]
        errors, codes = [], []  # codes[0] becomes the object's reject_code
        if ann["error"]:  # scan time: a malformed bbox, category_id or segmentation shape
            for problem in ann["error"].split("; "):
                errors.append(problem)
                codes.append(_SCAN_CODES.get(problem.split(" ", 1)[0], "annotation_invalid"))
        if cid is not None and cid not in categories:
            errors.append(f"unknown category id {cid}")
            codes.append("category_unknown")
        if ann["duplicate"]:
            errors.append(f"duplicate annotation id {ann['ann_key']}")
            codes.append("duplicate_id")
        mask = None
        if ann["segmentation"] is not None:
            mask, seg_error = _mask(ann["segmentation"], record.height, record.width)
            if seg_error:
                errors.append(f"annotation {ann['ann_key']}: {seg_error}")
                codes.append("gt_mask_invalid")
        return SourceObject(
            ann_id=ann["ann_key"],
            category=texts.get(cid),
            box_raw=[] if ann["x"] is None else [ann["x"], ann["y"], ann["w"], ann["h"]],
            category_id=cid,
            category_name=categories.get(cid),
            iscrowd=bool(ann["iscrowd"]),
            attributes=_attributes(ann["attributes"]),
            gt_mask=mask,
            error="; ".join(errors) or None,
            error_code=codes[0] if codes else None,
        )


def sort_memory(file_bytes: int) -> str:
    """DuckDB's memory limit for sorting a file's annotations: a quarter of its size, at least
    64 MB, at most 1 GB (json.load needs ~4x the file; the 1M-box bench file, 218 MB, sorts in
    64 MB at a peak RSS of ~280 MB)."""
    return f"{min(max(file_bytes // 4, 64 * 2**20), 2**30) // 2**20}MiB"
_ANN_COLUMNS = ("ann_key", "category_id", "x", "y", "w", "h", "iscrowd", "segmentation",
                "attributes", "error", "duplicate")


@lru_cache(maxsize=8)
def _load_index(folder: Path, json_path: Path) -> CocoIndex:
    meta = json.loads((folder / INDEX_MARKER).read_text())
    return CocoIndex(json_path, folder, meta["categories"], meta["n_images"],
                     meta["n_annotations"], meta["n_orphans"])


def load_index(folder: Path, json_path: Path) -> CocoIndex:
    """The complete index in `folder` (its marker, written last, says so); FileNotFoundError when
    it is not there (e.g. a run folder copied without its `_plan/`)."""
    if not (folder / INDEX_MARKER).is_file():
        raise FileNotFoundError(f"annotation index not found or incomplete: {folder}")
    return _load_index(folder, json_path)


# First word of a scan-time error (pipelines.sources.stream._ann_row) -> its reject code.
_SCAN_CODES = {"bbox": "box_invalid", "segmentation:": "gt_mask_invalid"}

_PARSED_ATTRIBUTES: dict[str, dict] = {}


def _attributes(text: str | None) -> dict:
    """Parsed attribute JSON; memoised: the same few texts repeat across millions of boxes."""
    if not text:
        return {}
    parsed = _PARSED_ATTRIBUTES.get(text)
    if parsed is None:
        if len(_PARSED_ATTRIBUTES) > 4096:
            _PARSED_ATTRIBUTES.clear()
        parsed = _PARSED_ATTRIBUTES[text] = json.loads(text)
    return dict(parsed)  # a copy: callers may edit their object's attributes


def _unchanged(name: str) -> str:
    return name


def _mask(segmentation: str, height: int | None,
          width: int | None) -> tuple[dict | None, str | None]:
    """A COCO segmentation (JSON text) -> (mask value, None) or (None, why it cannot be used)."""
    seg = json.loads(segmentation)
    if isinstance(seg, list) and (height is None or width is None):
        return None, "polygon segmentation needs the image width and height"
    try:
        return from_segmentation(seg, height or 0, width or 0), None
    except ValueError as e:  # from_segmentation validates everything before pycocotools
        return None, f"unreadable segmentation: {e}"


def open_source(cfg: SourceConfig) -> CocoSource:
    """`--source coco --annotations FILE [--root DIR] [--split NAME]`; root: FILE's folder."""
    if cfg.annotations is None:
        raise ValueError("source 'coco' needs --annotations FILE (a COCO-format JSON)")
    annotations = Path(cfg.annotations)
    root = Path(cfg.root) if cfg.root is not None else annotations.parent
    return CocoSource("coco", cfg.split or annotations.stem, root=root, annotation_file=annotations)
