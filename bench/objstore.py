"""Object storage: `engine synthesize` to a local path vs `file://` vs S3 (moto on loopback).

The same run (`--masker box --captioner none`, local executor, 64x64 generated images, unit 64)
is written three ways; each is timed end to end (median of `--repeats` fresh runs, interleaved,
after one warm-up run) and read back
with `engine stats` (DuckDB; through pyarrow.fs for the URIs). Reported: annotation objects/s of
the run, storage objects written per second (parts + commit objects + manifest), stats time, and
the ratio of each to the local path, measured in the same run. moto is an in-process Python
server: its S3 figure bounds the engine's protocol cost, it is not a real S3 latency. The local path
also writes the dataset card and stats.json (a URI run does not), inside its timed run.

Self-checks: every run has the same rows (the sorted objects table equals the local run's).

    .venv/bin/python bench/objstore.py [--quick]
"""

from __future__ import annotations

import os
import shutil
import statistics
import time

import _data
import boto3
from _common import check, console, parser, print_table, timed, write_results
from moto.server import ThreadedMotoServer

from engine.query import run_query, stats
from pipelines.captioners import CaptionerConfig
from pipelines.maskers import MaskerConfig
from pipelines.sources import SourceConfig
from pipelines.synthesize import SynthesizeConfig, run
from schemas.runs import open_run

SQL = "SELECT object_id, image_id, status, box_iou FROM objects ORDER BY object_id"


def start_moto() -> tuple[ThreadedMotoServer, str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint,
                      AWS_EC2_METADATA_DISABLED="true")
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="mqengine-bench")
    return server, endpoint


def storage_objects(out) -> int:
    """Objects the run wrote: both parts per unit, the commit objects (URIs) and the manifest."""
    units = len(open_run(out).manifest["units"])
    return units * 2 + (units if "://" in str(out) else 0) + 1


def one_run(ann, out, clear) -> tuple[float, float, int]:
    clear()
    cfg = SynthesizeConfig(source=SourceConfig("coco", ann.parent, ann, "bench"), out=out,
                           masker=MaskerConfig(name="box"), captioner=CaptionerConfig(name="none"),
                           unit_size=64, executor="local")
    wall, summary = timed(lambda: run(cfg))
    read_s, _ = timed(lambda: stats(out))
    return wall, read_s, summary.totals["objects"]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, help="generated images (2000; quick 500)")
    p.add_argument("--repeats", type=int, help="fresh runs per target (3; quick 2)")
    args = p.parse_args()
    n = args.images or (500 if args.quick else 2000)
    repeats = args.repeats or (2 if args.quick else 3)
    ann = _data.small_images(args.data_dir, n, procs=1)
    server, endpoint = start_moto()
    local = args.data_dir / "objstore-local"
    s3 = boto3.resource("s3", endpoint_url=endpoint).Bucket("mqengine-bench")
    targets = {
        "local path": (local, lambda: shutil.rmtree(local, ignore_errors=True)),
        "file://": (f"file://{args.data_dir}/objstore-uri",
                    lambda: shutil.rmtree(args.data_dir / "objstore-uri", ignore_errors=True)),
        "s3 (moto, loopback)": ("s3://mqengine-bench/run", lambda: s3.objects.all().delete()),
    }
    results, reference = {}, None
    timings: dict[str, list] = {name: [] for name in targets}
    try:
        one_run(ann, local, targets["local path"][1])  # warm-up: imports, caches, first plan
        for _ in range(repeats):  # interleaved, so a neighbour's burst hits every target alike
            for name, (out, clear) in targets.items():
                timings[name].append(one_run(ann, out, clear))
        for name, (out, _) in targets.items():
            runs = timings[name]
            wall = statistics.median(r[0] for r in runs)
            read_s = statistics.median(r[1] for r in runs)
            rows = run_query(out, SQL)[1]
            reference = reference if reference is not None else rows
            check(rows == reference, f"{name}: rows differ from the local run's")
            n_objects = runs[0][2]
            results[name] = {"wall_s": wall, "wall_s_all": [r[0] for r in runs],
                             "objects": n_objects, "objects_per_s": n_objects / wall,
                             "storage_objects": storage_objects(out),
                             "storage_objects_per_s": storage_objects(out) / wall,
                             "stats_s": read_s}
    finally:
        server.stop()
    base = results["local path"]
    rows = [[name, r["wall_s"], r["objects_per_s"], r["storage_objects"],
             r["storage_objects_per_s"], r["stats_s"], r["wall_s"] / base["wall_s"],
             r["stats_s"] / base["stats_s"]] for name, r in results.items()]
    print_table(f"engine synthesize, {n} images (box + none, unit 64, local executor), "
                f"median of {repeats}",
                ["--out", "run s", "annotation objects/s", "storage objects", "storage objects/s",
                 "stats s", "run / local", "stats / local"], rows)
    console.print(f"load average {os.getloadavg()[0]:.2f} at the end; {time.strftime('%H:%M')}")
    write_results("objstore", args, {"images": n, "repeats": repeats, "unit_size": 64}, results)


if __name__ == "__main__":
    main()
