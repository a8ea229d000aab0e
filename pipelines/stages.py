"""The unit worker: loads the models once, then turns unit numbers into finished tables.

`UnitWorker` is used as is by the local executor and as a Ray Data callable class
(`__call__(batch) -> batch`) by the Ray executor; both call the same pure `process_unit`. Tables
travel back to the driver as Arrow IPC bytes so the driver alone writes files and the manifest (one
writer, no races).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


def to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


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
        records = read_unit(self.spec.plan_path, unit)
        images, objects = process_unit(self.spec.context, records, self.masker, self.captioner)
        return table_from_rows("images", images), table_from_rows("objects", objects)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"unit": [], "images": [], "objects": []}
        for unit in batch["unit"]:
            images, objects = self.run(int(unit))
            out["unit"].append(int(unit))
            out["images"].append(to_ipc(images))
            out["objects"].append(to_ipc(objects))
        return out
