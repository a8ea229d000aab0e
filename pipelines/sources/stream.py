"""COCO-format JSON -> a Parquet index grouped by image, read back by record range.

Why: Objects365 v2 train is one JSON document of ~1.7M images and tens of millions of boxes;
`json.load` of it needs tens of GB. Instead, `build_index` (once per file, cached by the caller):

1. reads the file once (`scan`: Python's C JSON scanner, one array element at a time), converts
   `images` and `annotations` in batches of BATCH_ROWS to Arrow (`rows`: whole columns at a time
   when a batch is uniform) and appends them to two raw Parquet files; `categories` is kept.
   When `images` come first and the annotations follow them image by image (Objects365 and COCO
   files do), the annotations go straight into the final `annotations.parquet` instead
   (`sortfree.AnnSink`): no raw annotations file and no sort;
2. otherwise has DuckDB, with a memory limit and a spill folder, write `images.parquet` (file
   order, duplicate ids flagged, and where each image's annotations are: `ann_start`, `ann_count`),
   `annotations.parquet` sorted by the position of their image in `images` (unknown image ids
   last, grouped by id; duplicate annotation ids flagged) and `orphans.parquet` (one row per
   unknown image id). DuckDB sorts, joins and aggregates larger-than-memory data by spilling.
   When the annotations are grouped by image in `images` order but came before `images`,
   `sortfree.write_in_order` writes the same three files from the raw ones, without the sort.

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
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.sources import sortfree
from pipelines.sources.rows import check_categories, image_table
from pipelines.sources.scan import SyntaxProblem, ijson_backend, paused_gc, scan
from pipelines.sources.sortfree import RECORD_SCHEMA, AnnSink, ImageSink

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 16
BATCH_ROWS = 8_192  # entries per conversion batch and raw Parquet write (~6 MB of dicts)
READ_IMAGES = 1_024  # records per read when iterating over the whole index
INDEX_MARKER = "index.json"  # written last into an index folder: the index is complete
# Write the annotations in their final form during the scan when they come in `images` order
# (`sortfree.AnnSink`); False only to force the other paths (tests, bench/ingest.py).
STREAM_IN_ORDER = True


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
    images = ImageSink(folder / "raw_images.parquet", image_table, json_path)
    anns = AnnSink(folder, json_path, images, in_order=STREAM_IN_ORDER)
    try:
        with paused_gc():
            kept, types = scan(json_path, {"images": images.add, "annotations": anns.add},
                               ("categories",), BATCH_ROWS, bulk={"annotations": anns.bulk})
    except (SyntaxProblem, UnicodeDecodeError) as e:
        _raise_syntax_error(json_path, e)
        raise AssertionError("unreachable") from None
    finally:
        images.close()
        anns.close()
    categories = _check_top_level(json_path, kept, types)
    pa.default_memory_pool().release_unused()  # the scan's batches: give their pages back
    if anns.finish() or sortfree.write_in_order(folder):
        n_orphans = 0
    else:
        n_orphans = _group(folder, memory_limit)
    index = CocoIndex(json_path, folder, categories, images.count, anns.count, n_orphans)
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
        sql = {**{k: v.as_posix() for k, v in paths.items()}, "row_group": sortfree.ROW_GROUP}
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
