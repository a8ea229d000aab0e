"""The unit worker: loads the models once, then turns unit numbers into finished tables.

`UnitWorker` is used as is by the local executor and as a Ray actor by the Ray executor; both call
the same pure `process_unit`. Tables travel back to the driver, so the driver alone writes files and
the manifest (one writer, no races).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.captioners import Captioner, CaptionerConfig, build_captioner
from pipelines.maskers import Masker, MaskerConfig, build_masker
from pipelines.plan import read_unit
from pipelines.process import UnitContext, process_unit
from schemas import table_from_rows


@dataclass
class WorkerSpec:
    """Everything a worker needs; plain data so Ray can ship it to any node."""

    plan_path: Path
    context: UnitContext
    masker: MaskerConfig
    captioner: CaptionerConfig
    threads: int = 1
    source: Any = None  # the coco source, for a plan of units by index range (pipelines.plan)


class UnitWorker:
    """Holds the models of one worker. `masker`/`captioner` may be passed in already built (the
    local executor reuses the driver's); otherwise they are built from the spec here, once."""

    def __init__(
        self, spec: WorkerSpec, masker: Masker | None = None, captioner: Captioner | None = None
    ):
        import cv2

        # Each worker is one process on a shared machine: more threads per worker only
        # oversubscribe.
        cv2.setNumThreads(spec.threads)
        self.spec = spec
        self.masker = masker if masker is not None else build_masker(spec.masker)
        self.captioner = captioner if captioner is not None else build_captioner(spec.captioner)

    def run(self, unit: int) -> tuple[pa.Table, pa.Table]:
        records = read_unit(self.spec.plan_path, unit, self.spec.source)
        images, objects = process_unit(self.spec.context, records, self.masker, self.captioner)
        return table_from_rows("images", images), table_from_rows("objects", objects)

    def run_unit(self, unit: int) -> tuple[int, pa.Table, pa.Table]:
        """The Ray entry point: the unit number travels back with its tables."""
        return (unit, *self.run(unit))
