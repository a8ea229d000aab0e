"""The synthesis run: plan units -> workers (Ray or in-process) -> shards + manifest, resumable.

The driver owns all writes. Workers return a unit's two tables; the driver writes both files
atomically and only then records the unit in the manifest. A rerun with the same configuration skips
every unit whose files are intact, so an interrupted run finishes with exactly the rows an
uninterrupted run writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from pipelines.captioners import CAPTIONERS, Captioner, CaptionerConfig, build_captioner
from pipelines.maskers import MASKERS, Masker, MaskerConfig, build_masker
from pipelines.plan import open_plan, write_plan
from pipelines.process import UnitContext
from pipelines.quality import QualityConfig
from pipelines.registry import resolve
from pipelines.shards import MANIFEST, UNIT_LOG, Manifest, write_unit
from pipelines.sources import SOURCES, SourceConfig, open_source
from pipelines.stages import UnitWorker, WorkerSpec

log = logging.getLogger(__name__)
EXECUTORS = ("auto", "ray", "local")


@dataclass
class SynthesizeConfig:
    """One `engine synthesize` run. Fields that change results enter the fingerprint; the others
    (where and how it runs) do not, so a run may resume on a different executor or worker count."""

    source: SourceConfig
    out: Path
    masker: MaskerConfig = field(default_factory=MaskerConfig)
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    unit_size: int = 64
    limit: int | None = None
    remask: bool = False
    executor: str = "auto"  # auto: in-process when too small for the Ray pool (ray_runner)
    workers: int = 0  # 0: one per CPU (leaving one for Ray's own tasks) or one per GPU
    ray_address: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.source.name not in SOURCES:
            raise ValueError(
                f"unknown source {self.source.name!r}; choose one of: {', '.join(SOURCES)}"
            )
        resolve(MASKERS, self.masker.name, "masker")
        resolve(CAPTIONERS, self.captioner.name, "captioner")
        if self.executor not in EXECUTORS:
            raise ValueError(
                f"unknown executor {self.executor!r}; choose one of: {', '.join(EXECUTORS)}"
            )
        if self.unit_size < 1:
            raise ValueError(f"--unit-size must be >= 1, got {self.unit_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        positive = {
            "--box-chunk": self.masker.box_chunk,
            "--captions-per-object": self.captioner.captions_per_object,
            "--caption-batch-size": self.captioner.caption_batch_size,
            "--caption-max-tokens": self.captioner.caption_max_tokens,
        }
        for flag, value in positive.items():
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")


@dataclass
class RunSummary:
    out: Path
    run_id: str
    units_total: int
    units_skipped: int
    units_written: int
    totals: dict
    input_objects: int


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def resolved_config(cfg: SynthesizeConfig, source) -> dict:
    """The part of the configuration that decides the output rows."""
    return {
        "source": {
            "name": source.name,
            "split": source.split,
            "root": str(Path(source.root).resolve()),  # readers find images from anywhere
            "annotation_file": str(source.annotation_file) if source.annotation_file else None,
            "bbox_format": cfg.source.bbox_format,
        },
        "masker": _jsonable(cfg.masker),
        "captioner": _jsonable(cfg.captioner),
        "quality": _jsonable(cfg.quality),
        "unit_size": cfg.unit_size,
        "limit": cfg.limit,
        "remask": cfg.remask,
    }


def fingerprint(resolved: dict) -> str:
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mqengine")
    except PackageNotFoundError:
        return "unknown"


def _clear_output(out: Path) -> None:
    for name in ("images", "objects", "_plan"):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / MANIFEST).unlink(missing_ok=True)
    (out / UNIT_LOG).unlink(missing_ok=True)


def _remove_partial_files(out: Path) -> None:
    """Temporary files of a killed run (never referenced by the manifest)."""
    for name in ("images", "objects"):
        for tmp in (out / name).glob(".part-*.tmp-*"):
            tmp.unlink(missing_ok=True)


def prepare(cfg: SynthesizeConfig) -> tuple[Manifest, WorkerSpec, list[int]]:
    """Open the source, make or reuse the plan and manifest; return what is left to do."""
    source = open_source(cfg.source)
    resolved = resolved_config(cfg, source)
    fp = fingerprint(resolved)
    manifest = Manifest.load(cfg.out)
    if manifest is not None and manifest.data.get("fingerprint") != fp:
        if not cfg.overwrite:
            raise ValueError(
                f"{cfg.out} holds a run with a different configuration (see its {MANIFEST}); "
                "use another --out, or --overwrite to replace it"
            )
        _clear_output(cfg.out)
        manifest = None
    plan_path = cfg.out / "_plan" / "plan.parquet"
    plan = open_plan(plan_path, fp)
    if plan is None or manifest is None:
        plan = write_plan(source.records(), plan_path, cfg.unit_size, fp, cfg.limit)
        header = {
            "fingerprint": fp,
            "run_id": fp[:12],
            "code_version": code_version(),
            "source": resolved["source"],
            "config": resolved,
            "plan": {
                "units": plan.num_units,
                "images": plan.num_images,
                "objects": plan.num_objects,
            },
        }
        manifest = Manifest.create(cfg.out, header)
        (cfg.out / UNIT_LOG).unlink(missing_ok=True)  # a new plan: earlier markers mean nothing
        manifest.save()
    _remove_partial_files(cfg.out)
    done = manifest.done_units()
    for key in [k for k in manifest.units if int(k) not in done]:
        log.warning("unit %s: files missing or changed since they were written; redoing it", key)
        del manifest.units[key]
    manifest.data["totals"] = manifest.totals()
    ctx = UnitContext(
        source=source.name,
        split=source.split,
        root=Path(manifest.data["source"]["root"]),
        run_id=manifest.data["run_id"],
        quality=cfg.quality,
        remask=cfg.remask,
    )
    spec = WorkerSpec(plan_path=plan_path, context=ctx, masker=cfg.masker, captioner=cfg.captioner)
    pending = [k for k in range(manifest.data["plan"]["units"]) if k not in done]
    return manifest, spec, pending


Result = tuple[int, pa.Table, pa.Table]


def preflight(cfg: SynthesizeConfig) -> tuple[Masker, Captioner]:
    """Build the masker and captioner once in the driver, before any planning, so that a missing,
    corrupt or mismatched checkpoint is one clear error instead of a failure inside a worker.

    With Ray the driver may have no GPU, so it checks on the CPU; its copy is then dropped and every
    worker loads its own. The local executor keeps and uses these models."""
    masker_cfg, captioner_cfg = cfg.masker, cfg.captioner
    if cfg.executor == "ray":
        masker_cfg = dataclasses.replace(masker_cfg, device="cpu")
        captioner_cfg = dataclasses.replace(captioner_cfg, device="cpu")
    return build_masker(masker_cfg), build_captioner(captioner_cfg)


def run_local(spec: WorkerSpec, pending: list[int], models: tuple) -> Iterator[Result]:
    worker = UnitWorker(spec.masker, spec.captioner, max(1, os.cpu_count() or 1), *models)
    for unit in pending:
        yield (unit, *worker.run(spec, unit))


def run(
    cfg: SynthesizeConfig,
    on_unit: Callable[[dict], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> RunSummary:
    """Run (or resume) a synthesis. `on_start(units_total, units_done)` is called once planning is
    done; `on_unit(entry)` after each unit is recorded in the manifest.

    SIGTERM raises KeyboardInterrupt here as Ctrl-C does; either way Ray is shut down before this
    returns and the units recorded so far stay, so the same command resumes."""
    import contextlib
    import time

    from pipelines.ray_runner import RayPool, choose_executor, sigterm_as_interrupt, starts_early

    t0 = time.monotonic()
    cleanup = contextlib.ExitStack()  # restores SIGTERM and shuts Ray down however run() ends
    cleanup.enter_context(sigterm_as_interrupt())
    pool = None
    try:
        models = preflight(cfg)
        log.info("phase: models checked in %.2f s", time.monotonic() - t0)
        if starts_early(cfg.executor, cfg.ray_address):
            # Ray and the actors start now, so the actors build their models while we plan.
            pool = cleanup.enter_context(
                RayPool(cfg.masker, cfg.captioner, cfg.workers, cfg.ray_address)
            )
        t1 = time.monotonic()
        manifest, spec, pending = prepare(cfg)
        log.info("phase: planned in %.2f s", time.monotonic() - t1)
    except BaseException:
        cleanup.close()
        raise
    total = manifest.data["plan"]["units"]
    skipped = total - len(pending)
    if on_start:
        on_start(total, skipped)
    if pending:
        with cleanup:
            executor = cfg.executor
            if executor == "auto":
                planned = manifest.data["plan"]["images"]
                n_images = sum(min(cfg.unit_size, planned - k * cfg.unit_size) for k in pending)
                executor, why = choose_executor(n_images, cfg.workers, cfg.ray_address)
                if executor == "local":
                    log.warning(why)  # shown by the CLI: says how to force Ray
                else:
                    log.info(why)
            if executor == "local":
                results = run_local(spec, pending, models)
            else:
                del models  # workers load their own copies
                if pool is None:
                    pool = cleanup.enter_context(
                        RayPool(cfg.masker, cfg.captioner, cfg.workers, cfg.ray_address)
                    )
                results = pool.results(spec, pending)
            t2 = time.monotonic()
            for unit, images, objects in results:
                entry = write_unit(cfg.out, unit, images, objects)
                manifest.record_unit(unit, entry)
                if on_unit:
                    on_unit(entry)
            log.info("phase: %d units in %.2f s (%s)", len(pending), time.monotonic() - t2,
                     executor)
    manifest.data["totals"] = manifest.totals()
    manifest.save()
    cleanup.close()  # also when nothing was pending
    return RunSummary(
        cfg.out,
        manifest.data["run_id"],
        total,
        skipped,
        len(pending),
        manifest.data["totals"],
        manifest.data["plan"]["objects"],
    )
