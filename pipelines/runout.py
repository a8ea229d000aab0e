"""Where a synthesis run writes: the one interface the driver uses for `--out`.

`LocalOut` is a local or shared POSIX folder and calls exactly what the engine always did there
(pipelines/outdir.py: fcntl lock, rename, the fsynced unit log). `StoreOut` is a URI, `file://` or
`s3://` (pipelines/store.py: a lock object, parts named per attempt, one commit object per unit).
The driver (pipelines/synthesize.py) asks one of them and has no `if` on the kind of storage.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines import outdir
from pipelines.shards import (
    SAVE_EVERY_S,
    UNIT_LOG,
    Manifest,
    count_unit,
    images_digest,
    unit_counts,
    write_unit,
)
from pipelines.store import (
    RunStore,
    StoreLock,
    alive,
    claim_store,
    clear_store,
    commit_unit,
    part_name,
    release_store_claim,
    remove_orphans,
    write_part,
)
from schemas import validate
from schemas.location import explain, is_uri, open_location
from schemas.runs import (
    MANIFEST,
    TABLE_NAMES,
    UNITS_DIR,
    RunError,
    commit_name,
    read_store_manifest,
)

log = logging.getLogger(__name__)


@contextmanager
def one_line(where: str):
    """A storage failure mid-run (endpoint gone, access revoked, bucket deleted) as one line; the
    units committed so far stay, so the same command resumes."""
    try:
        yield
    except OSError as exc:
        raise ValueError(f"{explain(exc, where)}; rerun the same command to resume") from None


@contextmanager
def best_effort(what: str):
    """Clean-up after a failure must not hide that failure: a storage error here is a warning
    (orphans left behind are removed when the next run starts)."""
    try:
        yield
    except OSError as exc:
        log.warning("%s failed (%s); the next run cleans up", what, exc)


def open_out(out: Path | str) -> LocalOut | StoreOut:
    return StoreOut(RunStore(open_location(out))) if is_uri(out) else LocalOut(Path(out))


class LocalOut:
    """A local or shared folder (pipelines/outdir.py and pipelines/shards.py, unchanged)."""

    def __init__(self, path: Path):
        self.path = self.name = path
        self.plan_dir = path / outdir.PLAN_DIR
        self.image_dir: Path | None = path / outdir.IMAGES_DIR
        self.local_dir: Path | None = path  # where relative image roots are resolved
        self.plan_is_scratch = False
        self._lock: outdir.OutputLock | None = None

    def check_no_overlap(self, inputs: dict) -> None:
        outdir.check_no_overlap(self.path, inputs)

    def claim(self) -> bool:
        if (self.path / UNITS_DIR).is_dir() and not (self.path / UNIT_LOG).exists():
            raise ValueError(f"--out {self.path} holds a run written through a URI; resume it "
                             f"as --out file://{self.path.resolve()}")
        return outdir.claim(self.path)

    def lock(self) -> None:
        self._lock = outdir.OutputLock(self.path).acquire()

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def release_claim(self, created: bool) -> None:
        outdir.release_claim(self.path, created)

    def load_manifest(self) -> Manifest | None:
        return Manifest.load(self.path)

    def create_manifest(self, header: dict) -> Manifest:
        (self.path / UNIT_LOG).unlink(missing_ok=True)  # a new plan: earlier markers mean nothing
        return Manifest.create(self.path, header)

    def clear(self, units: dict) -> int:
        return outdir.clear_run(self.path, units)

    def remove_temp(self, units: dict) -> None:
        outdir.remove_temp_files(self.path)

    def drop_unit(self, key: str) -> None:
        """A unit to redo: its manifest entry goes (the unit log keeps its line until redone)."""

    def write_unit(self, unit: int, images: pa.Table, objects: pa.Table, root: Path) -> dict:
        return write_unit(self.path, unit, images, objects, root=root)

    def write_docs(self, wall_s: float) -> None:
        """The dataset card (README.md with `datasets` configs) and stats.json (pipelines/card)."""
        from pipelines.card import write_dataset_card, write_stats
        from schemas.runs import read_manifest

        manifest = read_manifest(self.path)
        write_dataset_card(self.path, manifest)
        write_stats(self.path, manifest, wall_s)

    def close(self) -> None:
        pass


class StoreOut:
    """A run behind a URI (pipelines/store.py). The plan is the driver's own scratch (a local
    temporary folder, removed after the run): it is rebuilt on resume from the same inputs, which
    the fingerprint guarantees give the same units; workers get their records with each task."""

    def __init__(self, store: RunStore):
        self.store = store
        self.name = store.uri
        self.local_dir = store.loc.local_path
        self.plan_is_scratch = True  # rebuilt on resume (see the class docstring)
        self.image_dir = None  # a source that embeds images is refused (readers need a path)
        remove_dead_scratch()
        self._scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH}{os.getpid()}-"))
        self.plan_dir = self._scratch / "_plan"
        self._lock: StoreLock | None = None

    def check_no_overlap(self, inputs: dict) -> None:
        if self.local_dir is not None:
            outdir.check_no_overlap(self.local_dir, inputs)

    def claim(self) -> bool:
        if self.local_dir is not None and (self.local_dir / UNIT_LOG).exists():
            raise ValueError(f"--out {self.name} holds a run written to a local path; resume it "
                             f"as --out {self.local_dir}")
        return claim_store(self.store)

    def lock(self) -> None:
        self._lock = StoreLock(self.store).acquire()

    def unlock(self) -> None:
        if self._lock is not None:
            with best_effort(f"{self.name}: releasing the lock"):
                self._lock.release()

    def release_claim(self, created: bool) -> None:
        with best_effort(f"{self.name}: removing the run marker"):
            release_store_claim(self.store)

    def load_manifest(self) -> StoreManifest | None:
        with one_line(self.name):
            if not self.store.exists(MANIFEST):
                return None
        try:
            data = read_store_manifest(self.store.loc)
        except RunError as exc:
            raise ValueError(f"{exc}; delete it to start over") from exc
        manifest = StoreManifest(Path(self.store.uri), data, store=self.store, lock=self._lock)
        manifest.data["totals"] = manifest.totals()
        return manifest

    def create_manifest(self, header: dict) -> StoreManifest:
        """A new plan: commits of an earlier plan mean nothing, so they and their parts go."""
        with one_line(self.name):
            clear_store(self.store, {})
        data = Manifest.create(Path(self.store.uri), header).data
        return StoreManifest(Path(self.store.uri), data, store=self.store, lock=self._lock)

    def clear(self, units: dict) -> int:
        with one_line(self.name):
            return clear_store(self.store, units)

    def remove_temp(self, units: dict) -> None:
        removed: list[str] = []
        with best_effort(f"{self.name}: removing orphan parts"):
            removed = remove_orphans(self.store, units)
        if removed:
            log.warning("%s: removed %d parts of an unfinished attempt", self.name, len(removed))

    def drop_unit(self, key: str) -> None:
        self.store.delete(commit_name(key))  # readers stop reading its parts now

    def write_unit(self, unit: int, images: pa.Table, objects: pa.Table, root: Path) -> dict:
        validate(images, "images")
        validate(objects, "objects")
        entry: dict = {}
        for name, table in (("images", images), ("objects", objects)):
            rel = f"{name}/{part_name(unit, self.store.attempt)}"
            entry[f"{name}_file"] = rel
            with one_line(f"{self.name}: writing {rel}"):
                entry[f"{name}_sha256"], entry[f"{name}_size"] = write_part(self.store, rel, table)
        entry["counts"] = unit_counts(images, objects)
        entry["inputs_digest"] = images_digest(root, images.column("file_path").to_pylist())
        return entry

    def write_docs(self, wall_s: float) -> None:
        log.info("%s: no dataset card or stats.json on a URI (`engine stats` reads the run)",
                 self.name)

    def close(self) -> None:
        shutil.rmtree(self._scratch, ignore_errors=True)


SCRATCH = "mqengine-plan-"  # + pid + "-" + random: the driver's plan folder of a URI run


def remove_dead_scratch() -> None:
    """Remove the plan folders that drivers killed with SIGKILL left in the temporary folder:
    only folders of this naming whose pid is no longer alive."""
    for folder in Path(tempfile.gettempdir()).glob(f"{SCRATCH}*-*"):
        pid = folder.name[len(SCRATCH):].split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


@dataclass
class StoreManifest(Manifest):
    """The manifest of a run behind a URI: units are committed by commit objects, not a log."""

    store: RunStore | None = None
    lock: StoreLock | None = None

    def done_units(self, check_inputs: bool = False) -> set[int]:
        """Units whose parts are all there with their recorded sizes (an object is never seen
        half-written, so its size tells a part from an earlier attempt's), and, with
        `check_inputs`, whose images are unchanged (as Manifest.done_units)."""
        assert self.store is not None
        with one_line(self.store.uri):
            return self._done_units(check_inputs)

    def _done_units(self, check_inputs: bool) -> set[int]:
        assert self.store is not None
        sizes = {}
        for table in TABLE_NAMES:
            selector = pafs.FileSelector(self.store.loc.path(table), allow_not_found=True)
            sizes.update({f"{table}/{i.base_name}": i.size
                          for i in self.store.fs.get_file_info(selector)})
        root = Path(self.data.get("source", {}).get("root") or ".")
        done = set()
        for key, entry in self.units.items():
            if not all(sizes.get(entry.get(f"{t}_file")) == entry.get(f"{t}_size")
                       for t in TABLE_NAMES):
                continue
            if check_inputs and entry.get("inputs_digest") is not None:
                path = self.store.loc.path(entry["images_file"])
                table = pq.read_table(path, columns=["file_path"], filesystem=self.store.fs)
                if images_digest(root, table.column(0).to_pylist()) != entry["inputs_digest"]:
                    continue
            done.add(int(key))
        return done

    def record_unit(self, unit: int, entry: dict) -> None:
        """Commit `unit` (its one commit object), then count it; the manifest is rewritten at
        most every SAVE_EVERY_S (as Manifest.record_unit)."""
        assert self.store is not None
        with one_line(f"{self.store.uri}: committing unit {unit}"):
            commit_unit(self.store, unit, entry)
        self._count(unit, entry)

    def _count(self, unit: int, entry: dict) -> None:
        count_unit(self.data, self.units, f"{unit:05d}", entry)
        if time.monotonic() - self.last_save >= SAVE_EVERY_S:
            self.save()

    def save(self) -> None:
        assert self.store is not None
        if self.lock is not None:
            self.lock.check()  # a writer that lost its lock must not write the manifest
        self.data["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
        with one_line(f"{self.store.uri}: writing {MANIFEST}"):
            self.store.write_atomic(MANIFEST, (json.dumps(self.data, indent=2) + "\n").encode())
        self.last_save = time.monotonic()
