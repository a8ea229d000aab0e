"""Planning: a source's records -> deterministic work units of N images, stored on disk.

Two kinds of plan, both one Parquet file written under a temporary name and renamed (a plan on disk
is always complete), fingerprinted in its metadata, and read by unit number only:
- `records` (hf, demo, the GT sources): one row group per unit, one row per image record as JSON;
  unit k is `read_row_group(k)`. Writing it streams the source once with bounded memory.
- `coco-index` (coco, objects365): the source's annotation index (`pipelines.sources.stream`,
  kept in the plan's folder) already holds every record in order, so the plan holds only, per
  unit, its range of records and of annotation rows; a worker reads exactly those rows of the
  index with pyarrow. The records are written once (the index), not again as JSON text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.records import ImageRecord
from pipelines.sources.stream import INDEX_MARKER, CocoIndex

PLAN_SCHEMA = pa.schema([("unit", pa.int32()), ("index", pa.int64()), ("record", pa.string())])
# Per unit: records [first, last) of the index, whose annotations are rows [ann_first, ann_last).
INDEX_PLAN_SCHEMA = pa.schema([("unit", pa.int32()), ("first", pa.int64()), ("last", pa.int64()),
                               ("ann_first", pa.int64()), ("ann_last", pa.int64())])
FINGERPRINT_KEY = b"mqengine.plan_fingerprint"
KIND_KEY = b"mqengine.plan_kind"
INDEX_KEY = b"mqengine.plan_index"  # the index folder, relative to the plan's folder
RECORDS, COCO_INDEX = "records", "coco-index"


@dataclass
class Plan:
    path: Path
    num_units: int
    num_images: int
    num_objects: int
    kind: str = RECORDS


def _batches(records: Iterable[ImageRecord], size: int) -> Iterator[list[ImageRecord]]:
    it = iter(records)
    while batch := list(islice(it, size)):
        yield batch


def write_plan(
    records: Iterable[ImageRecord],
    path: Path,
    unit_size: int,
    fingerprint: str,
    limit: int | None = None,
) -> Plan:
    """Stream `records` (at most `limit`) into units of `unit_size` images at `path`."""
    if unit_size < 1:
        raise ValueError(f"--unit-size must be >= 1, got {unit_size}")
    if limit is not None:
        records = islice(records, limit)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    schema = PLAN_SCHEMA.with_metadata({FINGERPRINT_KEY: fingerprint.encode()})
    n_units = n_images = n_objects = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for unit, batch in enumerate(_batches(records, unit_size)):
            rows = []
            for record in batch:
                record.index = n_images
                rows.append(json.dumps(record.to_dict(), allow_nan=True))
                n_images += 1
                n_objects += len(record.objects)
            table = pa.table(
                {"unit": [unit] * len(rows), "index": [r.index for r in batch], "record": rows},
                schema=schema,
            )
            writer.write_table(table)  # one row group per call: one per unit
            n_units += 1
    os.replace(tmp, path)
    return Plan(path, n_units, n_images, n_objects)


def write_index_plan(index: CocoIndex, path: Path, unit_size: int, fingerprint: str,
                     limit: int | None = None) -> Plan:
    """Units of `unit_size` records of `index` (at most `limit`), by range. The index folder must
    be inside the plan's folder (where a resumed run finds it)."""
    if unit_size < 1:
        raise ValueError(f"--unit-size must be >= 1, got {unit_size}")
    n = index.n_records if limit is None else min(limit, index.n_records)
    starts, ends = _annotation_spans(index)
    first = np.arange(0, n, unit_size, dtype=np.int64)
    last = np.minimum(first + unit_size, n)
    table = pa.table({"unit": np.arange(len(first), dtype=np.int32), "first": first, "last": last,
                      "ann_first": starts[first], "ann_last": ends[last - 1]},
                     schema=INDEX_PLAN_SCHEMA)
    meta = {FINGERPRINT_KEY: fingerprint.encode(), KIND_KEY: COCO_INDEX.encode(),
            INDEX_KEY: index.folder.relative_to(path.parent).as_posix().encode()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    table = table.replace_schema_metadata(meta)
    with pq.ParquetWriter(tmp, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)
    n_objects = int((table.column("ann_last").to_numpy() - table.column("ann_first").to_numpy())
                    .sum())
    return Plan(path, table.num_rows, n, n_objects, COCO_INDEX)


def _annotation_spans(index: CocoIndex) -> tuple[np.ndarray, np.ndarray]:
    """Per record of the index: the first annotation row and one past its last."""
    tables = [pq.read_table(p, columns=["ann_start", "ann_count"])
              for p in (index.images, index.orphans)]
    starts = np.concatenate([t.column("ann_start").to_numpy() for t in tables])
    counts = np.concatenate([t.column("ann_count").to_numpy() for t in tables])
    return starts.astype(np.int64), (starts + counts).astype(np.int64)


def _metadata(path: Path) -> dict:
    return pq.read_schema(path).metadata or {}


def open_plan(path: Path, fingerprint: str) -> Plan | None:
    """The plan at `path` if it exists and was made for `fingerprint` (and, for an index plan,
    its index is still complete), else None."""
    if not path.exists():
        return None
    meta = _metadata(path)
    if meta.get(FINGERPRINT_KEY, b"").decode() != fingerprint:
        return None
    if meta.get(KIND_KEY, RECORDS.encode()).decode() == COCO_INDEX:
        folder = path.parent / meta[INDEX_KEY].decode()
        if not (folder / INDEX_MARKER).is_file():
            return None
        table = pq.read_table(path)
        last, lo, hi = (table.column(c).to_numpy() for c in ("last", "ann_first", "ann_last"))
        return Plan(path, table.num_rows, int(last[-1]) if len(last) else 0, int((hi - lo).sum()),
                    COCO_INDEX)
    pf = pq.ParquetFile(path)
    n_objects = 0  # counted from the records only when needed (summary), cheap relative to a run
    return Plan(path, pf.num_row_groups, pf.metadata.num_rows, n_objects)


def open_plan_units(path: Path) -> int:
    """How many units the plan at `path` has, of either kind."""
    pf = pq.ParquetFile(path)
    if (pf.schema_arrow.metadata or {}).get(KIND_KEY, RECORDS.encode()).decode() == COCO_INDEX:
        return pf.metadata.num_rows
    return pf.num_row_groups


def read_unit(path: Path, unit: int, source: Any = None) -> list[ImageRecord]:
    """The records of unit `unit`. An index plan needs its source (`range_records` builds the
    records from the index rows: category names, the source's image checks)."""
    meta = _metadata(path)
    if meta.get(KIND_KEY, RECORDS.encode()).decode() == COCO_INDEX:
        if source is None or not hasattr(source, "range_records"):
            raise ValueError(f"{path}: a {COCO_INDEX} plan is read through its coco source")
        row = _index_rows(path, path.stat().st_mtime_ns)[unit]
        return source.range_records(path.parent / meta[INDEX_KEY].decode(), *row)
    table = pq.ParquetFile(path).read_row_group(unit, columns=["record"])
    return [ImageRecord.from_dict(json.loads(s)) for s in table.column("record").to_pylist()]


@lru_cache(maxsize=4)
def _index_rows(path: Path, mtime_ns: int) -> list[tuple[int, int]]:
    """(first, last) per unit; read once per worker (a few bytes per unit)."""
    table = pq.read_table(path, columns=["first", "last"])
    return list(zip(table.column("first").to_pylist(), table.column("last").to_pylist(),
                    strict=True))
