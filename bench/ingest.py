"""Ingest: peak memory of reading a large Objects365-layout annotation file, streamed vs json.load.

The file (>= 1M boxes; quick: 200k) is written by
`pipelines.sources.fixtures.write_objects365_fixture` (v2 layout: images, then annotations,
categories last). Two subprocesses, each measured alone:
- the `objects365` source's `records()`: ijson stream -> Parquet index -> DuckDB grouping by
  image -> one ImageRecord at a time (every record and object is built and counted, then dropped);
- the baseline: `json.load` of the file (and nothing else: it is the first step of any reader that
  loads the document whole).
Reported: wall seconds, boxes/s, the kernel's peak RSS of each process, and the RSS ratio; also the
peak RSS of a process that only imports the source (DuckDB, pyarrow, ijson): its fixed floor.

Self-check: the source yields every image and every box of the file.

    .venv/bin/python bench/ingest.py [--quick]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def source_side(path: Path) -> dict:
    from pipelines.sources.objects365 import Objects365Source

    t0 = time.perf_counter()
    source = Objects365Source("train", path.parent, path, version=2)
    images = boxes = with_error = 0
    for record in source.records():
        images += 1
        boxes += len(record.objects)
        with_error += sum(o.error is not None for o in record.objects)
    return {"seconds": time.perf_counter() - t0, "images": images, "boxes": boxes,
            "boxes_with_error": with_error}


def json_side(path: Path) -> dict:
    t0 = time.perf_counter()
    with open(path) as f:
        data = json.load(f)
    return {"seconds": time.perf_counter() - t0, "images": len(data["images"]),
            "boxes": len(data["annotations"])}


def imports_side(path: Path) -> dict:
    """The source's fixed floor: its imports (DuckDB, pyarrow, ijson) and nothing read."""
    from pipelines.sources.objects365 import Objects365Source  # noqa: F401
    from pipelines.sources.stream import build_index  # noqa: F401

    return {"seconds": 0.0, "images": None, "boxes": None}


SIDES = {"source": source_side, "json": json_side, "imports": imports_side}


def main() -> None:
    import _data  # noqa: F401  (puts the repo on the path the same way as the other benches)
    from _common import check, console, measure, parser, print_table, write_results

    from pipelines.sources.fixtures import write_objects365_fixture

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, help="images in the file (100,000; quick 20,000)")
    p.add_argument("--boxes-per-image", type=int, default=10)
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

    results = {}
    for side in ("imports", "source", "json"):
        console.print(f"{side} ...")
        m = measure([sys.executable, __file__, "--side", side, str(path)])
        line = [ln for ln in m["output"].splitlines() if ln.startswith("@@RESULT ")]
        check(bool(line), f"{side}: no result line; output:\n{m['output'][-3000:]}")
        r = json.loads(line[-1].split(" ", 1)[1])
        if side == "imports":
            results[side] = {"peak_rss_mb": m["peak_rss_mb"]}
            continue
        check(r["images"] == info["n_images"] and r["boxes"] == info["n_boxes"],
              f"{side}: read {r['images']} images / {r['boxes']} boxes, the file has "
              f"{info['n_images']} / {info['n_boxes']}")
        results[side] = {**r, "peak_rss_mb": m["peak_rss_mb"], "process_wall_s": m["wall_s"],
                         "boxes_per_s": r["boxes"] / r["seconds"]}

    s, j = results["source"], results["json"]
    file_mb = info["bytes"] / 2**20
    print_table(f"{info['n_boxes']:,} boxes in {info['n_images']:,} images, {file_mb:.0f} MB file",
                ["reader", "seconds", "boxes/s", "peak RSS MB", "RSS vs json.load"],
                [["objects365 source records() (streamed)", s["seconds"], s["boxes_per_s"],
                  s["peak_rss_mb"], s["peak_rss_mb"] / j["peak_rss_mb"]],
                 ["json.load (baseline)", j["seconds"], j["boxes_per_s"], j["peak_rss_mb"], 1.0],
                 ["(source's imports only, nothing read)", None, None,
                  results["imports"]["peak_rss_mb"], None]])
    results.update(file_bytes=info["bytes"], boxes=info["n_boxes"], images=info["n_images"],
                   rss_ratio_source_vs_json=s["peak_rss_mb"] / j["peak_rss_mb"])
    config = {"images": n_images, "boxes_per_image": args.boxes_per_image, "version": 2,
              "fixture": "pipelines.sources.fixtures.write_objects365_fixture(seed=0)"}
    write_results("ingest", args, config, results)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--side":
        print("@@RESULT " + json.dumps(SIDES[sys.argv[2]](Path(sys.argv[3]))), flush=True)
    else:
        main()
