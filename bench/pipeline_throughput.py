"""Pipeline throughput: the Ray pipeline with 2 workers vs a plain single-process loop.

Part `cost` (what a user's `engine synthesize` pays, as a subprocess, imports to exit): wall time of
the CLI on N1 and N2 generated scenes (grabcut + template) with `--executor local`, `--executor ray`
(the old default: Ray for every job; the baseline) and `--executor auto` (the new default), giving
per executor the per-image cost (t(N2) - t(N1)) / (N2 - N1) and the fixed cost t(N1) - N1 * that.
The Ray run at N1 also logs its phases (-v), which the table breaks down.

Part `throughput`, two measurements, each against a baseline run in this same process:
1. objects/s with the `grabcut` masker (+ the `template` captioner by default): `synthesize.run`
   with the Ray executor and 2 workers vs a loop over the source that calls the same pure function
   (`pipelines.process.process_unit`) with the same masker and captioner. The loop does no Ray, no
   planning and no shard writing; the pipeline's time includes planning, actor start-up, shard and
   manifest writing. Goal: >= 1.6x on a 2-core machine.
2. per-image overhead of the pipeline with the `box` masker (+ `none` captioner), where the model
   work is nearly nothing: (pipeline s - loop s) / images, and the marginal overhead from runs at
   N/4 and N images (which removes the pipeline's fixed cost per run).
Ray's init is timed once, separately, and excluded from the pipeline times (reported with it too).
Self-checks: the pipeline's manifest counts the same objects and the same kept/filtered split as the
loop (GrabCut is seeded, so both produce the same masks).

    .venv/bin/python bench/pipeline_throughput.py [--quick] [--part cost|throughput|all]

`--part cost` alone (< 2 minutes) keeps the throughput figures already in the JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import _data
import ray
from _common import (
    REPO,
    check,
    console,
    machine,
    measure,
    median_of,
    parser,
    print_table,
    timed,
    write_results,
)

from pipelines.captioners import CaptionerConfig, build_captioner
from pipelines.maskers import MaskerConfig, build_masker
from pipelines.process import UnitContext, process_unit
from pipelines.quality import QualityConfig
from pipelines.ray_runner import AUTO_MIN_IMAGES_PER_WORKER, init_ray
from pipelines.sources import SourceConfig, open_source
from pipelines.synthesize import SynthesizeConfig, run

WORKERS = 2
EXECUTORS = ("local", "ray", "auto")  # ray: the old default, every job on Ray (the baseline)
PHASE = re.compile(r"(phase|ray): (.*?) (?:in|after) ([0-9.]+) s")


def loop_counts(ann: Path, masker: str, captioner: str, unit_size: int, limit: int) -> dict:
    """The plain loop: source records -> process_unit per unit of `unit_size` images."""
    import cv2

    cv2.setNumThreads(os.cpu_count() or 1)  # as the local executor does: all cores to one process
    source = open_source(SourceConfig("coco", ann.parent, ann, "bench"))
    ctx = UnitContext(source="coco", split="bench", root=ann.parent, run_id="bench",
                      quality=QualityConfig())
    m = build_masker(MaskerConfig(name=masker))
    c = build_captioner(CaptionerConfig(name=captioner))
    counts = {"images": 0, "objects": 0, "kept": 0, "filtered": 0, "rejected": 0}
    records = islice(source.records(), limit)
    while unit := list(islice(records, unit_size)):
        images, objects = process_unit(ctx, unit, m, c)
        counts["images"] += len(images)
        counts["objects"] += len(objects)
        for row in objects:
            counts[row["status"]] += 1
    return counts


def pipeline_counts(ann: Path, masker: str, captioner: str, unit_size: int, limit: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        cfg = SynthesizeConfig(
            source=SourceConfig("coco", ann.parent, ann, "bench"), out=out,
            masker=MaskerConfig(name=masker), captioner=CaptionerConfig(name=captioner),
            unit_size=unit_size, limit=limit, executor="ray", workers=WORKERS,
        )
        summary = run(cfg)
        return dict(summary.totals)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def same_counts(loop: dict, pipe: dict, what: str) -> None:
    for key in ("images", "objects", "kept", "filtered", "rejected"):
        check(loop[key] == pipe[key],
              f"{what}: loop {key}={loop[key]} but pipeline {key}={pipe[key]}")
    check(pipe["objects"] > 0, f"{what}: no objects processed")


def cli_run(ann: Path, executor: str, images: int, unit_size: int) -> dict:
    """One `engine synthesize` as a user runs it; wall seconds, the log's phases and its choice."""
    out = Path(tempfile.mkdtemp(prefix="bench-cost-"))
    try:
        argv = [sys.executable, "-m", "engine.cli", "synthesize", "-v", "--source", "coco",
                "--root", str(ann.parent), "--annotations", str(ann), "--split", "bench",
                "--out", str(out), "--limit", str(images), "--unit-size", str(unit_size),
                "--executor", executor, "--workers", str(WORKERS)]
        env = dict(os.environ, PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled")
        env.pop("RAY_ADDRESS", None)
        r = measure(argv, env=env, cwd=REPO)
        totals = json.loads((out / "manifest.json").read_text())["totals"]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    check(totals["images"] == images, f"{executor} at {images}: wrote {totals['images']} images")
    phases = {f"{kind}: {what}": float(s) for kind, what, s in PHASE.findall(r["output"])}
    in_process = "running in-process" in r["output"]
    return {"wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "phases": phases,
            "ran_in_process": in_process or executor == "local", "objects": totals["objects"]}


def cost_part(args) -> dict:
    n1, n2 = (6, 24) if args.quick else (12, 48)  # keeps the part under 2 minutes
    unit, repeats = 6, args.cost_repeats
    ann = _data.scenes(args.data_dir, n2)
    cli_run(ann, "local", 4, unit)  # warm-up: page cache, .pyc files
    # The fastest of `repeats` runs, taken in turns so that a neighbour's burst on this shared box
    # (it only ever adds time) hits every executor alike.
    tries: dict = {(ex, n): [] for ex in EXECUTORS for n in (n1, n2)}
    for _ in range(repeats):
        for n in (n1, n2):
            for ex in EXECUTORS:
                tries[ex, n].append(cli_run(ann, ex, n, unit))
    runs = {ex: {n: min(tries[ex, n], key=lambda r: r["wall_s"]) for n in (n1, n2)}
            for ex in EXECUTORS}
    for ex in EXECUTORS:
        check(runs[ex][n1]["objects"] == runs["local"][n1]["objects"], f"{ex}: object count")
    for n in (n1, n2):
        small = n < AUTO_MIN_IMAGES_PER_WORKER * WORKERS
        check(runs["auto"][n]["ran_in_process"] == small, f"auto at {n} images: wrong executor")
    table, res = [], {"images": [n1, n2], "unit_size": unit, "workers": WORKERS,
                      "repeats": repeats, "loadavg_1min_at_end": os.getloadavg()[0]}
    for ex in EXECUTORS:
        t1, t2 = runs[ex][n1]["wall_s"], runs[ex][n2]["wall_s"]
        c1, c2 = runs[ex][n1]["cpu_s"], runs[ex][n2]["cpu_s"]
        per_image, cpu_per_image = (t2 - t1) / (n2 - n1), (c2 - c1) / (n2 - n1)
        res[ex] = {"wall_s": {str(n1): t1, str(n2): t2}, "per_image_ms": 1000 * per_image,
                   "fixed_s": t1 - n1 * per_image,
                   # CPU seconds of the CLI process (and what it reaped): less sensitive than
                   # wall time to a busy neighbour; for Ray they miss the workers (SIGKILLed by
                   # Ray's shutdown, never reaped by the driver), so only the driver's share.
                   "cpu_s": {str(n1): c1, str(n2): c2}, "cpu_per_image_ms": 1000 * cpu_per_image,
                   "cpu_fixed_s": c1 - n1 * cpu_per_image,
                   "ran_in_process": {str(n): runs[ex][n]["ran_in_process"] for n in (n1, n2)}}
        table.append([ex + (" (baseline: old default)" if ex == "ray" else
                            " (new default)" if ex == "auto" else ""),
                      t1, t2, res[ex]["fixed_s"], res[ex]["per_image_ms"],
                      *((None, None) if ex == "ray" else
                        (res[ex]["cpu_fixed_s"], res[ex]["cpu_per_image_ms"]))])
    res["ray_phases_s"] = runs["ray"][n1]["phases"]
    res["speedup_auto_vs_ray"] = {str(n): runs["ray"][n]["wall_s"] / runs["auto"][n]["wall_s"]
                                  for n in (n1, n2)}
    print_table(f"engine synthesize, grabcut + template, scenes 320x240, unit {unit}, "
                f"{WORKERS} workers: wall s (whole CLI, fastest of {repeats})",
                ["executor", f"{n1} images", f"{n2} images", "fixed s", "ms / image",
                 "fixed CPU s", "CPU ms / image"], table)
    print_table(f"ray at {n1} images: phases (from the -v log)", ["phase", "seconds"],
                [[k, v] for k, v in res["ray_phases_s"].items()])
    return res


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, help="scenes for the grabcut comparison (300; quick 24)")
    p.add_argument("--box-images", type=int,
                   help="small images for the box overhead (3000; quick 256)")
    p.add_argument("--unit-size", type=int, default=16, help="images per unit, grabcut runs")
    p.add_argument("--box-unit-size", type=int, default=64,
                   help="images per unit, box runs (the CLI default)")
    p.add_argument("--captioner", default="template", help="captioner of the grabcut comparison")
    p.add_argument("--repeats", type=int, help="repeats of each box run (median; 3, quick 1)")
    p.add_argument("--part", choices=("all", "cost", "throughput"), default="all")
    p.add_argument("--cost-repeats", type=int, default=2, help="runs per cost point (fastest)")
    args = p.parse_args()
    previous = args.results / f"pipeline_throughput{'.quick' if args.quick else ''}.json"
    kept = json.loads(previous.read_text()) if previous.is_file() else {"results": {}}
    results = dict(kept["results"])
    measured = dict(kept.get("measured") or {"throughput": kept.get("machine")})
    if args.part in ("all", "cost"):
        results["cost"] = cost_part(args)
        measured["cost"] = machine()
    if args.part in ("all", "throughput"):
        results.update(throughput_part(args))
        measured["throughput"] = machine()
    config = {**kept.get("config", {}), "workers": WORKERS,
              "cost": {"executors": EXECUTORS, "data": "scenes (320x240)"}}
    write_results("pipeline_throughput", args, config, {**results, "measured": measured})


def throughput_part(args) -> dict:
    n_scenes = args.images or (24 if args.quick else 300)
    n_small = args.box_images or (256 if args.quick else 3000)
    repeats = args.repeats or (1 if args.quick else 3)

    console.print(f"data: {n_scenes} scenes, {n_small} small images under {args.data_dir}")
    scenes_json = _data.scenes(args.data_dir, n_scenes)
    small_json = _data.small_images(args.data_dir, n_small)

    # Warm-up: imports, OpenCV's first calls and the page cache of the images, outside any timing.
    loop_counts(scenes_json, "grabcut", args.captioner, args.unit_size, 4)
    loop_counts(small_json, "box", "none", args.box_unit_size, 64)

    console.print("grabcut: plain loop ...")
    load_start = os.getloadavg()[0]
    cpu0 = time.process_time()
    t_loop_gc, gc_loop = timed(lambda: loop_counts(scenes_json, "grabcut", args.captioner,
                                                   args.unit_size, n_scenes))
    # CPU seconds the loop got per wall second: < 1 means other jobs took part of a core from it.
    loop_cpu_share = (time.process_time() - cpu0) / t_loop_gc
    console.print("box: plain loop ...")
    t_loop_box, _, box_loop = median_of(
        lambda: loop_counts(small_json, "box", "none", args.box_unit_size, n_small), repeats)

    t_init, _ = timed(lambda: init_ray(None))
    try:
        # A throw-away run so Ray's worker processes exist before the timed runs (a long-running
        # service pays that once); its own time is reported as the cold run.
        t_cold, _ = timed(lambda: pipeline_counts(small_json, "box", "none", args.box_unit_size,
                                                  64))
        console.print(f"grabcut: ray pipeline, {WORKERS} workers ...")
        t_pipe_gc, gc_pipe = timed(lambda: pipeline_counts(scenes_json, "grabcut", args.captioner,
                                                           args.unit_size, n_scenes))
        console.print(f"box: ray pipeline, {WORKERS} workers ...")
        t_pipe_box, box_times, box_pipe = median_of(
            lambda: pipeline_counts(small_json, "box", "none", args.box_unit_size, n_small),
            repeats)
        # A quarter-size run too: the difference of the two gives the per-image cost without the
        # fixed cost (planning, actor start-up) that a single run folds in.
        n_quarter = n_small // 4
        t_pipe_quarter, _, _ = median_of(
            lambda: pipeline_counts(small_json, "box", "none", args.box_unit_size, n_quarter),
            repeats)
    finally:
        t_shutdown, _ = timed(ray.shutdown)
    same_counts(gc_loop, gc_pipe, "grabcut")
    same_counts(box_loop, box_pipe, "box")

    objs = gc_loop["objects"]
    gc = {
        "images": gc_loop["images"], "objects": objs, "kept": gc_loop["kept"],
        "loop_s": t_loop_gc, "pipeline_s": t_pipe_gc,
        "loop_objects_per_s": objs / t_loop_gc, "pipeline_objects_per_s": objs / t_pipe_gc,
        "pipeline_objects_per_s_with_init": objs / (t_pipe_gc + t_init),
        "speedup": t_loop_gc / t_pipe_gc, "speedup_with_init": t_loop_gc / (t_pipe_gc + t_init),
        "goal_speedup": 1.6, "loop_cpu_per_wall_s": loop_cpu_share,
        "loadavg_1min_at_start": load_start,
    }
    n_box = box_loop["images"]
    marginal_ms = 1000 * (t_pipe_box - t_pipe_quarter) / (n_box - n_quarter)
    box = {
        "images": n_box, "objects": box_loop["objects"], "repeats": repeats,
        "loop_s": t_loop_box, "pipeline_s": t_pipe_box, "pipeline_runs_s": box_times,
        "loop_ms_per_image": 1000 * t_loop_box / n_box,
        "pipeline_ms_per_image": 1000 * t_pipe_box / n_box,
        "overhead_ms_per_image": 1000 * (t_pipe_box - t_loop_box) / n_box,
        "quarter_images": n_quarter, "pipeline_quarter_s": t_pipe_quarter,
        "pipeline_marginal_ms_per_image": marginal_ms,
        "pipeline_fixed_s": t_pipe_box - marginal_ms * n_box / 1000,
        "marginal_overhead_ms_per_image": marginal_ms - 1000 * t_loop_box / n_box,
    }
    ray_times = {"init_s": t_init, "first_run_64_images_s": t_cold, "shutdown_s": t_shutdown}

    print_table(
        f"grabcut + {args.captioner}: {objs} objects in {gc['images']} scenes (320x240)",
        ["run", "seconds", "objects/s", "vs loop"],
        [["plain loop (1 process, no writing)", t_loop_gc, gc["loop_objects_per_s"], 1.0],
         [f"ray pipeline, {WORKERS} workers", t_pipe_gc, gc["pipeline_objects_per_s"],
          gc["speedup"]],
         ["  ... + ray init", t_pipe_gc + t_init, gc["pipeline_objects_per_s_with_init"],
          gc["speedup_with_init"]]],
    )
    print_table(
        f"box + none: {n_box} images (64x64), {box['objects']} objects, median of {repeats}",
        ["run", "seconds", "ms/image", "overhead ms/image"],
        [["plain loop", t_loop_box, box["loop_ms_per_image"], None],
         [f"ray pipeline, {WORKERS} workers", t_pipe_box, box["pipeline_ms_per_image"],
          box["overhead_ms_per_image"]],
         [f"  ... marginal ({n_quarter} -> {n_box} images)", None,
          box["pipeline_marginal_ms_per_image"], box["marginal_overhead_ms_per_image"]]],
    )
    console.print(f"box pipeline fixed cost (planning, actor start-up): "
                  f"{box['pipeline_fixed_s']:.1f} s per run")
    print_table("ray", ["step", "seconds"], [[k, v] for k, v in ray_times.items()])
    console.print(f"load average at start {load_start:.1f} on {os.cpu_count()} CPUs; the loop got "
                  f"{loop_cpu_share:.2f} CPU-s per wall-s (1.0 = a whole core)")
    return {"grabcut": gc, "box": box, "ray": ray_times}


if __name__ == "__main__":
    main()
