"""Progress of `engine synthesize` that a person can read, on a terminal and in a log file.

On a terminal: a rich bar over images (not units) with rates and an ETA. Anywhere else (nohup,
SLURM, Kubernetes logs), where a rich bar only prints at the end, a plain line every
`interval` seconds (MQENGINE_PROGRESS_INTERVAL, default 10):

    synthesize: 320/1000 images (32%), 4.1 images/s, 11.3 objects/s, ETA 2m46s

Both are driven by the two callbacks of pipelines.synthesize.run: `on_start(units_total,
units_done, images_total, images_done)` and `on_unit(entry)`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

INTERVAL_ENV = "MQENGINE_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0


def interval_from_env() -> float:
    value = os.environ.get(INTERVAL_ENV, "")
    try:
        seconds = float(value) if value else DEFAULT_INTERVAL
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV}={value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"{INTERVAL_ENV}={value!r} must be > 0 seconds")
    return seconds


def duration(seconds: float) -> str:
    """3725 -> '1h02m', 166 -> '2m46s', 15 -> '15s'."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Counts:
    """Images and objects done, and the rates of this session (units a rerun skipped count as
    done but not toward the rates)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.start = clock()
        self.images_total = 0
        self.images_done = 0
        self.images_new = 0
        self.objects_new = 0
        self.lock = threading.Lock()

    def started(self, images_total: int, images_done: int) -> None:
        with self.lock:
            self.start = self.clock()
            self.images_total, self.images_done = images_total, images_done

    def add(self, entry: dict) -> None:
        with self.lock:
            self.images_done += entry["counts"]["images"]
            self.images_new += entry["counts"]["images"]
            self.objects_new += entry["counts"]["objects"]

    def line(self) -> str:
        with self.lock:
            dt = max(self.clock() - self.start, 1e-9)
            images_rate, objects_rate = self.images_new / dt, self.objects_new / dt
            total, done = self.images_total, self.images_done
        pct = 100 * done / total if total else 100.0
        left = total - done
        eta = duration(left / images_rate) if images_rate > 0 else "unknown" if left else "0s"
        return (f"synthesize: {done}/{total} images ({pct:.0f}%), {images_rate:.1f} images/s, "
                f"{objects_rate:.1f} objects/s, ETA {eta}")


class LineProgress:
    """A plain line every `interval` seconds from a background thread, so a unit that takes
    minutes still shows the run is alive; one line when it starts and one when it ends."""

    def __init__(self, stream: TextIO, interval: float,
                 clock: Callable[[], float] = time.monotonic):
        self.stream, self.interval = stream, interval
        self.counts = Counts(clock)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="progress", daemon=True)

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _loop(self) -> None:
        while not self.stop.wait(self.interval):
            self._print(self.counts.line())

    def on_start(self, units_total: int, units_done: int, images_total: int,
                 images_done: int) -> None:
        self.counts.started(images_total, images_done)
        self._print(f"synthesize: {images_total} images in {units_total} units, "
                    f"{units_done} units already done; a line every {self.interval:g} s")
        self.thread.start()

    def on_unit(self, entry: dict) -> None:
        self.counts.add(entry)

    def close(self) -> None:
        if self.thread.is_alive():
            self.stop.set()
            self.thread.join()
            self._print(self.counts.line())


class BarProgress:
    """The rich bar, over images, with rates and the time left."""

    def __init__(self, console: Console):
        self.counts = Counts()
        self.progress = Progress(
            TextColumn("[bold]synthesize"), BarColumn(), MofNCompleteColumn(),
            TextColumn("images"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("{task.fields[rate]}"), console=console, transient=False,
        )
        self.task = self.progress.add_task("images", total=None, rate="planning...")
        self.progress.start()

    def on_start(self, units_total: int, units_done: int, images_total: int,
                 images_done: int) -> None:
        self.counts.started(images_total, images_done)
        self.progress.update(self.task, total=images_total, completed=images_done,
                             rate="starting workers...")

    def on_unit(self, entry: dict) -> None:
        self.counts.add(entry)
        c = self.counts
        dt = max(c.clock() - c.start, 1e-9)
        rate = f"{c.images_new / dt:.1f} images/s, {c.objects_new / dt:.1f} objects/s"
        self.progress.update(self.task, advance=entry["counts"]["images"], rate=rate)

    def close(self) -> None:
        self.progress.stop()


def reporter(console: Console) -> LineProgress | BarProgress:
    """The bar on a terminal, plain lines elsewhere (read from the stream the console writes)."""
    if console.is_terminal:
        return BarProgress(console)
    return LineProgress(console.file, interval_from_env())
