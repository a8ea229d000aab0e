"""The synthesis run: plan units -> workers (Ray or in-process) -> shards + manifest, resumable.

The driver owns all writes. Workers return a unit's two tables; the driver writes both files
atomically and only then records the unit in the manifest. A rerun with the same configuration skips
every unit whose files are intact, so an interrupted run finishes with exactly the rows an
uninterrupted run writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path

import pyarrow as pa

from pipelines.captioners import CAPTIONERS, Captioner, CaptionerConfig, build_captioner
from pipelines.maskers import MASKERS, Masker, MaskerConfig, build_masker
from pipelines.plan import (
    COCO_INDEX,
    Plan,
    open_plan,
    open_plan_units,
    write_index_plan,
    write_plan,
)
from pipelines.process import UnitContext
from pipelines.quality import QualityConfig
from pipelines.registry import resolve
from pipelines.runout import LocalOut, StoreOut, open_out
from pipelines.shards import Manifest
from pipelines.sources import SOURCES, SourceConfig, open_source
from pipelines.sources.coco import CocoSource
from pipelines.stages import UnitWorker, WorkerSpec
from schemas.location import is_uri, open_location

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
    unit_size: int | None = None  # None: chosen from the input size (auto_unit_size)
    limit: int | None = None
    remask: bool = False
    executor: str = "auto"  # auto: in-process when too small for the Ray pool (ray_runner)
    workers: int = 0  # 0: one per CPU (leaving one for Ray's own tasks) or one per GPU
    ray_address: str | None = None
    gpus_per_worker: float = 0.0  # 0: the cluster's GPUs split evenly over the pool
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
        if self.unit_size is not None and self.unit_size < 1:
            raise ValueError(f"--unit-size must be >= 1, got {self.unit_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        if not 0.0 <= self.gpus_per_worker <= 8.0:
            raise ValueError(f"--gpus-per-worker must be in [0, 8], got {self.gpus_per_worker}")
        if is_uri(self.out):
            open_location(self.out)  # an unknown scheme or a malformed URI: one line, now
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
    out: Path | str
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


def resolved_config(cfg: SynthesizeConfig, source, local_dir: Path | None) -> dict:
    """The part of the configuration that decides the output rows (`local_dir`: the run's folder
    on this machine, None on object storage)."""
    return {
        "source": {
            "name": source.name,
            "split": source.split,
            "root": recorded_root(local_dir, source.root),  # readers find images from anywhere
            "annotation_file": str(source.annotation_file) if source.annotation_file else None,
            "bbox_format": cfg.source.bbox_format,
        },
        "masker": _jsonable(cfg.masker),
        "captioner": _jsonable(cfg.captioner),
        "quality": _jsonable(cfg.quality),
        "unit_size": cfg.unit_size if cfg.unit_size is not None else "auto",
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


def input_files(source) -> list[Path]:
    """The annotation files a run reads (their content enters the fingerprint)."""
    path = getattr(source, "annotation_file", None)
    if path is None:
        return []
    path = Path(path)
    if path.is_dir():  # a `datasets` folder or a folder of Parquet files
        return sorted(p for p in path.rglob("*") if p.suffix in (".arrow", ".parquet", ".json"))
    return [path]


def model_files(cfg: SynthesizeConfig) -> list[Path]:
    """The weights a run's models load (a checkpoint file or every file of a model folder): their
    content enters the fingerprint too, so a new `last.pt` at the same path is a new run, not a
    resume that labels new masks with the old model's provenance."""
    paths = [cfg.masker.sam_checkpoint, cfg.masker.mask_model,
             getattr(cfg.masker, "mask_checkpoint", None), cfg.captioner.caption_model]
    files: list[Path] = []
    for path in (Path(p) for p in paths if p is not None):
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.is_file())
        elif path.is_file():
            files.append(path)
    return files


def input_fingerprint(files: list[Path], previous: dict | None = None) -> dict:
    """{path: {size, sha256}} of the annotation files, and their mtimes apart (`mtime_ns`): a file
    whose path, size and mtime match `previous` (the manifest's record) keeps its recorded sha256
    instead of being hashed again, so resuming a run over a 5 GB file costs a stat, not a read."""
    from pipelines.shards import sha256_file

    previous = previous or {}
    digests, mtimes = {}, {}
    for path in files:
        st = path.stat()
        old = (previous.get("files") or {}).get(str(path))
        same = old and old.get("size") == st.st_size
        same = same and (previous.get("mtime_ns") or {}).get(str(path)) == st.st_mtime_ns
        digests[str(path)] = {
            "size": st.st_size,
            "sha256": old["sha256"] if same else sha256_file(path),
        }
        mtimes[str(path)] = st.st_mtime_ns
    return {"files": digests, "mtime_ns": mtimes}


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configurations."""
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def _changed_message(out: Path | str, old: dict, new: dict) -> str:
    """Name what differs between the run in `out` (resolved config `old`) and this one."""
    old_files, new_files = old.get("inputs") or {}, new.get("inputs") or {}
    files = sorted(p for p in {*old_files, *new_files} if old_files.get(p) != new_files.get(p))
    others = differences({k: v for k, v in old.items() if k != "inputs"},
                         {k: v for k, v in new.items() if k != "inputs"})
    what = []
    if files:
        what.append(f"an input file changed since that run started: {', '.join(files[:3])}")
    if others:
        what.append("other settings: " + ", ".join(others[:6]))
    detail = "; ".join(what) or "see its manifest"
    return (
        f"{out} holds a run with a different configuration ({detail}); "
        "use another --out, or --overwrite to replace it"
    )


AUTO_UNITS = 16  # small inputs are cut into this many units, so up to 16 workers stay busy
AUTO_UNIT_SIZE = 64  # the unit size of inputs of AUTO_UNITS * 64 images or more


def auto_unit_size(records: Iterator) -> tuple[int, Iterator]:
    """Pick the unit size from the input size alone (so a resume on another pool plans the same
    units): peek at up to AUTO_UNITS * AUTO_UNIT_SIZE records; fewer than that are split into
    AUTO_UNITS units. Returns the size and an iterator over all records (the peeked ones first)."""
    it = iter(records)
    head = list(islice(it, AUTO_UNITS * AUTO_UNIT_SIZE))
    if len(head) < AUTO_UNITS * AUTO_UNIT_SIZE:
        return max(1, math.ceil(len(head) / AUTO_UNITS)), iter(head)
    return AUTO_UNIT_SIZE, chain(head, it)


ROOT_PROBE = 16  # images of the plan checked for existence before any work


def check_root(root: Path, plan_path: Path, source=None) -> None:
    """Stop before any work when none of the plan's first images exists under `root` (a wrong
    --root would otherwise run to the end with every object rejected)."""
    from pipelines.images import resolve_inside
    from pipelines.plan import read_unit

    probed: list = []
    for unit in range(min(ROOT_PROBE, open_plan_units(plan_path))):
        probed += [r for r in read_unit(plan_path, unit, source) if not r.error]
        if len(probed) >= ROOT_PROBE:
            break
    probed = probed[:ROOT_PROBE]
    if not probed:
        return
    for record in probed:
        path = resolve_inside(root, record.file)
        if path is not None and path.is_file():
            return
    raise ValueError(
        f"--root {root}: none of the first {len(probed)} images of the plan exist there "
        f"(e.g. {root / probed[0].file} is missing); check --root"
    )


def _open_checked_source(cfg: SynthesizeConfig, target: LocalOut | StoreOut):
    source = open_source(cfg.source)
    if hasattr(source, "use_image_dir"):  # embedded images are written into the run, not the data
        if target.image_dir is None and getattr(source, "embedded", False):
            raise ValueError(
                f"--out {target.name}: source {source.name} embeds its images, and a run behind "
                "a URI cannot hold them for readers; use a local or shared --out path"
            )
        source.use_image_dir(target.image_dir)
    data_root = Path(getattr(source, "dataset_dir", source.root))
    if not data_root.exists():
        raise FileNotFoundError(f"--root {data_root}: no such folder")
    if not data_root.is_dir():
        raise NotADirectoryError(f"--root {data_root}: not a folder")
    target.check_no_overlap(
        {"dataset root": data_root, "annotation file": getattr(source, "annotation_file", None)},
    )
    return source


def recorded_root(out: Path | None, root: Path) -> str:
    """The image root as the manifest records it: absolute, or relative to the run folder when it
    lies inside it (embedded images written out), so a moved run still finds them. `out` None: a
    run on object storage, whose root is always absolute."""
    root_r = Path(root).resolve()
    if out is None:
        return str(root_r)
    out_r = Path(out).resolve()
    if root_r == out_r or out_r in root_r.parents:
        return os.path.relpath(root_r, out_r)
    return str(root_r)


def image_root(out: Path | None, recorded: str) -> Path:
    """The recorded image root as a path (a relative one is relative to the run folder)."""
    path = Path(recorded)
    return path if path.is_absolute() or out is None else Path(out) / path


def prepare(
    cfg: SynthesizeConfig, target: LocalOut | StoreOut
) -> tuple[Manifest, WorkerSpec, list[int]]:
    """Open the source, make or reuse the plan and manifest; return what is left to do. Runs
    under the output lock (see `run`)."""
    source = _open_checked_source(cfg, target)
    manifest = target.load_manifest()
    old = manifest.data if manifest is not None else {}
    resolved = resolved_config(cfg, source, target.local_dir)
    inputs = input_fingerprint(input_files(source) + model_files(cfg), old.get("inputs"))
    resolved["inputs"] = inputs["files"]
    fp = fingerprint(resolved)
    if manifest is not None and manifest.data.get("fingerprint") != fp:
        if not cfg.overwrite:
            raise ValueError(_changed_message(target.name, old.get("config", {}), resolved))
        removed = target.clear(manifest.units)
        log.warning("--overwrite: removed %d files of the earlier run in %s", removed,
                    target.name)
        manifest = None
    target.remove_temp(manifest.units if manifest is not None else {})
    plan_path = target.plan_dir / "plan.parquet"
    if isinstance(source, CocoSource):  # its index lives with the plan: a resume finds it
        source.cache_dir = plan_path.parent
    plan = open_plan(plan_path, fp)
    if plan is None or manifest is None:
        manifest = _new_plan(cfg, target, source, resolved, fp, plan_path, inputs, manifest)
    manifest.data["inputs"] = inputs  # fresh mtimes: the next resume costs a stat again
    done = manifest.done_units(check_inputs=True)
    for key in [k for k in manifest.units if int(k) not in done]:
        log.warning("unit %s: files or input images changed since they were written; redoing it",
                    key)
        del manifest.units[key]
        target.drop_unit(key)
    manifest.data["totals"] = manifest.totals()
    ctx = UnitContext(
        source=source.name,
        split=source.split,
        root=image_root(target.local_dir, manifest.data["source"]["root"]),
        run_id=manifest.data["run_id"],
        quality=cfg.quality,
        remask=cfg.remask,
    )
    spec = WorkerSpec(plan_path=plan_path, context=ctx, masker=cfg.masker, captioner=cfg.captioner,
                      source=source if isinstance(source, CocoSource) else None)
    pending = [k for k in range(manifest.data["plan"]["units"]) if k not in done]
    return manifest, spec, pending


def _new_plan(
    cfg: SynthesizeConfig, target: LocalOut | StoreOut, source, resolved: dict, fp: str,
    plan_path: Path, inputs: dict, old: Manifest | None = None,
) -> Manifest:
    """Write the plan and start a manifest for it. On object storage the plan is the driver's
    scratch, rebuilt on every resume: a rebuilt plan equal to the one `old` (the same
    fingerprint) recorded keeps `old` and its committed units."""
    if isinstance(source, CocoSource):
        plan, unit_size = _new_index_plan(cfg, source, fp, plan_path)
    else:
        records = source.records()
        if cfg.limit is not None:
            records = islice(records, cfg.limit)
        unit_size = cfg.unit_size
        if unit_size is None:
            unit_size, records = auto_unit_size(records)
        plan = write_plan(records, plan_path, unit_size, fp)
    try:
        check_root(image_root(target.local_dir, resolved["source"]["root"]), plan_path,
                   source if plan.kind == COCO_INDEX else None)
    except ValueError:
        plan_path.unlink(missing_ok=True)
        if plan.kind == COCO_INDEX:  # the run's own: a run that stops here leaves nothing
            shutil.rmtree(source.index().folder, ignore_errors=True)
        raise
    header = {
        "fingerprint": fp,
        "run_id": fp[:12],
        "code_version": code_version(),
        "source": resolved["source"],
        "config": resolved,
        "inputs": inputs,
        "plan": {
            "units": plan.num_units,
            "images": plan.num_images,
            "objects": plan.num_objects,
            "unit_size": unit_size,
        },
    }
    if target.plan_is_scratch and old is not None and old.data.get("plan") == header["plan"]:
        return old
    manifest = target.create_manifest(header)
    manifest.save()
    return manifest


def _new_index_plan(cfg: SynthesizeConfig, source: CocoSource, fp: str,
                    plan_path: Path) -> tuple[Plan, int]:
    """A COCO-like source: units by range of its index (built once into `_plan/`); index folders
    of earlier plans of this run (another annotation file) are removed."""
    index = source.index()
    for old in plan_path.parent.glob("coco-index-*"):
        if old.is_dir() and old != index.folder:
            shutil.rmtree(old)
    n = index.n_records if cfg.limit is None else min(cfg.limit, index.n_records)
    unit_size = cfg.unit_size
    if unit_size is None:
        unit_size, _ = auto_unit_size(iter(range(n)))  # the same rule as for streamed records
    return write_index_plan(index, plan_path, unit_size, fp, cfg.limit), unit_size


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
    on_start: Callable[..., None] | None = None,
) -> RunSummary:
    """Run (or resume) a synthesis under the output folder's lock (pipelines/outdir.py).
    `on_start(units_total, units_done, images_total, images_done)` is called once planning is done;
    `on_unit(entry)` after each unit is recorded in the manifest.

    On any failure (a bad flag found late, a full disk, Ctrl-C) the run's temporary files are
    removed, and a folder this run created is removed again if nothing was recorded in it."""
    src = cfg.source
    if src.annotations is not None and not Path(src.annotations).exists():
        raise FileNotFoundError(f"--annotations {src.annotations}: no such file")
    inputs = {"dataset root": src.root, "annotation file": src.annotations}
    if src.root is None and src.annotations is not None:
        inputs["annotation folder"] = Path(src.annotations).parent
    target = open_out(cfg.out)
    try:
        target.check_no_overlap(inputs)
        created = target.claim()
        try:
            target.lock()
        except BaseException:
            if created:  # nobody else can hold a lock in a folder this call created
                target.release_claim(created)
            raise
        try:
            started = time.monotonic()
            summary = _run_locked(cfg, target, on_unit, on_start)
            target.write_docs(time.monotonic() - started)
            return summary
        except BaseException:
            target.remove_temp({})  # ours: the lock is held
            target.release_claim(created)
            raise
        finally:
            target.unlock()
    finally:
        target.close()


def ray_pool(cfg: SynthesizeConfig):
    from pipelines.ray_runner import RayPool

    return RayPool(cfg.masker, cfg.captioner, cfg.workers, cfg.ray_address, cfg.gpus_per_worker)


def _run_locked(
    cfg: SynthesizeConfig,
    target: LocalOut | StoreOut,
    on_unit: Callable[[dict], None] | None = None,
    on_start: Callable[..., None] | None = None,
) -> RunSummary:
    """The run itself, under the lock (see `run`).

    SIGTERM raises KeyboardInterrupt here as Ctrl-C does; either way Ray is shut down before this
    returns and the units recorded so far stay, so the same command resumes."""
    from pipelines.ray_runner import choose_executor, sigterm_as_interrupt, starts_early

    t0 = time.monotonic()
    cleanup = contextlib.ExitStack()  # restores SIGTERM and shuts Ray down however run() ends
    cleanup.enter_context(sigterm_as_interrupt())
    pool = None
    try:
        models = preflight(cfg)
        log.info("phase: models checked in %.2f s", time.monotonic() - t0)
        if starts_early(cfg.executor, cfg.ray_address):
            # Ray and the actors start now, so the actors build their models while we plan.
            pool = cleanup.enter_context(ray_pool(cfg))
        t1 = time.monotonic()
        manifest, spec, pending = prepare(cfg, target)
        log.info("phase: planned in %.2f s", time.monotonic() - t1)
    except BaseException:
        cleanup.close()
        raise
    total = manifest.data["plan"]["units"]
    skipped = total - len(pending)
    if on_start:
        on_start(total, skipped, manifest.data["plan"]["images"], manifest.totals()["images"])
    if pending:
        with cleanup:
            executor = cfg.executor
            if executor == "auto":
                planned = manifest.data["plan"]["images"]
                size = manifest.data["plan"].get("unit_size") or cfg.unit_size or planned
                n_images = sum(min(size, planned - k * size) for k in pending)
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
                    pool = cleanup.enter_context(ray_pool(cfg))
                results = pool.results(spec, pending)
            t2 = time.monotonic()
            for unit, images, objects in results:
                entry = target.write_unit(unit, images, objects, spec.context.root)
                if pool is not None and unit in pool.placement:
                    entry["worker"] = pool.placement[unit]
                manifest.record_unit(unit, entry)
                if on_unit:
                    on_unit(entry)
            log.info("phase: %d units in %.2f s (%s)", len(pending), time.monotonic() - t2,
                     executor)
    manifest.data["totals"] = manifest.totals()
    manifest.save()
    cleanup.close()  # also when nothing was pending
    return RunSummary(
        target.name,  # the URI as typed for a run on object storage
        manifest.data["run_id"],
        total,
        skipped,
        len(pending),
        manifest.data["totals"],
        manifest.data["plan"]["objects"],
    )
