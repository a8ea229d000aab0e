"""COCO-format JSON -> a Parquet index grouped by image -> records, with bounded memory.

Why: Objects365 v2 train is one JSON document of ~1.7M images and tens of millions of boxes;
`json.load` of it needs tens of GB. Instead, `build_index` (once per file, cached by the caller):

1. streams the file with ijson (the C backend `yajl2_c` when installed) in three C-speed passes,
   `categories` (kept, it is small), `images` and `annotations` (converted to rows and written to
   Parquet in batches of BATCH_ROWS);
2. has DuckDB, with a memory limit and a spill folder, write `images.parquet` (file order, duplicate
   ids flagged) and `annotations.parquet` sorted by the position of their image in `images`
   (unknown image ids last, grouped by id; duplicate annotation ids flagged). DuckDB sorts, joins
   and aggregates larger-than-memory data by spilling to disk.

`iter_groups` then merges the two sorted files: records come out in `images` order, reading a few
small row groups at a time, however often it is called. Malformed files raise `ValueError` naming
the file, the JSON path or byte offset, and the reason.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import reprlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import ijson
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.masks import check_segmentation_shape

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 16
BATCH_ROWS = 4_096  # rows per Parquet write while indexing (and per row group)
READ_ROWS = 1_024  # rows per batch when reading the index back
# Annotation keys with their own column; any other key (isfake, isreflected...) goes to attributes.
ANN_KEYS = ("id", "image_id", "category_id", "bbox", "iscrowd", "segmentation", "area")

IMAGES_SCHEMA = pa.schema(
    [("ord", pa.int64()), ("key", pa.string()), ("file_name", pa.string()),
     ("width", pa.int64()), ("height", pa.int64())]
)
# The box is four float columns (null when it is not 4 numbers): much cheaper to write than a list.
ANNS_SCHEMA = pa.schema(
    [("ord", pa.int64()), ("ann_key", pa.string()), ("image_key", pa.string()),
     ("category_id", pa.int64()), ("x", pa.float64()), ("y", pa.float64()), ("w", pa.float64()),
     ("h", pa.float64()), ("iscrowd", pa.bool_()), ("segmentation", pa.string()),
     ("attributes", pa.string()), ("error", pa.string())]
)


@dataclass
class CocoIndex:
    """Where `build_index` put the Parquet index of one annotation file, and its categories."""

    json_path: Path
    folder: Path
    categories: list[dict]
    n_images: int
    n_annotations: int

    @property
    def images(self) -> Path:
        return self.folder / "images.parquet"

    @property
    def annotations(self) -> Path:
        return self.folder / "annotations.parquet"


def ijson_backend() -> Any:
    """The fastest installed ijson backend (yajl2_c, a C extension, is ~10x the pure-Python one)."""
    for name in ("yajl2_c", "yajl2_cffi", "yajl2", "python"):
        try:
            return ijson.get_backend(name)
        except ImportError:
            continue
    raise ImportError("no ijson backend could be loaded; pip install ijson")


def _fail(path: Path, where: str, reason: str) -> ValueError:
    return ValueError(f"{path}: {where}: {reason}")


def _id_key(value: Any, path: Path, where: str) -> str:
    """An image/annotation id as text; ints and strings are both seen in COCO-format files."""
    if isinstance(value, bool) or not isinstance(value, int | str | float):
        raise _fail(path, where, f"id must be an integer or a string, got {reprlib.repr(value)}")
    if isinstance(value, float):
        if not value.is_integer():
            raise _fail(path, where, f"id must be an integer or a string, got {value!r}")
        value = int(value)
    return str(value)


def _opt_int(value: Any, path: Path, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(path, where, f"expected a number, got {reprlib.repr(value)}")
    return int(value)


def _brief(value: Any, limit: int) -> str:
    """A value as JSON for a message, cut to `limit`; reprlib for values nested too deeply for
    json (it stops at 6 levels)."""
    try:
        return json.dumps(value)[:limit]
    except (RecursionError, TypeError, ValueError):
        return reprlib.repr(value)[:limit]


def _is_number(v: Any) -> bool:
    return type(v) in _NUMBER  # exact types: bool is not a number here


_NUMBER = (int, float)
_ANN_KEY_SET = frozenset(ANN_KEYS)


class _ParquetSink:
    """Appends rows (tuples in schema order) to one Parquet file in batches of BATCH_ROWS."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.schema = schema
        self.writer = pq.ParquetWriter(path, schema)
        self.rows: list[tuple] = []
        self.count = 0

    def add(self, row: tuple) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            columns = [pa.array(col, type=f.type)
                       for col, f in zip(zip(*self.rows, strict=True), self.schema, strict=True)]
            self.writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


def _image_row(item: Any, ord_: int, path: Path) -> tuple:
    where = f"images[{ord_}]"
    if type(item) is not dict:
        raise _fail(path, where, f"expected an object, got {type(item).__name__}")
    if "id" not in item:
        raise _fail(path, where, "missing 'id'")
    file_name = item.get("file_name")
    if type(file_name) is not str:
        raise _fail(path, where, f"'file_name' must be a string, got {reprlib.repr(file_name)}")
    return (ord_, _id_key(item["id"], path, where + ".id"), file_name,
            _opt_int(item.get("width"), path, where + ".width"),
            _opt_int(item.get("height"), path, where + ".height"))


_ATTRIBUTE_TEXT: dict[tuple, str] = {}
_SORTED_KEYS: dict[frozenset, tuple] = {}


def _attributes(item: dict, keys: set) -> str:
    """JSON text of the non-standard keys, sorted; memoised (isfake 0, isreflected 0 repeat)."""
    names = _SORTED_KEYS.get(frozen := frozenset(keys))
    if names is None:
        names = _SORTED_KEYS[frozen] = tuple(sorted(keys))
    values = tuple(map(item.__getitem__, names))
    # Value types are part of the key: 1, 1.0 and true hash alike but print differently.
    key = (names, values, tuple(map(type, values)))
    try:
        return _ATTRIBUTE_TEXT[key]
    except KeyError:
        pass
    except TypeError:  # a list or object value: not hashable, not worth caching
        return json.dumps(dict(zip(names, values, strict=True)))
    if len(_ATTRIBUTE_TEXT) > 4096:
        _ATTRIBUTE_TEXT.clear()
        _SORTED_KEYS.clear()
    text = _ATTRIBUTE_TEXT[key] = json.dumps(dict(zip(names, values, strict=True)))
    return text


def _ann_row(item: Any, ord_: int, path: Path) -> tuple:
    """One `annotations` entry -> a row of ANNS_SCHEMA. Called tens of millions of times: the common
    case (int ids, 4-number bbox) takes the fast branches."""
    if type(item) is not dict:
        raise _fail(path, f"annotations[{ord_}]", f"expected an object, got {type(item).__name__}")
    try:
        ann_id, image_id = item["id"], item["image_id"]
    except KeyError as e:
        raise _fail(path, f"annotations[{ord_}]", f"missing {e.args[0]!r}") from None
    ann_key = (str(ann_id) if type(ann_id) is int
               else _id_key(ann_id, path, f"annotations[{ord_}].id"))
    image_key = (str(image_id) if type(image_id) is int
                 else _id_key(image_id, path, f"annotations[{ord_}].image_id"))
    errors = []
    cid = item.get("category_id")
    if type(cid) is not int:
        if type(cid) is float and cid.is_integer():
            cid = int(cid)
        else:
            errors.append(f"category_id is not an integer: {_brief(cid, 40)}")
            cid = None
    bbox = item.get("bbox")
    if (type(bbox) is list and len(bbox) == 4 and type(bbox[0]) in _NUMBER
            and type(bbox[1]) in _NUMBER and type(bbox[2]) in _NUMBER and type(bbox[3]) in _NUMBER):
        x, y, w, h = bbox
    elif type(bbox) is list and len(bbox) == 4 and all(v is None or _is_number(v) for v in bbox):
        # JSON has no NaN; writers such as pandas emit null for it. Passed on as NaN, for the
        # pipeline to reject like any other NaN box.
        x, y, w, h = (math.nan if v is None else v for v in bbox)
    else:
        errors.append(f"bbox is not 4 numbers: {_brief(bbox, 80)}")
        x = y = w = h = None
    seg = item.get("segmentation")
    if seg and (problem := check_segmentation_shape(seg)):
        # Checked before json.dumps (a 20k-deep list recursed) and DuckDB (a 57 MB polygon ran
        # the index sort out of memory); the object is rejected as gt_mask_invalid.
        errors.append(f"segmentation: {problem}")
        seg = None
    extra_keys = item.keys() - _ANN_KEY_SET
    attributes = None
    if extra_keys:
        try:
            attributes = _attributes(item, extra_keys)
        except RecursionError:
            errors.append(f"attributes nest too deeply to store: {sorted(extra_keys)!r}"[:100])
    return (ord_, ann_key, image_key, cid, x, y, w, h, bool(item.get("iscrowd", 0)),
            json.dumps(seg) if seg else None, attributes, "; ".join(errors) or None)


def _check_categories(categories: Any, path: Path) -> list[dict]:
    if not isinstance(categories, list):
        raise _fail(path, "categories", f"expected an array, got {type(categories).__name__}")
    seen: set[int] = set()
    for i, cat in enumerate(categories):
        where = f"categories[{i}]"
        if not isinstance(cat, dict):
            raise _fail(path, where, f"expected an object, got {type(cat).__name__}")
        cid, name = cat.get("id"), cat.get("name")
        if not (_is_number(cid) and float(cid).is_integer()):
            raise _fail(path, where, f"'id' must be an integer, got {reprlib.repr(cid)}")
        if not isinstance(name, str):
            raise _fail(path, where, f"'name' must be a string, got {reprlib.repr(name)}")
        if int(cid) in seen:
            raise _fail(path, where, f"duplicate category id {int(cid)}")
        seen.add(int(cid))
    return [{**c, "id": int(c["id"])} for c in categories]


def _error_offset(message: str, chunk: bytes, chunk_start: int) -> int | None:
    """Byte offset of a yajl parse error: its message quotes the text around it with a caret."""
    lines = message.splitlines()
    if len(lines) < 3 or "^" not in lines[2]:
        return None
    context = lines[1]
    text = context.lstrip(" ")
    if not text:  # premature EOF: nothing left to quote
        return chunk_start + len(chunk)
    # yajl prints newlines and tabs of the quoted text as spaces.
    flat = chunk.replace(b"\n", b" ").replace(b"\r", b" ").replace(b"\t", b" ")
    found = flat.find(text.encode("utf-8", "replace"))
    if found < 0:
        return None
    # yajl's caret sits just past the byte where it stopped (inside or after the bad token).
    return max(chunk_start + found + lines[2].index("^") - (len(context) - len(text)) - 1, 0)


class _TrackedReader:
    """A binary reader that remembers the last chunk handed to ijson and where it began."""

    def __init__(self, f: Any):
        self.f, self.offset, self.chunk = f, 0, b""

    def read(self, n: int = -1) -> bytes:
        if n == 0:  # ijson probes the type with read(0)
            return b""
        self.offset += len(self.chunk)
        self.chunk = self.f.read(n)
        return self.chunk


def _line_col(path: Path, offset: int) -> str:
    """'line L, column C' (1-based) of a byte offset; only computed on the error path."""
    line, line_start, done = 1, 0, 0
    with open(path, "rb") as f:
        while done < offset and (chunk := f.read(min(CHUNK_BYTES * 16, offset - done))):
            newlines = chunk.count(b"\n")
            if newlines:
                line += newlines
                line_start = done + chunk.rindex(b"\n") + 1
            done += len(chunk)
    return f"line {line}, column {offset - line_start + 1}"


def _items(path: Path, prefix: str) -> Iterator[Any]:
    """ijson items at `prefix`; a JSON syntax error becomes ValueError with the byte offset."""
    count = 0
    with open(path, "rb") as f:
        reader = _TrackedReader(f)
        try:
            for item in ijson_backend().items(reader, prefix, use_float=True, buf_size=CHUNK_BYTES):
                yield item
                count += 1
        except ijson.JSONError as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            at = _error_offset(str(e), reader.chunk, reader.offset)
            where = (f"near byte {at} ({_line_col(path, at)})" if at is not None
                     else f"bytes {reader.offset}..{reader.offset + len(reader.chunk)}")
            if count and prefix.endswith(".item"):
                where += f" (at or after {prefix[:-5]}[{count}])"
            raise _fail(path, where, f"invalid JSON: {reason}") from None


def _top_level_types(path: Path) -> dict[str, str]:
    """Top-level key -> JSON type: a slower event pass, run only when a needed array was empty."""
    types: dict[str, str] = {}
    key = None
    for prefix, event, value in ijson_backend().parse(open(path, "rb")):
        if prefix == "" and event == "map_key":
            key = value
        elif prefix == key and key is not None:
            types[key] = {"start_array": "array", "start_map": "object"}.get(event, event)
            key = None
    return types


def _check_top_level(path: Path) -> None:
    """`images` and `annotations` must be top-level arrays (checked when one came out empty)."""
    types = _top_level_types(path)
    for key in ("images", "annotations"):
        if key not in types:
            raise _fail(path, "$", f"missing top-level key {key!r}")
        if types[key] != "array":
            raise _fail(path, key, f"expected an array, got {types[key]}")


def build_index(json_path: Path, folder: Path, memory_limit: str = "256MB") -> CocoIndex:
    """Stream `json_path` into `folder`/{images,annotations}.parquet. Memory: one batch of rows.

    Three C-speed ijson passes (categories, images, annotations): the C tokenizer is far faster than
    routing every JSON event through Python to split one pass three ways.
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise FileNotFoundError(f"annotation file not found: {json_path}")
    folder.mkdir(parents=True, exist_ok=True)
    found = list(_items(json_path, "categories"))
    if not found:
        with open(json_path, "rb") as f:
            head = f.read(4096).lstrip()
        if not head.startswith(b"{"):
            raise _fail(json_path, "byte 0", "the top level is not a JSON object")
        raise _fail(json_path, "$", "missing top-level key 'categories'")
    categories = _check_categories(found[0], json_path)
    counts = []
    for name, prefix, schema, to_row in (
        ("raw_images", "images.item", IMAGES_SCHEMA, _image_row),
        ("raw_anns", "annotations.item", ANNS_SCHEMA, _ann_row),
    ):
        sink = _ParquetSink(folder / f"{name}.parquet", schema)
        try:
            for i, item in enumerate(_items(json_path, prefix)):
                sink.add(to_row(item, i, json_path))
        finally:
            sink.close()
        counts.append(sink.count)
    index = CocoIndex(json_path, folder, categories, counts[0], counts[1])
    if not (index.n_images and index.n_annotations):
        _check_top_level(json_path)
    _group(folder, memory_limit)
    log.info("indexed %s: %d images, %d annotations, %d categories", json_path, index.n_images,
             index.n_annotations, len(index.categories))
    return index


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MIN_BYTES_PER_THREAD = 16 * 2**20  # below this a DuckDB thread can run out of memory in the sort


def parse_bytes(text: str) -> int:
    """'512MB', '1GB', '2GiB' -> bytes (DuckDB's own spelling of sizes)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise ValueError(f"memory_limit {text!r} is not a size like '512MB' or '2GB'")
    return int(float(match.group(1)) * _UNITS[unit])


def _connect(folder: Path, memory_limit: str) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that spills to `folder`/duckdb_tmp beyond `memory_limit`; as many
    threads as the limit can feed (each sorting thread needs its own buffers)."""
    threads = max(1, min(os.cpu_count() or 1, parse_bytes(memory_limit) // MIN_BYTES_PER_THREAD))
    con = duckdb.connect()
    tmp = folder / "duckdb_tmp"
    tmp.mkdir(exist_ok=True)
    con.execute(f"SET memory_limit='{memory_limit}'")
    con.execute(f"SET threads={threads}")
    con.execute(f"SET temp_directory='{tmp.as_posix()}'")
    con.execute("SET preserve_insertion_order=true")
    return con


# Images in file order, flagged when their id was already used by an earlier entry.
IMAGES_SQL = """
COPY (
    SELECT i.ord, i.key, i.file_name, i.width, i.height, i.ord <> f.first_ord AS duplicate
    FROM read_parquet('{raw_images}') i
    JOIN (SELECT key, min(ord) AS first_ord FROM read_parquet('{raw_images}') GROUP BY key) f
      ON i.key = f.key
    ORDER BY i.ord
) TO '{images}' (FORMAT parquet, ROW_GROUP_SIZE {row_group})
"""

# Annotations sorted by the position of their image in `images` (unknown image ids last, grouped by
# id), flagged when their annotation id was already used.
GROUPED_SQL = """
COPY (
    WITH first_image AS (
        SELECT key, min(ord) AS img_ord FROM read_parquet('{raw_images}') GROUP BY key),
    dup_ann AS (
        SELECT ann_key, min(ord) AS first_ord FROM read_parquet('{raw_anns}')
        GROUP BY ann_key HAVING count(*) > 1)
    SELECT f.img_ord, a.image_key, a.ann_key, a.category_id, a.x, a.y, a.w, a.h, a.iscrowd,
           a.segmentation, a.attributes, a.error,
           coalesce(a.ord <> d.first_ord, false) AS duplicate
    FROM read_parquet('{raw_anns}') a
    LEFT JOIN first_image f ON a.image_key = f.key
    LEFT JOIN dup_ann d ON a.ann_key = d.ann_key
    ORDER BY f.img_ord NULLS LAST, a.image_key, a.ord
) TO '{anns}' (FORMAT parquet, ROW_GROUP_SIZE {row_group})
"""


def _group(folder: Path, memory_limit: str) -> None:
    """Sort once, out of core: DuckDB spills to `folder`/duckdb_tmp beyond `memory_limit`.

    Reading records later is then a merge of two Parquet files already in order: no sort, no
    DuckDB, a few batches of memory, however often `records()` is called.
    """
    paths = {"raw_images": folder / "raw_images.parquet", "raw_anns": folder / "raw_anns.parquet",
             "images": folder / "images.parquet", "anns": folder / "annotations.parquet"}
    con = _connect(folder, memory_limit)
    try:
        # Small row groups: a reader decodes a whole row group at a time.
        sql = {**{k: v.as_posix() for k, v in paths.items()}, "row_group": BATCH_ROWS}
        con.execute(IMAGES_SQL.format(**sql))
        con.execute(GROUPED_SQL.format(**sql))
    finally:
        con.close()
    paths["raw_images"].unlink()
    paths["raw_anns"].unlink()
    shutil.rmtree(folder / "duckdb_tmp", ignore_errors=True)


def _parquet_rows(path: Path) -> Iterator[dict]:
    for batch in pq.ParquetFile(path).iter_batches(READ_ROWS):
        columns = batch.to_pydict()
        for values in zip(*columns.values(), strict=True):
            yield dict(zip(columns, values, strict=True))


def iter_groups(index: CocoIndex) -> Iterator[tuple[dict, list[dict]]]:
    """Yield (image row, annotation rows) in `images` order, then (orphan row, rows) per unknown id.

    An image row has ord, key, file_name, width, height and `duplicate` (its id was seen before; its
    annotations go to the first occurrence). An orphan row has ord None, the unknown key, no file.
    Annotation rows carry `duplicate` (their annotation id was seen before) and scan-time `error`.
    Both files are already in this order (see `_group`), so this is a streaming merge.
    """
    anns = _parquet_rows(index.annotations)
    pending = next(anns, None)
    for image in _parquet_rows(index.images):
        group = []
        while pending is not None and pending["img_ord"] == image["ord"]:
            group.append(pending)
            pending = next(anns, None)
        yield image, group
    while pending is not None:  # annotations whose image id is not in `images`
        key, group = pending["image_key"], []
        while pending is not None and pending["image_key"] == key:
            group.append(pending)
            pending = next(anns, None)
        yield {"ord": None, "key": key, "file_name": "", "width": None, "height": None,
               "duplicate": False}, group
