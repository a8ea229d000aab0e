"""A masker for reliability tests: the first time it sees a marked image in a process tree it kills
its own worker process (as an out-of-memory kill would), then behaves like the box masker.

The marker file (path in MQENGINE_CRASH_MARKER) records that the crash happened, so the unit's retry
on the restarted worker succeeds."""

from __future__ import annotations

import os
from pathlib import Path

from pipelines.maskers.box import BoxMasker


class CrashOnce(BoxMasker):
    def __call__(self, image, boxes):
        marker = Path(os.environ["MQENGINE_CRASH_MARKER"])
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)
        return super().__call__(image, boxes)


def build(cfg) -> CrashOnce:
    return CrashOnce()
