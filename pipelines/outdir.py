"""The output folder of a run: what the engine may write there, what it may delete, who holds it.

Three rules keep a user's files safe:
- `--out` never overlaps the data it reads (the image root or the annotation file): the engine
  would otherwise write its parts among the user's images and, with `--overwrite`, delete them.
- The engine writes into an empty (or new) folder, or into one that already holds an engine run;
  a folder with other files in it is refused. `MARKER` records that a folder is a run's.
- `--overwrite` removes only files the run's manifest and unit log list as its own (plus its own
  bookkeeping files and temporary files of its own naming), never a whole folder tree.

One writer at a time: `OutputLock` holds an exclusive `fcntl.flock` on `LOCK` for the whole run; a
second writer gets one line naming the holder's pid and host. The kernel drops the lock when the
holder dies, so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from schemas.runs import MANIFEST, TABLE_NAMES, UNIT_LOG, read_unit_log

log = logging.getLogger(__name__)

LOCK = ".engine.lock"
MARKER = ".mqengine-run"
PLAN_DIR = "_plan"
IMAGES_DIR = "_images"  # images a source had embedded (hf), written out for every reader
# Files and folders of a run besides its parts; temporary files start with "." and hold ".tmp-".
CARD, STATS = "README.md", "stats.json"  # written at the end of a run (pipelines/card.py)
OWN_FILES = (MANIFEST, UNIT_LOG, LOCK, MARKER, CARD, STATS)
OWN_DIRS = (*TABLE_NAMES, PLAN_DIR, IMAGES_DIR)


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_no_overlap(out: Path, inputs: dict[str, Path | None]) -> None:
    """Refuse an `out` equal to, inside, or containing any of `inputs` (name -> path)."""
    out_r = Path(out).resolve()
    for name, path in inputs.items():
        if path is None:
            continue
        p = Path(path).resolve()
        if _overlaps(out_r, p):
            raise ValueError(
                f"--out {out} overlaps the {name} {path}: the engine writes only into a folder "
                "of its own; choose an --out outside the dataset"
            )


def is_run_folder(out: Path) -> bool:
    return (out / MARKER).exists() or (out / MANIFEST).exists()


def foreign_entries(out: Path) -> list[str]:
    """Names in `out` that are not a run's own (empty list for a new or empty folder)."""
    if not out.exists():
        return []
    return sorted(p.name for p in out.iterdir() if p.name not in (LOCK, MARKER))


def claim(out: Path) -> bool:
    """Make `out` a run folder: create it, or adopt it when empty; refuse a non-empty folder with
    no engine run in it. Returns True when this call created the folder."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    created = not out.exists()
    if not created and not is_run_folder(out):
        others = foreign_entries(out)
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise ValueError(
                f"--out {out} is not empty and holds no engine run ({shown}); "
                "choose a new or empty folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).exists():
        (out / MARKER).write_text(json.dumps({"created": time.time()}) + "\n")
    return created


def release_claim(out: Path, created: bool) -> None:
    """Undo `claim` after a run that failed before recording anything: remove the marker, the
    lock file and the folder itself when this run created it and nothing else is in it."""
    if (out / MANIFEST).exists() or (out / UNIT_LOG).exists():
        return
    for name in (MARKER, LOCK):
        (out / name).unlink(missing_ok=True)
    # Scaffolding of a run that recorded nothing (a half-built index, images written while
    # planning): the engine's own folders, in a folder `claim` found empty or already a run's.
    for name in (PLAN_DIR, IMAGES_DIR):
        if (out / name).is_dir():
            shutil.rmtree(out / name, ignore_errors=True)
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def remove_temp_files(out: Path) -> list[Path]:
    """Delete the temporary files of this engine's own naming (`.NAME.tmp-PID`) in the run's
    folders; only ever called under the lock, so no other writer owns them."""
    removed = []
    for folder in (out, *(out / d for d in OWN_DIRS)):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp-*"):
                if tmp.is_file():
                    tmp.unlink(missing_ok=True)
                    removed.append(tmp)
    return removed


def clear_run(out: Path, units: dict[str, dict]) -> int:
    """`--overwrite`: delete the part files `units` (the manifest's and the unit log's entries)
    list, the run's bookkeeping files and its temporary files; folders only when left empty.
    Any other file stays. Returns the number of files removed."""
    units = {**units, **read_unit_log(out / UNIT_LOG)}
    removed = 0
    for entry in units.values():
        for table in TABLE_NAMES:
            rel = entry.get(f"{table}_file") if isinstance(entry, dict) else None
            path = (out / rel) if isinstance(rel, str) else None
            if path is not None and out.resolve() in path.resolve().parents and path.is_file():
                path.unlink()
                removed += 1
    plan = out / PLAN_DIR / "plan.parquet"
    for path in (plan, out / MANIFEST, out / UNIT_LOG):
        if path.is_file():
            path.unlink()
            removed += 1
    for path in (out / CARD, out / STATS):
        if path.is_file() and _written_by_engine(path):
            path.unlink()
            removed += 1
    removed += len(remove_temp_files(out))
    for name in OWN_DIRS:
        folder = out / name
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return removed


def _written_by_engine(path: Path) -> bool:
    """Whether the card or stats file at `path` is the one a run wrote (a README.md a person put
    in the folder stays)."""
    try:
        head = path.read_text(errors="replace")[:4096]
    except OSError:
        return False
    if path.name == CARD:
        return head.startswith("---\n") and "- mqengine" in head
    return '"totals"' in head


class OutputLock:
    """Exclusive lock on a run folder for the lifetime of one writer (see module docstring)."""

    def __init__(self, out: Path):
        self.path = out / LOCK
        self.fd: int | None = None

    def acquire(self) -> OutputLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise ValueError(
                f"--out {self.path.parent} is in use by another engine run ({self._holder()}); "
                "wait for it to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.write(fd, (json.dumps(holder) + "\n").encode())
        self.fd = fd
        return self

    def _holder(self) -> str:
        try:
            h = json.loads(self.path.read_text() or "{}")
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["since"]))
            return f"pid {h['pid']} on host {h['host']}, since {started}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
