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
from pipelines.records import ImageRecord
from schemas import table_from_rows


@dataclass
class WorkerSpec:
    """Everything a worker needs; plain data so Ray can ship it to any node."""

    plan_path: Path
    context: UnitContext
    masker: MaskerConfig
    captioner: CaptionerConfig
    source: Any = None  # the coco source, for a plan of units by index range (pipelines.plan)


class UnitWorker:
    """Holds the models of one worker. `masker`/`captioner` may be passed in already built (the
    local executor reuses the driver's); otherwise they are built from their configs here, once.
    The unit's context comes with each call, so a Ray actor can start (and load its models) before
    the driver has planned the run."""

    def __init__(
        self,
        masker_cfg: MaskerConfig,
        captioner_cfg: CaptionerConfig,
        threads: int = 1,
        masker: Masker | None = None,
        captioner: Captioner | None = None,
    ):
        import cv2

        # Each worker is one process on a shared machine: more threads per worker only
        # oversubscribe.
        cv2.setNumThreads(threads)
        self.masker = masker if masker is not None else build_masker(masker_cfg)
        self.captioner = captioner if captioner is not None else build_captioner(captioner_cfg)

    def run(
        self, spec: WorkerSpec, unit: int, records: list[ImageRecord] | None = None
    ) -> tuple[pa.Table, pa.Table]:
        """Unit `unit`'s tables; its records are read from the plan unless given."""
        if records is None:
            records = read_unit(spec.plan_path, unit, spec.source)
        images, objects = process_unit(spec.context, records, self.masker, self.captioner)
        return table_from_rows("images", images), table_from_rows("objects", objects)

    def run_unit(
        self, spec: WorkerSpec, unit: int, records: list[ImageRecord] | None = None
    ) -> tuple[int, pa.Table, pa.Table, dict]:
        """The Ray entry point: the driver sends the unit's records with the task, so a worker on
        another node needs the images but not the run folder; the unit number and where it ran
        travel back."""
        return (unit, *self.run(spec, unit, records), worker_identity())


def worker_identity() -> dict:
    """Host, Ray node id and pid of this process (recorded per unit: how work spread)."""
    import os
    import socket

    node = None
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return {"host": socket.gethostname(), "node": node, "pid": os.getpid()}
