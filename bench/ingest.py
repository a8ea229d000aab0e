"""Ingest: time and peak memory of reading a large Objects365-layout annotation file, by variant.

The file (>= 1M boxes; quick: 200k) is written by
`pipelines.sources.fixtures.write_objects365_fixture` (v2 layout: images, then annotations,
categories last). Each variant runs in its own subprocess, measured alone (wall seconds inside
the process, kernel peak RSS of the process):
- `json.load` of the file (the baseline: the first step of any reader that loads it whole);
- ijson `items` with the C backend `yajl2_c` and `use_float=True`, one pass per top-level key
  (categories, images, annotations: what the reader did before), parse only;
- `scan`: the engine's one-pass reader (Python's C JSON scanner, element by element), parse only;
- DuckDB `read_json` of the whole document (one JSON object: DuckDB parses it as one value), with
  a 1 GB memory limit, counting the annotations;
- the engine's `build_index` (scan + Arrow columns; the annotations being grouped by image in
  `images` order, they are written into the index during the scan): all that planning a run
  costs (the plan itself is one row per unit);
- the same with the sort-free paths switched off: the raw Parquet files and the DuckDB sort an
  out-of-order file takes;
- `build_index` + every ImageRecord built from the index (`records()`, what a consumer of the
  whole file gets; a run builds them unit by unit in its workers instead).
Also: the peak RSS of a process that only imports the source (DuckDB, pyarrow, ijson): its fixed
floor; the data-dependent memory of a variant is its peak minus its floor (json.load's floor is
the bare interpreter's, measured too).

Self-check: every variant counts every image and box of the file.

    .venv/bin/python bench/ingest.py [--quick] [--repeat 3] [--variants json,scan,index]
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _counts(images: int, boxes: int, t0: float, **extra) -> dict:
    return {"seconds": time.perf_counter() - t0, "images": images, "boxes": boxes, **extra}


def json_side(path: Path) -> dict:
    t0 = time.perf_counter()
    with open(path) as f:
        data = json.load(f)
    return _counts(len(data["images"]), len(data["annotations"]), t0)


def ijson_side(path: Path) -> dict:
    import ijson

    backend = ijson.get_backend("yajl2_c")
    t0 = time.perf_counter()
    n = {}
    for prefix in ("categories", "images.item", "annotations.item"):
        with open(path, "rb") as f:
            n[prefix] = sum(1 for _ in backend.items(f, prefix, use_float=True))
    return _counts(n["images.item"], n["annotations.item"], t0)


def scan_side(path: Path) -> dict:
    from pipelines.sources.scan import paused_gc, scan

    t0 = time.perf_counter()
    n = {"images": 0, "annotations": 0}

    def count(name):
        def add(items, start):
            n[name] += len(items)
        return add

    with paused_gc():
        scan(path, {k: count(k) for k in n}, ("categories",), 8192)
    return _counts(n["images"], n["annotations"], t0)


def duckdb_side(path: Path) -> dict:
    import duckdb

    con = duckdb.connect()
    con.execute("SET memory_limit='1GB'")
    con.execute(f"SET temp_directory='{tempfile.mkdtemp()}'")
    t0 = time.perf_counter()
    try:
        (images, boxes), = con.execute(
            "SELECT len(images), len(annotations) FROM read_json(?, format='unstructured', "
            "records=true, maximum_object_size=?)", [str(path), path.stat().st_size + 1]
        ).fetchall()
    except duckdb.Error as e:
        return _counts(None, None, t0, failed=str(e).splitlines()[0][:160])
    return _counts(images, boxes, t0)


def _index(path: Path, folder: Path, force_sort: bool = False):
    from pipelines.sources import sortfree, stream
    from pipelines.sources.objects365 import Objects365Source

    phases = {}

    def timed(name, real, path_name):  # the time after the scan, and which path wrote the index
        def run(*args):
            t = time.perf_counter()
            phases.setdefault("scan_s", t - t0)
            out = real(*args)
            phases[f"{name}_s"] = time.perf_counter() - t
            if out is not False and "path" not in phases:
                phases["path"] = path_name
            return out
        return run

    if force_sort:
        stream.STREAM_IN_ORDER = False
        sortfree.write_in_order = lambda folder: False
    sortfree.AnnSink.finish = timed("finish", sortfree.AnnSink.finish, "sort-free, during the scan")
    sortfree.write_in_order = timed("order", sortfree.write_in_order, "sort-free, after the scan")
    stream._group = timed("sort", stream._group, "duckdb sort")
    t0 = time.perf_counter()
    source = Objects365Source("train", path.parent, path, version=2)
    source.cache_dir = folder
    index = source.index()
    return source, index, phases, t0


def index_side(path: Path, force_sort: bool = False) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    try:
        _, index, phases, t0 = _index(path, folder, force_sort)
        return _counts(index.n_images, index.n_annotations, t0, **phases,
                       memory_limit=_limit(path))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def index_sort_side(path: Path) -> dict:
    """build_index with the sort-free path switched off: the DuckDB sort, as before."""
    return index_side(path, force_sort=True)


def records_side(path: Path) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    try:
        source, index, phases, t0 = _index(path, folder)
        index_s = time.perf_counter() - t0
        images = boxes = with_error = 0
        for record in source.records():
            images += 1
            boxes += len(record.objects)
            with_error += sum(o.error is not None for o in record.objects)
        return _counts(images, boxes, t0, **phases, index_s=index_s, boxes_with_error=with_error)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _limit(path: Path) -> str:
    from pipelines.sources.coco import sort_memory

    return sort_memory(path.stat().st_size)


def imports_side(path: Path) -> dict:
    """The source's fixed floor: its imports (DuckDB, pyarrow, ijson) and nothing read."""
    from pipelines.sources.objects365 import Objects365Source  # noqa: F401
    from pipelines.sources.stream import build_index  # noqa: F401

    return {"seconds": 0.0, "images": None, "boxes": None}


def bare_side(path: Path) -> dict:
    """The bare interpreter: json.load's floor."""
    return {"seconds": 0.0, "images": None, "boxes": None}


SIDES = {"json": json_side, "ijson": ijson_side, "scan": scan_side, "duckdb": duckdb_side,
         "index": index_side, "index_sort": index_sort_side, "records": records_side,
         "imports": imports_side, "bare": bare_side}
LABELS = {
    "json": "json.load (baseline)",
    "ijson": "ijson yajl2_c items, 3 passes (the old reader's parse)",
    "scan": "scan: one pass, C json scanner (parse only)",
    "duckdb": "DuckDB read_json of the document (1 GB limit)",
    "index_sort": "engine build_index, DuckDB sort forced (the path before; out-of-order files)",
    "index": "engine build_index (scan + columns + sort-free write in the scan) = planning",
    "records": "engine build_index + records() (every ImageRecord)",
}
FLOORS = {"json": "bare", "ijson": "bare", "scan": "bare", "duckdb": "imports",
          "index": "imports", "index_sort": "imports", "records": "imports"}


def _round(path: Path, info: dict, sides: list[str]) -> dict:
    """Every variant once, each in its own subprocess, one after the other."""
    from _common import check, console, measure

    out: dict = {}
    for side in ("bare", "imports", *sides):
        console.print(f"{side} ...")
        m = measure([sys.executable, __file__, "--side", side, str(path)])
        line = [ln for ln in m["output"].splitlines() if ln.startswith("@@RESULT ")]
        check(bool(line), f"{side}: no result line; output:\n{m['output'][-3000:]}")
        r = json.loads(line[-1].split(" ", 1)[1])
        if side in ("bare", "imports"):
            out[side] = {"peak_rss_mb": m["peak_rss_mb"]}
            continue
        if "failed" not in r:
            check(r["images"] == info["n_images"] and r["boxes"] == info["n_boxes"],
                  f"{side}: read {r['images']} images / {r['boxes']} boxes, the file has "
                  f"{info['n_images']} / {info['n_boxes']}")
        out[side] = {**r, "peak_rss_mb": m["peak_rss_mb"], "process_wall_s": m["wall_s"],
                     "cpu_s": m["cpu_s"],
                     "data_rss_mb": m["peak_rss_mb"] - out[FLOORS[side]]["peak_rss_mb"],
                     "boxes_per_s": info["n_boxes"] / r["seconds"]}
    return out


def _best(rounds: list[dict], sides: list[str]) -> dict:
    """Per variant: its fastest round (other jobs only ever add time), with every round's
    seconds; memory: the largest peak of any round."""
    best: dict = {}
    for side in ("bare", "imports", *sides):
        runs = [r[side] for r in rounds]
        top = dict(min(runs, key=lambda r: r.get("seconds", 0.0)))
        for key in ("peak_rss_mb", "data_rss_mb"):
            if key in top:
                top[key] = max(r[key] for r in runs)
        if "seconds" in top:
            top["seconds_by_round"] = [r["seconds"] for r in runs]
        best[side] = top
    return best


def main() -> None:
    import _data  # noqa: F401  (puts the repo on the path the same way as the other benches)
    from _common import check, console, parser, print_table, write_results

    from pipelines.sources.fixtures import write_objects365_fixture

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, help="images in the file (100,000; quick 20,000)")
    p.add_argument("--boxes-per-image", type=int, default=10)
    p.add_argument("--variants", default=",".join(LABELS), help="comma-separated subset")
    p.add_argument("--repeat", type=int, default=3,
                   help="rounds of every variant, interleaved (the box is shared: each variant's "
                        "fastest round is reported, and json.load's ratio in every round)")
    args = p.parse_args()
    n_images = args.images or (20_000 if args.quick else 100_000)
    folder = args.data_dir / f"objects365-{n_images}x{args.boxes_per_image}"
    path = folder / "zhiyuan_objv2_train.json"
    info_path = path.with_name("info.json")
    if not info_path.is_file():
        console.print(f"writing {path} ...")
        info = write_objects365_fixture(path, n_images, args.boxes_per_image, version=2, seed=0)
        info_path.write_text(json.dumps(info))
    info = json.loads(info_path.read_text())

    sides = args.variants.split(",")
    check("json" in sides, "--variants must include json (the baseline)")
    rounds = [_round(path, info, sides) for _ in range(args.repeat)]
    results = _best(rounds, sides)
    j = results["json"]
    rows = []
    for side, label in LABELS.items():
        if side not in results:
            continue
        r = results[side]
        r["time_vs_json"] = r["seconds"] / j["seconds"]
        r["cpu_vs_json"] = r["cpu_s"] / j["cpu_s"]
        r["data_rss_vs_json"] = r["data_rss_mb"] / j["data_rss_mb"]
        r["time_vs_json_by_round"] = [x[side]["seconds"] / x["json"]["seconds"] for x in rounds]
        rows.append([label + (f" FAILED: {r['failed']}" if "failed" in r else ""), r["seconds"],
                     r["cpu_s"], r["peak_rss_mb"], r["data_rss_mb"], r["time_vs_json"],
                     " ".join(f"{x:.2f}" for x in r["time_vs_json_by_round"]), r["cpu_vs_json"],
                     r["data_rss_vs_json"]])
    file_mb = info["bytes"] / 2**20
    print_table(f"{info['n_boxes']:,} boxes in {info['n_images']:,} images, {file_mb:.0f} MB file",
                ["variant", "best s", "CPU s", "peak RSS MB", "data RSS MB", "time vs json",
                 "by round", "CPU vs json", "data RSS vs json"], rows)
    results.update(file_bytes=info["bytes"], boxes=info["n_boxes"], images=info["n_images"])
    config = {"images": n_images, "boxes_per_image": args.boxes_per_image, "version": 2,
              "repeat": args.repeat,
              "fixture": "pipelines.sources.fixtures.write_objects365_fixture(seed=0)"}
    write_results("ingest", args, config, results)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--side":
        print("@@RESULT " + json.dumps(SIDES[sys.argv[2]](Path(sys.argv[3]))), flush=True)
    else:
        main()
