"""Writing a run to object storage (`s3://bucket/prefix`) or a `file://` URI, through pyarrow.fs.

Object stores have no rename and no append, so the local commit (write a temporary file, rename
it, append a line to the fsynced unit log) cannot be used. What holds instead:
- A PUT is atomic: an object is either absent or complete, never half-written.
- Part objects are named per attempt (`images/part-00012-<attempt>.parquet`), so a killed
  attempt never leaves a half-finished object under a name a later attempt writes.
- A unit is committed by one small object `_units/unit-00012.json` (its manifest entry: part
  names, rows, sizes, checksums), written after both parts. Readers read only the parts that a
  commit lists (schemas/runs.py); a resume reads the commits, not a log.
- Orphans (parts of the run's own naming that no commit lists: a killed attempt's) are deleted
  under the lock when a run starts; any other object under the prefix stays.
- manifest.json is rewritten every few seconds and last, after the final commit.
- One writer at a time: `StoreLock` (see there).

On `file://` the same protocol runs on a local folder (writes are temporary file + rename there);
it is how the protocol is tested without a network, and it suits a shared mount too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from schemas.location import Location, check_reachable, explain
from schemas.runs import COMMIT, MANIFEST, TABLE_NAMES, UNITS_DIR, commit_name, read_commits

log = logging.getLogger(__name__)

MARKER, LOCK = ".mqengine-run", ".engine.lock"  # the same names as in a local run folder
PART = re.compile(r"^part-\d{5,}-[0-9a-f]{8}\.parquet$")  # the only part names removed as orphans
TMP = re.compile(r"^\..+\.tmp-\d+$")  # temporary files of file:// writes
ROW_GROUP_ROWS = 64 * 1024  # as pipelines/shards.py
LOCK_BEAT_S = 15.0  # how often the holder rewrites the lock object
LOCK_STALE_S = 120.0  # a lock not rewritten for this long belongs to a dead writer


class RunStore:
    """The five operations a run needs from storage, over one opened URI (schemas/location.py)."""

    def __init__(self, loc: Location):
        self.loc, self.fs, self.uri = loc, loc.fs, loc.uri
        self.attempt = secrets.token_hex(4)  # names this process's parts (module docstring)
        self._s3_client: Any = None

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.loc.path(rel)).type == pafs.FileType.File

    def read(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.loc.path(rel)) as f:
            return f.read()

    def list(self, folder: str = "") -> list[str]:
        """Names of the files directly in `folder` (relative to the run)."""
        selector = pafs.FileSelector(self.loc.path(folder), allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(selector)
                      if i.type == pafs.FileType.File)

    def is_empty(self) -> bool:
        selector = pafs.FileSelector(self.loc.base, allow_not_found=True)
        return not self.fs.get_file_info(selector)

    def delete(self, rel: str) -> None:
        """Remove `rel` if it is there. On S3 through boto3: pyarrow's delete_file leaves an
        empty "folder" object behind when the last file of a prefix goes, an object the run
        would then own without having recorded it."""
        if self.loc.local_path is None:
            bucket, _, key = self.loc.path(rel).partition("/")
            try:
                self._s3().delete_object(Bucket=bucket, Key=key)
            except Exception as exc:  # botocore's errors are no OSError: make them one
                raise OSError(f"deleting {rel} failed: {exc}") from exc
            return
        try:
            self.fs.delete_file(self.loc.path(rel))
        except FileNotFoundError:
            pass

    def write_atomic(self, rel: str, data: bytes) -> None:
        """`data` at `rel`, seen whole or not at all: one PUT on object storage; a temporary
        file, fsync and rename on a local filesystem (where a plain write could be torn)."""
        local = self.loc.local_path
        if local is None:
            with self.fs.open_output_stream(self.loc.path(rel)) as f:
                f.write(data)
            return
        path = local / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create `rel` only if it does not exist; False when it does. A local O_EXCL create, or
        S3's conditional PUT (If-None-Match: *), which pyarrow.fs cannot send: boto3 does."""
        local = self.loc.local_path
        if local is not None:
            try:
                fd = os.open(local / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
            return True
        bucket, _, key = self.loc.path(rel).partition("/")
        try:
            self._s3().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except Exception as exc:  # botocore's ClientError, without importing botocore here
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise OSError(f"conditional create of {rel} failed: {exc}") from exc
        return True

    def check_writable(self) -> None:
        """Raise one line before any write when this store cannot be written at all (for S3: no
        boto3 or no credentials; see s3_client)."""
        if self.loc.local_path is None:
            try:
                self._s3()
            except ValueError as exc:
                raise ValueError(f"--out {self.uri}: {exc}") from None

    def _s3(self):
        if self._s3_client is None:
            self._s3_client = s3_client()
        return self._s3_client


def s3_client():
    """A boto3 S3 client with the same bounded timeouts as the pyarrow filesystem; boto3 reads
    the same AWS variables (AWS_ENDPOINT_URL included). No credentials is one line here, before
    any write: pyarrow would send unsigned requests and fail later with a vaguer error."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ValueError(
            "writing a run to s3:// needs boto3 for its lock (a conditional create, which "
            "pyarrow cannot send): pip install 'mqengine[s3]'"
        ) from None
    from schemas.location import CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S, S3_ATTEMPTS

    config = Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=REQUEST_TIMEOUT_S,
                    retries={"max_attempts": S3_ATTEMPTS, "mode": "standard"})
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    session = boto3.session.Session()
    if session.get_credentials() is None:
        raise ValueError("no AWS credentials found: set AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) to write to s3://")
    return session.client("s3", endpoint_url=endpoint or None, config=config)


def part_name(unit: int, attempt: str) -> str:
    return f"part-{unit:05d}-{attempt}.parquet"


def write_part(store: RunStore, rel: str, table: pa.Table) -> tuple[str, int]:
    """Write `table` as Parquet at `rel`; return its sha256 and size. Serialised in memory first
    (a unit's table is small), so the object is one PUT and its checksum is known before."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    data = sink.getvalue().to_pybytes()
    store.write_atomic(rel, data)
    return hashlib.sha256(data).hexdigest(), len(data)


def commit_unit(store: RunStore, unit: int, entry: dict) -> None:
    """The unit's completion marker: one object, written after both of its parts."""
    record = {"unit": f"{unit:05d}", "entry": entry}
    store.write_atomic(commit_name(unit), (json.dumps(record) + "\n").encode())


def claim_store(store: RunStore) -> bool:
    """Make the URI a run's: adopt an empty prefix, reuse a run's, refuse anything else. Returns
    True when the prefix was empty."""
    store.check_writable()
    try:
        check_reachable(store.loc)
        created = store.is_empty()
        if not created and not (store.exists(MARKER) or store.exists(MANIFEST)):
            shown = ", ".join(store.list()[:3]) or "folders only"
            raise ValueError(f"--out {store.uri} is not empty and holds no engine run ({shown}); "
                             "choose a new or empty prefix")
        if not store.exists(MARKER):
            store.write_atomic(MARKER, (json.dumps({"created": time.time()}) + "\n").encode())
    except OSError as exc:
        raise ValueError(explain(exc, f"--out {store.uri}")) from None
    return created


def release_store_claim(store: RunStore) -> None:
    """Undo `claim_store` after a run that committed nothing (the lock is released apart)."""
    if not store.exists(MANIFEST) and not store.list(UNITS_DIR):
        store.delete(MARKER)


def remove_orphans(store: RunStore, units: dict[str, dict]) -> list[str]:
    """Delete the part objects of the run's own naming that neither `units` nor a commit object
    lists (a killed attempt's), and file:// temporary files. Only under the lock."""
    units = {**units, **read_commits(store.loc)}
    listed = {e.get(f"{t}_file") for e in units.values() for t in TABLE_NAMES}
    removed = []
    for folder in ("", UNITS_DIR, *TABLE_NAMES):
        for name in store.list(folder):
            rel = f"{folder}/{name}" if folder else name
            own_part = folder in TABLE_NAMES and PART.match(name) and rel not in listed
            if own_part or (store.loc.local_path is not None and TMP.match(name)):
                store.delete(rel)
                removed.append(rel)
    return removed


def clear_store(store: RunStore, units: dict[str, dict]) -> int:
    """`--overwrite`: delete the listed and orphan parts, the commit objects and the manifest;
    any object not of the run's own naming stays. Returns the number of objects removed."""
    units = {**units, **read_commits(store.loc)}
    removed = 0
    for entry in units.values():
        for table in TABLE_NAMES:
            rel = entry.get(f"{table}_file")
            if own_part(rel, table) and store.exists(rel):
                store.delete(rel)
                removed += 1
    for name in store.list(UNITS_DIR):
        if COMMIT.match(name):
            store.delete(f"{UNITS_DIR}/{name}")
            removed += 1
    if store.exists(MANIFEST):
        store.delete(MANIFEST)
        removed += 1
    return removed + len(remove_orphans(store, {}))


def own_part(rel: object, table: str) -> bool:
    """Whether `rel` is a part name of the run's own naming in `table`'s folder (a manifest is
    data: a path in it that points elsewhere is never deleted)."""
    if not isinstance(rel, str):
        return False
    folder, _, name = rel.partition("/")
    return folder == table and PART.match(name) is not None


class StoreLock:
    """One writer per URI without flock: a lock object made by a conditional create (O_EXCL on
    file://, If-None-Match on S3), rewritten every LOCK_BEAT_S by a thread of the holder.

    A killed writer cannot remove its lock, so a lock is stale, and taken over, when its holder
    is a dead process on this host or it was not rewritten for LOCK_STALE_S. Limits, by design:
    the takeover (delete + conditional create) has a window in which two writers that both saw
    the same stale lock could race, and staleness across hosts trusts their clocks; the holder
    re-reads the lock before each manifest write (`check`) and stops when it lost it."""

    def __init__(self, store: RunStore):
        self.store = store
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _body(self) -> bytes:
        return (json.dumps({"token": self.token, "pid": os.getpid(), "host": socket.gethostname(),
                            "beat": time.time()}) + "\n").encode()

    def acquire(self) -> StoreLock:
        if not self.store.create_exclusive(LOCK, self._body()):
            holder = self._holder()
            if holder is not None and not stale(holder):
                raise ValueError(f"--out {self.store.uri} is in use by another engine run "
                                 f"({describe(holder)}); wait for it to finish or choose another "
                                 "--out")
            log.warning("--out %s: taking over the stale lock of %s", self.store.uri,
                        describe(holder))
            self.store.delete(LOCK)
            if not self.store.create_exclusive(LOCK, self._body()):
                raise ValueError(f"--out {self.store.uri}: another engine run took its lock at "
                                 "the same time; wait for it to finish or choose another --out")
        self._thread = threading.Thread(target=self._beat, name="mqengine-lock", daemon=True)
        self._thread.start()
        return self

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.store.read(LOCK))
            return holder if isinstance(holder, dict) else None
        except (OSError, ValueError):
            return None  # unreadable or gone: a torn or removed lock, no live holder

    def _beat(self) -> None:
        while not self._stop.wait(LOCK_BEAT_S):
            try:
                self.check()
                self.store.write_atomic(LOCK, self._body())
            except BaseException as exc:  # reported by the next check() in the main thread
                self._error = exc
                return

    def check(self) -> None:
        """Raise when this writer no longer holds the lock (taken over as stale, or removed)."""
        if self._error is not None:
            raise ValueError(f"--out {self.store.uri}: lost the run's lock ({self._error})")
        holder = self._holder()
        if holder is None or holder.get("token") != self.token:
            raise ValueError(f"--out {self.store.uri}: another writer took the run's lock "
                             f"({describe(holder)}); stopping so that only one writes")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            holder = self._holder()
            if holder is not None and holder.get("token") == self.token:
                self.store.delete(LOCK)


def stale(holder: dict) -> bool:
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        if not alive(holder["pid"]):
            return True
    beat = holder.get("beat")
    return not isinstance(beat, int | float) or time.time() - beat > LOCK_STALE_S


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(holder: dict | None) -> str:
    if not holder:
        return "holder unknown"
    beat = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("beat") or 0))
    return f"pid {holder.get('pid')} on host {holder.get('host')}, last seen {beat}"
