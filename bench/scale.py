"""Scale: time and peak memory of `engine synthesize` on 1k, 10k and 100k small images.

Each run is the real CLI (`engine synthesize --masker box --captioner none`) in its own subprocess,
on generated 64x64 PNGs with 1-3 boxes each (cached under --data-dir). Reported per size and
executor: wall seconds, seconds per 1k images, the kernel's peak RSS of the driver process, and the
peak sum of RSS over the driver and all its descendants (sampled; for Ray this includes the raylet
and the workers). Linear time means flat seconds per 1k images (ratio largest/smallest ~ 1); flat
memory means the driver's peak does not grow with the number of images.
The baseline is the smallest size, measured in the same run.

Self-checks: every run's manifest counts every image and every input box, and the shard files
add up.

    .venv/bin/python bench/scale.py [--quick] [--sizes 1000,10000,100000] [--executors local,ray]
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import _data
import pyarrow.parquet as pq
from _common import REPO, check, console, measure, parser, print_table, write_results

from schemas.runs import open_run

ENGINE = [sys.executable, "-m", "engine.cli"]


def synthesize_argv(ann: Path, out: Path, executor: str, unit_size: int) -> list[str]:
    return [*ENGINE, "synthesize", "--source", "coco", "--annotations", str(ann),
            "--root", str(ann.parent), "--split", "bench", "--masker", "box", "--captioner", "none",
            "--executor", executor, "--unit-size", str(unit_size), "--out", str(out), "--overwrite"]


def check_output(out: Path, ann: Path, unit_size: int) -> dict:
    """The manifest and the files agree with the input: every image and box is accounted for."""
    coco = json.loads(ann.read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    totals = manifest["totals"]
    n_images, n_boxes = len(coco["images"]), len(coco["annotations"])
    units = math.ceil(n_images / unit_size)
    check(totals["images"] == n_images, f"{out}: {totals['images']} images, expected {n_images}")
    check(totals["objects"] == n_boxes, f"{out}: {totals['objects']} objects, expected {n_boxes}")
    check(totals["kept"] + totals["filtered"] + totals["rejected"] == n_boxes,
          f"{out}: kept + filtered + rejected != {n_boxes}")
    check(totals["images_bad"] == 0, f"{out}: {totals['images_bad']} unreadable images")
    run = open_run(out)
    for table in ("images", "objects"):
        files = run.files(table)
        check(len(files) == units, f"{out}/{table}: {len(files)} part files, expected {units}")
    check(listed_rows(open_run(out), "objects") == n_boxes,
          f"{out}: objects files hold != {n_boxes} rows")
    return {"images": n_images, "objects": n_boxes, "kept": totals["kept"], "units": units}


def listed_rows(run, table: str) -> int:
    """Rows of the part files of `table` the run lists."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in run.files(table))


def run_one(ann: Path, out: Path, executor: str, unit_size: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    m = measure(synthesize_argv(ann, out, executor, unit_size), env=env, cwd=REPO, interval=0.2)
    counts = check_output(out, ann, unit_size)
    shutil.rmtree(out, ignore_errors=True)
    n = counts["images"]
    return {**counts, "executor": executor, "wall_s": m["wall_s"], "cpu_s": m["cpu_s"],
            "s_per_1k_images": 1000 * m["wall_s"] / n, "images_per_s": n / m["wall_s"],
            "peak_rss_mb": m["peak_rss_mb"], "peak_tree_rss_mb": m["peak_tree_rss_mb"]}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes",
                   help="comma-separated image counts (1000,10000,100000; quick 1000,5000)")
    p.add_argument("--executors", help="comma-separated executors (local,ray)")
    p.add_argument("--ray-max", type=int,
                   help="largest size also run with Ray; larger ones run local only "
                   "(10000; quick 1000)")
    p.add_argument("--unit-size", type=int, default=64)
    args = p.parse_args()
    sizes = [int(s) for s in (args.sizes or ("1000,5000" if args.quick else
                                             "1000,10000,100000")).split(",")]
    executors = (args.executors or "local,ray").split(",")
    ray_max = args.ray_max or (1000 if args.quick else 10_000)

    rows, results = [], []
    for n in sizes:
        console.print(f"data: {n} images ...")
        ann = _data.small_images(args.data_dir, n)
        for executor in executors:
            if executor == "ray" and n > ray_max:
                console.print(f"skipping ray at {n} images (--ray-max {ray_max})")
                continue
            console.print(f"{executor}: {n} images ...")
            r = run_one(ann, args.data_dir / f"scale-out-{executor}", executor, args.unit_size)
            results.append(r)
            console.print(f"  {r['wall_s']:.1f} s, driver peak {r['peak_rss_mb']:.0f} MB")

    for executor in executors:
        runs = [r for r in results if r["executor"] == executor]
        if not runs:
            continue
        base, prev = runs[0], None
        for r in runs:
            r["per_image_time_vs_smallest"] = r["s_per_1k_images"] / base["s_per_1k_images"]
            r["driver_rss_vs_smallest"] = r["peak_rss_mb"] / base["peak_rss_mb"]
            # The fixed cost (interpreter, imports, Ray start) cancels in the difference: the
            # marginal rate is the one that must stay flat for linear time.
            r["marginal_s_per_1k_images"] = None if prev is None else (
                1000 * (r["wall_s"] - prev["wall_s"]) / (r["images"] - prev["images"]))
            prev = r
            rows.append([executor, r["images"], r["objects"], r["wall_s"], r["s_per_1k_images"],
                         r["marginal_s_per_1k_images"], r["per_image_time_vs_smallest"],
                         r["peak_rss_mb"], r["driver_rss_vs_smallest"], r["peak_tree_rss_mb"]])
    print_table("engine synthesize --masker box --captioner none (64x64 PNGs)",
                ["executor", "images", "objects", "seconds", "s/1k images", "marginal s/1k",
                 "per-image vs smallest", "driver peak RSS MB", "RSS vs smallest",
                 "tree peak RSS MB"], rows)
    config = {"sizes": sizes, "executors": executors, "ray_max": ray_max,
              "unit_size": args.unit_size, "image_size": 64, "boxes_per_image": "1-3"}
    write_results("scale", args, config, {"runs": results})


if __name__ == "__main__":
    main()
