"""Pipeline throughput: the Ray pipeline with 2 workers vs a plain single-process loop.

Two measurements, each against a baseline run in this same process:
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

    .venv/bin/python bench/pipeline_throughput.py [--quick]
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from itertools import islice
from pathlib import Path

import _data
import ray
from _common import check, console, median_of, parser, print_table, timed, write_results

from pipelines.captioners import CaptionerConfig, build_captioner
from pipelines.maskers import MaskerConfig, build_masker
from pipelines.process import UnitContext, process_unit
from pipelines.quality import QualityConfig
from pipelines.ray_runner import init_ray
from pipelines.sources import SourceConfig, open_source
from pipelines.synthesize import SynthesizeConfig, run

WORKERS = 2


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
    args = p.parse_args()
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
    config = {"workers": WORKERS, "scenes": n_scenes, "small_images": n_small,
              "unit_size": args.unit_size, "box_unit_size": args.box_unit_size,
              "captioner": args.captioner, "loop": "process_unit only: no Ray, no plan, no writing"}
    write_results("pipeline_throughput", args, config,
                  {"grabcut": gc, "box": box, "ray": ray_times})


if __name__ == "__main__":
    main()
