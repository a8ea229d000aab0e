"""Shard files and the manifest: atomic writes, checksums, the resume marker.

Layout of an output folder:
    manifest.json                 schema version, source, resolved config, code version,
                                  per-unit rows and checksums, totals; rewritten atomically
                                  every few seconds and at the end of a run
    _units.jsonl                  one line per finished unit (its manifest entry), appended and
                                  fsynced right after the unit's files: the resume marker
    images/part-NNNNN.parquet     one row per image of unit N
    objects/part-NNNNN.parquet    one row per object of unit N, sorted by image_id
    _plan/plan.parquet            the work units (see pipelines/plan.py)
    _plan/coco-index-*/           the sorted annotation index a COCO-like source's units point into
    _images/                      images a source had embedded (hf), written out for every reader
    README.md, stats.json         the dataset card and run statistics, written at the end

A unit counts as done only when its entry is in the manifest (or the unit log, which is merged into
it on load) and both files still match their
checksums; anything else is (re)written. So a run killed at any point resumes with no duplicates
and no holes: a half-written file only ever exists under a temporary name.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import SCHEMA_VERSION, validate
from schemas.runs import MANIFEST, TABLE_NAMES, UNIT_LOG, RunError, read_manifest, read_unit_log

__all__ = ["MANIFEST", "TABLE_NAMES", "UNIT_LOG", "Manifest", "read_unit_log", "write_unit"]
SAVE_EVERY_S = 2.0
# Objects rows are small (no pixels), so large row groups are fine for scans; see reference notes.
ROW_GROUP_ROWS = 64 * 1024


def part_name(unit: int) -> str:
    return f"part-{unit:05d}.parquet"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def _tmp_name(path: Path) -> Path:
    # The one temporary naming of the engine (pipelines/outdir.py removes exactly these).
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def _cleaned_on_failure(tmp: Path, final: Path):
    """Remove `tmp` when writing fails; a full disk becomes one line naming the file."""
    try:
        yield
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and (
            exc.errno == errno.ENOSPC or "No space left" in str(exc)
        ):
            raise DiskFullError(
                f"{final}: no space left on device; free some space and rerun the same command "
                "(the run resumes where it stopped)"
            ) from None
        raise


class DiskFullError(ValueError):
    """Writing a run's file failed for lack of space (a user-fixable condition)."""


def write_table_atomic(table: pa.Table, path: Path) -> str:
    """Write `table` to `path` via a temporary name + rename; return the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    with _cleaned_on_failure(tmp, path):
        pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        digest = sha256_file(tmp)
        _fsync_replace(tmp, path)
    return digest


def write_json_atomic(data: dict, path: Path) -> None:
    tmp = _tmp_name(path)
    with _cleaned_on_failure(tmp, path):
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        _fsync_replace(tmp, path)


def count_unit(data: dict, units: dict, key: str, entry: dict) -> None:
    """Record unit `key`'s entry in `units` and its counts in data["totals"] (a redone unit
    replaces its old counts): shared by the local and the object-store manifests."""
    old = units.get(key)
    units[key] = entry
    totals = data.setdefault("totals", {})
    for k, v in entry["counts"].items():
        totals[k] = totals.get(k, 0) + v - (old["counts"][k] if old else 0)


@dataclass
class Manifest:
    """The manifest of one output folder (see the module docstring)."""

    out: Path
    data: dict = field(default_factory=dict)

    last_save: float = 0.0

    @classmethod
    def load(cls, out: Path) -> Manifest | None:
        path = out / MANIFEST
        if not path.exists():
            return None
        try:
            manifest = cls(out, read_manifest(out))  # the readers' parse: unit log merged in
        except RunError as exc:
            raise ValueError(f"{exc}; delete it to start over") from exc
        manifest.data["totals"] = manifest.totals()
        return manifest

    @classmethod
    def create(cls, out: Path, header: dict) -> Manifest:
        data = {"schema_version": SCHEMA_VERSION, **header, "units": {}, "totals": {}}
        data["created"] = datetime.now(UTC).isoformat(timespec="seconds")
        return cls(out, data)

    @property
    def units(self) -> dict[str, dict]:
        return self.data["units"]

    def done_units(self, check_inputs: bool = False) -> set[int]:
        """Units whose entry exists and whose files still match their recorded checksums; with
        `check_inputs`, also whose input images are unchanged (same stat digest as when the unit
        was written), so an image edited between a kill and its resume is redone."""
        done = set()
        root = Path(self.data.get("source", {}).get("root") or ".")
        root = root if root.is_absolute() else self.out / root
        for key, entry in self.units.items():
            files = [self.out / entry[f"{t}_file"] for t in TABLE_NAMES]
            sums = [entry[f"{t}_sha256"] for t in TABLE_NAMES]
            intact = (f.exists() and sha256_file(f) == s for f, s in zip(files, sums, strict=True))
            if not all(intact):
                continue
            recorded = entry.get("inputs_digest")
            if check_inputs and recorded is not None:
                paths = pq.read_table(files[0], columns=["file_path"]).column(0).to_pylist()
                if images_digest(root, paths) != recorded:
                    continue
            done.add(int(key))
        return done

    def record_unit(self, unit: int, entry: dict) -> None:
        """Mark `unit` done: one durable line appended to the unit log (constant cost per unit),
        and manifest.json rewritten at most every SAVE_EVERY_S seconds (rewriting it after every
        unit made a 100k-image run quadratic)."""
        key = f"{unit:05d}"
        with open(self.out / UNIT_LOG, "a") as f:
            f.write(json.dumps({"unit": key, "entry": entry}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        count_unit(self.data, self.units, key, entry)
        if time.monotonic() - self.last_save >= SAVE_EVERY_S:
            self.save()

    def totals(self) -> dict:
        keys = ("images", "objects", "kept", "filtered", "rejected", "images_ok", "images_bad")
        return {k: sum(e["counts"][k] for e in self.units.values()) for k in keys}

    def save(self) -> None:
        self.data["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.data, self.out / MANIFEST)
        self.last_save = time.monotonic()


def images_digest(root: Path, paths: list[str]) -> str:
    """SHA-256 over (path, size, mtime) of a unit's images under `root`: cheap (a stat per image)
    and it changes when an image is replaced, edited, removed or appears."""
    from pipelines.images import resolve_inside

    h = hashlib.sha256()
    for rel in paths:
        path = resolve_inside(root, rel) if rel else None
        try:
            st = os.stat(path) if path is not None else None
            stamp = f"{st.st_size}:{st.st_mtime_ns}" if st else "unsafe"
        except (OSError, ValueError):
            stamp = "absent"
        h.update(f"{rel}\0{stamp}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def write_unit(
    out: Path, unit: int, images: pa.Table, objects: pa.Table, root: Path | None = None
) -> dict:
    """Validate and write both tables of `unit`; return its manifest entry (written by the caller
    after this returns, which is what makes the entry the completion marker). With the image
    `root`, the entry also records `images_digest` of the unit's images (see done_units)."""
    validate(images, "images")
    validate(objects, "objects")
    entry: dict = {}
    for name, table in (("images", images), ("objects", objects)):
        rel = f"{name}/{part_name(unit)}"
        entry[f"{name}_file"] = rel
        entry[f"{name}_sha256"] = write_table_atomic(table, out / rel)
    entry["counts"] = unit_counts(images, objects)
    if root is not None:
        entry["inputs_digest"] = images_digest(root, images.column("file_path").to_pylist())
    return entry


def unit_counts(images: pa.Table, objects: pa.Table) -> dict:
    status = objects.column("status").to_pylist()
    image_status = images.column("status").to_pylist()
    ok = sum(s == "ok" for s in image_status)
    return {
        "images": images.num_rows,
        "objects": objects.num_rows,
        "kept": status.count("kept"),
        "filtered": status.count("filtered"),
        "rejected": status.count("rejected"),
        "images_ok": ok,
        "images_bad": images.num_rows - ok,
    }
