"""COCO-format JSON -> a Parquet index grouped by image, read back by record range.

Why: Objects365 v2 train is one JSON document of ~1.7M images and tens of millions of boxes;
`json.load` of it needs tens of GB. Instead, `build_index` (once per file, cached by the caller):

1. reads the file once (`scan`: Python's C JSON scanner, one array element at a time), converts
   `images` and `annotations` in batches of BATCH_ROWS to Arrow (`rows`: whole columns at a time
   when a batch is uniform) and appends them to two raw Parquet files; `categories` is kept;
2. has DuckDB, with a memory limit and a spill folder, write `images.parquet` (file order, duplicate
   ids flagged, and where each image's annotations are: `ann_start`, `ann_count`),
   `annotations.parquet` sorted by the position of their image in `images` (unknown image ids
   last, grouped by id; duplicate annotation ids flagged) and `orphans.parquet` (one row per
   unknown image id). DuckDB sorts, joins and aggregates larger-than-memory data by spilling.
   When the annotations already come grouped by image in `images` order (Objects365 and COCO
   files usually do), `_write_in_order` writes the same three files in one pass, without the sort.

Records are numbered: images in file order, then the orphan groups. `read_records(index, a, b)`
reads records [a, b) and exactly their annotation rows, a few row groups, from anywhere (a plan
unit is such a range). Malformed files raise `ValueError` naming the file, the JSON path or byte
offset, and the reason.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from pathlib import Path
from typing import Any

import duckdb
import ijson
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.sources.rows import (
    ANNS_SCHEMA,
    IMAGES_SCHEMA,
    ann_table,
    check_categories,
    image_table,
)
from pipelines.sources.scan import SyntaxProblem, ijson_backend, paused_gc, scan

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 16
BATCH_ROWS = 8_192  # entries per conversion batch and raw Parquet write (~6 MB of dicts)
ROW_GROUP = 4_096  # rows per row group of the index: a unit reads a few of them
READ_IMAGES = 1_024  # records per read when iterating over the whole index
INDEX_MARKER = "index.json"  # written last into an index folder: the index is complete
RAW_COMPRESSION = "none"  # of the two temporary raw files
WALK_ROWS = 16_384  # rows per batch of the sort-free path


@dataclass
class CocoIndex:
    """Where `build_index` put the Parquet index of one annotation file, and its categories."""

    json_path: Path
    folder: Path
    categories: list[dict]
    n_images: int
    n_annotations: int
    n_orphans: int  # annotations' image ids that are not in `images`

    @property
    def n_records(self) -> int:
        return self.n_images + self.n_orphans

    @property
    def images(self) -> Path:
        return self.folder / "images.parquet"

    @property
    def annotations(self) -> Path:
        return self.folder / "annotations.parquet"

    @property
    def orphans(self) -> Path:
        return self.folder / "orphans.parquet"


def _fail(path: Path, where: str, reason: str) -> ValueError:
    return ValueError(f"{path}: {where}: {reason}")


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


class _RawWriter:
    """Appends converted batches of one top-level array to a raw Parquet file."""

    def __init__(self, path: Path, schema: pa.Schema, convert: Any, json_path: Path):
        # Uncompressed: the file is read once and deleted; compressing it cost more than it saved.
        # Dictionaries and statistics stay: without them DuckDB's sort ran out of 32 MB.
        self.writer = pq.ParquetWriter(path, schema, compression=RAW_COMPRESSION)
        self.convert, self.json_path, self.count = convert, json_path, 0

    def add(self, items: list, start: int) -> None:
        # Numbered by this writer, not by `start`: a key given twice continues the numbering.
        self.writer.write_table(self.convert(items, self.count, self.json_path))
        self.count += len(items)


def _raise_syntax_error(path: Path, problem: Exception) -> None:
    """The file is not valid JSON: re-read it with ijson, whose error names the byte offset,
    line and column; only when ijson accepts it, a message from our own scanner's view."""
    for _ in _items(path, "\x00"):  # a prefix nothing matches: yajl only validates
        pass
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"{"):
        raise _fail(path, "byte 0", "the top level is not a JSON object")
    raise _fail(path, "$", f"invalid JSON: {problem}")


def _check_top_level(path: Path, kept: dict, types: dict) -> list[dict]:
    if "categories" not in kept:
        raise _fail(path, "$", "missing top-level key 'categories'")
    categories = check_categories(kept["categories"], path)
    for key in ("images", "annotations"):
        if key not in types:
            raise _fail(path, "$", f"missing top-level key {key!r}")
        if types[key] != "array":
            raise _fail(path, key, f"expected an array, got {types[key]}")
    return categories


def build_index(json_path: Path, folder: Path, memory_limit: str = "256MB") -> CocoIndex:
    """Read `json_path` once into `folder`/{images,annotations,orphans}.parquet.

    Memory: one text chunk, one batch of BATCH_ROWS entries, and DuckDB's `memory_limit` while it
    sorts (it spills to disk beyond).
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise FileNotFoundError(f"annotation file not found: {json_path}")
    folder.mkdir(parents=True, exist_ok=True)
    writers = {
        "images": _RawWriter(folder / "raw_images.parquet", IMAGES_SCHEMA, image_table, json_path),
        "annotations": _RawWriter(folder / "raw_anns.parquet", ANNS_SCHEMA, ann_table, json_path),
    }
    try:
        with paused_gc():
            kept, types = scan(json_path, {k: w.add for k, w in writers.items()},
                               ("categories",), BATCH_ROWS)
    except (SyntaxProblem, UnicodeDecodeError) as e:
        _raise_syntax_error(json_path, e)
        raise AssertionError("unreachable") from None
    finally:
        for w in writers.values():
            w.writer.close()
    categories = _check_top_level(json_path, kept, types)
    pa.default_memory_pool().release_unused()  # the scan's batches: give their pages back
    n_orphans = 0 if _write_in_order(folder) else _group(folder, memory_limit)
    index = CocoIndex(json_path, folder, categories, writers["images"].count,
                      writers["annotations"].count, n_orphans)
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


# Images in file order, flagged when their id was already used by an earlier entry (their
# annotations go to the first), with where their annotations are in the sorted file.
IMAGES_SQL = """
COPY (
    WITH first_image AS (
        SELECT key, min(ord) AS first_ord FROM read_parquet('{raw_images}') GROUP BY key),
    counts AS (
        SELECT f.first_ord, count(*) AS n FROM read_parquet('{raw_anns}') a
        JOIN first_image f ON a.image_key = f.key GROUP BY f.first_ord)
    SELECT i.ord, i.key, i.file_name, i.width, i.height, i.ord <> f.first_ord AS duplicate,
           CAST(coalesce(sum(c.n) OVER (ORDER BY i.ord ROWS BETWEEN UNBOUNDED PRECEDING
                                        AND 1 PRECEDING), 0) AS BIGINT) AS ann_start,
           CAST(coalesce(c.n, 0) AS BIGINT) AS ann_count
    FROM read_parquet('{raw_images}') i
    JOIN first_image f ON i.key = f.key
    LEFT JOIN counts c ON c.first_ord = i.ord
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

# One row per unknown image id, in the order of the sorted file's tail (by id text).
ORPHANS_SQL = """
COPY (
    WITH orphan AS (
        SELECT image_key AS key, count(*) AS n FROM read_parquet('{raw_anns}')
        WHERE image_key NOT IN (SELECT key FROM read_parquet('{raw_images}')) GROUP BY image_key)
    SELECT CAST(NULL AS BIGINT) AS ord, key, '' AS file_name, CAST(NULL AS BIGINT) AS width,
           CAST(NULL AS BIGINT) AS height, false AS duplicate,
           CAST({matched} + coalesce(sum(n) OVER (ORDER BY key ROWS BETWEEN UNBOUNDED PRECEDING
                                                  AND 1 PRECEDING), 0) AS BIGINT) AS ann_start,
           CAST(n AS BIGINT) AS ann_count
    FROM orphan ORDER BY key
) TO '{orphans}' (FORMAT parquet, ROW_GROUP_SIZE {row_group})
"""


def _group(folder: Path, memory_limit: str) -> int:
    """Sort once, out of core: DuckDB spills to `folder`/duckdb_tmp beyond `memory_limit`.
    Returns the number of orphan groups (unknown image ids).

    Reading records later is then a slice of files already in order: no sort, no DuckDB, a few
    row groups of memory, however often and wherever `read_records` is called.
    """
    paths = {"raw_images": folder / "raw_images.parquet", "raw_anns": folder / "raw_anns.parquet",
             "images": folder / "images.parquet", "anns": folder / "annotations.parquet",
             "orphans": folder / "orphans.parquet"}
    con = _connect(folder, memory_limit)
    try:
        # Small row groups: a reader decodes a whole row group at a time.
        sql = {**{k: v.as_posix() for k, v in paths.items()}, "row_group": ROW_GROUP}
        con.execute(IMAGES_SQL.format(**sql))
        con.execute(GROUPED_SQL.format(**sql))
        (matched,), = con.execute(
            f"SELECT coalesce(sum(ann_count), 0) FROM read_parquet('{sql['images']}')").fetchall()
        con.execute(ORPHANS_SQL.format(**sql, matched=int(matched)))
        (n_orphans,), = con.execute(
            f"SELECT count(*) FROM read_parquet('{sql['orphans']}')").fetchall()
    finally:
        con.close()
    paths["raw_images"].unlink()
    paths["raw_anns"].unlink()
    shutil.rmtree(folder / "duckdb_tmp", ignore_errors=True)
    return int(n_orphans)


class _Unordered(Exception):
    """The annotations are not grouped by image in `images` order: the sort is needed."""


def _image_keys(keys: pa.ChunkedArray) -> Iterator[tuple[int, str]]:
    """(ordinal, id text) of each image, a chunk of Python strings at a time (not all at once)."""
    ordinal = 0
    for chunk in keys.chunks:
        for lo in range(0, len(chunk), WALK_ROWS):
            for key in chunk.slice(lo, WALK_ROWS).to_pylist():
                yield ordinal, key
                ordinal += 1


class _OrderWalk:
    """Follows the annotations' image ids along `images`: each run of one id must be the next
    image with that id or the current one. Gives each annotation its image ordinal, and counts."""

    def __init__(self, keys: pa.ChunkedArray):
        self.images = _image_keys(keys)
        self.counts = np.zeros(len(keys), dtype=np.int64)
        self.ordinal, self.key = -1, None

    def _seek(self, key: str) -> int:
        if key != self.key:
            for ordinal, image_key in self.images:
                if image_key == key:
                    self.ordinal, self.key = ordinal, image_key
                    break
            else:  # an unknown id, or one whose image came earlier: out of order
                raise _Unordered
        return self.ordinal

    def ordinals(self, image_keys: pa.Array) -> np.ndarray:
        n = len(image_keys)
        if image_keys.null_count:
            raise _Unordered
        changed = pc.not_equal(image_keys.slice(1), image_keys.slice(0, n - 1))
        starts = np.concatenate([[0], pc.indices_nonzero(changed).to_numpy() + 1]).astype(np.int64)
        lengths = np.diff(np.append(starts, n))
        runs = np.array([self._seek(k) for k in pc.take(image_keys, starts).to_pylist()],
                        dtype=np.int64)
        np.add.at(self.counts, runs, lengths)
        return np.repeat(runs, lengths)


def _raw(path: Path) -> pq.ParquetFile:
    """A raw file read a batch at a time; pre-buffering would hold most of it in memory."""
    return pq.ParquetFile(path, pre_buffer=False)


def _int_ids(raw_anns: Path) -> np.ndarray | None:
    """The annotation ids as int64, a batch at a time; None unless every id is an integer's
    canonical text ("007" and "7" are different ids with one integer)."""
    file = _raw(raw_anns)
    out = np.empty(file.metadata.num_rows, dtype=np.int64)
    done = 0
    for batch in file.iter_batches(batch_size=WALK_ROWS, columns=["ann_key"]):
        keys = batch.column(0)
        try:
            ids = pc.cast(keys, pa.int64())
        except pa.ArrowInvalid:  # a non-integer id: DuckDB compares the texts
            return None
        if not pc.all(pc.equal(pc.cast(ids, pa.string()), keys)).as_py():
            return None
        out[done:done + len(ids)] = ids.to_numpy()
        done += len(ids)
    return out


def _duplicate_flags(raw_anns: Path) -> np.ndarray | None:
    """Per annotation row (file order): its id was used by an earlier row. One numpy sort of the
    ids when they are integers (Objects365, COCO); None otherwise."""
    ids = _int_ids(raw_anns)
    if ids is None:
        return None
    order = np.argsort(ids, kind="stable")  # stable: the first use of an id sorts first
    ids = ids[order]  # (the unsorted ids are freed here)
    flags = np.zeros(len(ids), dtype=bool)
    flags[order[1:][ids[1:] == ids[:-1]]] = True
    return flags


ANN_COLUMNS = ("image_key", "ann_key", "category_id", "x", "y", "w", "h", "iscrowd",
               "segmentation", "attributes", "error")


def _sorted_anns(batch: pa.RecordBatch, img_ord: np.ndarray, duplicate: np.ndarray) -> pa.Table:
    """A raw batch in the columns GROUPED_SQL writes (img_ord first, `duplicate` last)."""
    arrays = [pa.array(img_ord), *(batch.column(c) for c in ANN_COLUMNS), pa.array(duplicate)]
    return pa.Table.from_arrays(arrays, names=["img_ord", *ANN_COLUMNS, "duplicate"])


def _write_in_order(folder: Path) -> bool:
    """The sort-free path: when every annotation's image id is a distinct, known image and the
    annotations already come grouped by image in `images` order (Objects365 and COCO files
    usually do), write the same three files as `_group` in one pass over the raw files.

    Returns False, having written nothing that stays, when the file is not so ordered.
    """
    raw_images, raw_anns = folder / "raw_images.parquet", folder / "raw_anns.parquet"
    keys = pq.read_table(raw_images, columns=["key"]).column("key")
    if pc.count_distinct(keys).as_py() != len(keys):  # a repeated image id: DuckDB flags it
        return False
    walk = _OrderWalk(keys)
    anns = folder / "annotations.parquet"
    duplicate = _duplicate_flags(raw_anns)
    if duplicate is None:
        return False
    try:
        writer = None
        done = 0
        try:
            for batch in _raw(raw_anns).iter_batches(batch_size=WALK_ROWS):
                table = _sorted_anns(batch, walk.ordinals(batch.column("image_key")),
                                     duplicate[done:done + batch.num_rows])
                done += batch.num_rows
                writer = writer or pq.ParquetWriter(anns, table.schema)
                writer.write_table(table, row_group_size=ROW_GROUP)
        finally:
            if writer is not None:
                writer.close()
    except _Unordered:
        anns.unlink(missing_ok=True)
        return False
    if writer is None:  # no annotations at all
        empty = pa.RecordBatch.from_pylist([], schema=ANNS_SCHEMA)
        _write_table(_sorted_anns(empty, np.zeros(0, np.int64), duplicate), anns)
    _write_images(raw_images, folder / "images.parquet", walk.counts)
    _write_table(RECORD_SCHEMA.empty_table(), folder / "orphans.parquet")
    raw_images.unlink()
    raw_anns.unlink()
    pa.default_memory_pool().release_unused()  # the walk's batches, before records are read
    return True


def _write_table(table: pa.Table, path: Path) -> None:
    with pq.ParquetWriter(path, table.schema) as writer:
        writer.write_table(table)


def _write_images(raw_images: Path, path: Path, counts: np.ndarray) -> None:
    """images.parquet as IMAGES_SQL writes it, from the raw images and each one's count."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    with pq.ParquetWriter(path, RECORD_SCHEMA) as writer:
        done = 0
        for batch in _raw(raw_images).iter_batches(batch_size=WALK_ROWS):
            n = batch.num_rows
            arrays = [*(batch.column(f.name) for f in IMAGES_SCHEMA),
                      pa.array(np.zeros(n, dtype=bool)), pa.array(starts[done:done + n]),
                      pa.array(counts[done:done + n])]
            writer.write_table(pa.Table.from_arrays(arrays, schema=RECORD_SCHEMA),
                               row_group_size=ROW_GROUP)
            done += n


# The columns of a record row: an image, or an orphan group (annotations of an unknown image id:
# ord null, no file); ann_start/ann_count: its rows in annotations.parquet.
RECORD_SCHEMA = pa.schema(
    [("ord", pa.int64()), ("key", pa.string()), ("file_name", pa.string()),
     ("width", pa.int64()), ("height", pa.int64()), ("duplicate", pa.bool_()),
     ("ann_start", pa.int64()), ("ann_count", pa.int64())]
)


class _RowRanges:
    """Row ranges of one Parquet file, read by row group (a unit touches one or two)."""

    def __init__(self, path: Path):
        self.file = pq.ParquetFile(path)
        meta = self.file.metadata
        sizes = (meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        self.starts = list(accumulate(sizes, initial=0))

    def read(self, lo: int, hi: int) -> pa.Table:
        if hi <= lo:
            return self.file.schema_arrow.empty_table()
        first = bisect_right(self.starts, lo) - 1
        last = bisect_right(self.starts, hi - 1) - 1
        table = self.file.read_row_groups(list(range(first, last + 1)))
        return table.slice(lo - self.starts[first], hi - lo)


@lru_cache(maxsize=8)
def _ranges(path: Path, size: int, mtime_ns: int) -> _RowRanges:
    """One open file per worker process (its footer is parsed once, not once per unit)."""
    return _RowRanges(path)


def _open(path: Path) -> _RowRanges:
    stat = path.stat()
    return _ranges(path, stat.st_size, stat.st_mtime_ns)


def read_records(index: CocoIndex, first: int, last: int) -> tuple[pa.Table, pa.Table]:
    """Records [first, last) of the index (images in file order, then orphan groups): their rows
    (RECORD_SCHEMA) and their annotation rows, in the same order (record i's are the next
    `ann_count[i]`)."""
    n = index.n_images
    last = min(last, index.n_records)
    parts = []
    if first < n:
        parts.append(_open(index.images).read(first, min(last, n)).cast(RECORD_SCHEMA))
    if last > n:
        parts.append(_open(index.orphans).read(max(first - n, 0), last - n).cast(RECORD_SCHEMA))
    records = pa.concat_tables(parts) if parts else RECORD_SCHEMA.empty_table()
    if not records.num_rows:
        return records, _open(index.annotations).read(0, 0)
    starts, counts = records.column("ann_start"), records.column("ann_count")
    lo, hi = starts[0].as_py(), starts[-1].as_py() + counts[-1].as_py()
    return records, _open(index.annotations).read(lo, hi)


def iter_records(index: CocoIndex, step: int = READ_IMAGES) -> Iterator[tuple[pa.Table, pa.Table]]:
    """`read_records` over the whole index, `step` records at a time."""
    for first in range(0, index.n_records, step):
        yield read_records(index, first, first + step)
