"""Planning: a source's records -> deterministic work units of N images, stored on disk.

The plan is one Parquet file with one row group per unit (row = one image record as JSON), so unit k
is read with `read_row_group(k)` and nothing else, and a worker anywhere in a cluster only needs the
unit number. Writing it streams the source once with bounded memory. The file is written under a
temporary name and renamed, so a plan on disk is always complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.records import ImageRecord

PLAN_SCHEMA = pa.schema([("unit", pa.int32()), ("index", pa.int64()), ("record", pa.string())])
FINGERPRINT_KEY = b"mqengine.plan_fingerprint"


@dataclass
class Plan:
    path: Path
    num_units: int
    num_images: int
    num_objects: int


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


def open_plan(path: Path, fingerprint: str) -> Plan | None:
    """The plan at `path` if it exists and was made for `fingerprint`, else None."""
    if not path.exists():
        return None
    pf = pq.ParquetFile(path)
    if (pf.schema_arrow.metadata or {}).get(FINGERPRINT_KEY, b"").decode() != fingerprint:
        return None
    n_objects = 0  # counted from the records only when needed (summary), cheap relative to a run
    return Plan(path, pf.num_row_groups, pf.metadata.num_rows, n_objects)


def read_unit(path: Path, unit: int) -> list[ImageRecord]:
    table = pq.ParquetFile(path).read_row_group(unit, columns=["record"])
    return [ImageRecord.from_dict(json.loads(s)) for s in table.column("record").to_pylist()]
