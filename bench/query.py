"""Query: DuckDB over the Parquet shards vs json.load + pandas over the same objects as COCO JSON.

Two questions, each side answering both from files on disk (reading included in the time):
- a category histogram: objects per category;
- a quality filter: objects per category `WHERE keep AND box_iou > 0.7`.
The shards (>= 1M objects; quick: 100k) are made directly with pyarrow in the schema's tables, with
realistic columns: a distinct RLE mask per object (random polygons at 640x480), 4 captions, a
Zipf-like spread over 365 categories (`_data.object_shards`). The COCO JSON holds the same rows.
Each side runs in its own subprocess (so its peak RSS is its own); DuckDB's time is the median of
--repeats runs in one process (connect + both queries each time), pandas' the median of its runs.

Self-check: both sides return identical histograms and filter counts.

    .venv/bin/python bench/query.py [--quick]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

HIST_SQL = "SELECT category, count(*) AS n FROM objects GROUP BY category ORDER BY category"
FILTER_SQL = ("SELECT category, count(*) AS n FROM objects WHERE keep AND box_iou > 0.7 "
              "GROUP BY category ORDER BY category")


def duckdb_side(out: Path) -> dict:
    from engine.query import connect

    t0 = time.perf_counter()
    con = connect(out)
    t1 = time.perf_counter()
    hist = con.execute(HIST_SQL).fetchall()
    t2 = time.perf_counter()
    filt = con.execute(FILTER_SQL).fetchall()
    t3 = time.perf_counter()
    con.close()
    return {"connect_s": t1 - t0, "histogram_s": t2 - t1, "filter_s": t3 - t2, "total_s": t3 - t0,
            "histogram": dict(hist), "filter": dict(filt)}


def pandas_side(out: Path) -> dict:
    import pandas as pd

    t0 = time.perf_counter()
    with open(out / "coco.json") as f:
        data = json.load(f)
    t1 = time.perf_counter()
    df = pd.DataFrame(data["annotations"])
    names = {c["id"]: c["name"] for c in data["categories"]}
    df["category"] = df["category_id"].map(names)
    t2 = time.perf_counter()
    hist = df.groupby("category").size()
    t3 = time.perf_counter()
    filt = df[df["keep"] & (df["box_iou"] > 0.7)].groupby("category").size()
    t4 = time.perf_counter()
    return {"json_load_s": t1 - t0, "dataframe_s": t2 - t1, "histogram_s": t3 - t2,
            "filter_s": t4 - t3, "total_s": t4 - t0,
            "histogram": {k: int(v) for k, v in hist.items()},
            "filter": {k: int(v) for k, v in filt.items()}}


SIDES = {"duckdb": duckdb_side, "pandas": pandas_side}


def side_main(side: str, out: Path, repeats: int) -> None:
    """Subprocess entry: run one side `repeats` times, print the median run as one JSON line."""
    runs = [SIDES[side](out) for _ in range(repeats)]
    med = statistics.median(r["total_s"] for r in runs)
    best = min(runs, key=lambda r: abs(r["total_s"] - med))
    print("@@RESULT " + json.dumps({**best, "runs_total_s": [r["total_s"] for r in runs]}))


def main() -> None:
    import _data
    from _common import check, console, du, measure, parser, print_table, write_results

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--objects", type=int, help="objects in the shards (1,000,000; quick 100,000)")
    p.add_argument("--repeats", type=int, default=5, help="DuckDB runs (median)")
    p.add_argument("--pandas-repeats", type=int, help="pandas runs (median; 2, quick 3)")
    args = p.parse_args()
    n_objects = args.objects or (100_000 if args.quick else 1_000_000)
    pandas_repeats = args.pandas_repeats or (3 if args.quick else 2)

    console.print(f"data: {n_objects} objects under {args.data_dir} (cached after the first run)")
    out, counts = _data.object_shards(args.data_dir, n_objects)
    check(_data.arrow_rows(out, "objects") == counts["objects"], "shard rows != generated objects")

    results = {}
    for side, repeats in (("duckdb", args.repeats), ("pandas", pandas_repeats)):
        console.print(f"{side}: {repeats} runs ...")
        m = measure([sys.executable, __file__, "--side", side, "--out", str(out),
                     "--repeats", str(repeats)])
        line = [ln for ln in m["output"].splitlines() if ln.startswith("@@RESULT ")]
        check(bool(line), f"{side}: no result line; output:\n{m['output'][-3000:]}")
        results[side] = {**json.loads(line[-1].split(" ", 1)[1]), "peak_rss_mb": m["peak_rss_mb"],
                         "process_wall_s": m["wall_s"]}

    d, pd_ = results["duckdb"], results["pandas"]
    check(d["histogram"] == pd_["histogram"], "histograms differ between DuckDB and pandas")
    check(d["filter"] == pd_["filter"], "filter counts differ between DuckDB and pandas")
    check(sum(d["histogram"].values()) == counts["objects"],
          "histogram does not sum to the objects")
    n_kept_hi = sum(d["filter"].values())
    check(0 < n_kept_hi < counts["objects"], "the filter selects none or all objects")

    sizes = {"parquet_bytes": du(out / "objects", "part-*.parquet"),
             "json_bytes": (out / "coco.json").stat().st_size}
    rows = [
        ["DuckDB on Parquet (connect + 2 queries)", d["total_s"], d["histogram_s"], d["filter_s"],
         d["peak_rss_mb"], sizes["parquet_bytes"] / 2**20, 1.0],
        ["json.load + pandas on COCO JSON", pd_["total_s"], pd_["histogram_s"], pd_["filter_s"],
         pd_["peak_rss_mb"], sizes["json_bytes"] / 2**20, pd_["total_s"] / d["total_s"]],
    ]
    print_table(f"{counts['objects']:,} objects, {len(d['histogram'])} categories; "
                f"filter keeps {n_kept_hi:,}",
                ["run", "total s", "histogram s", "filter s", "peak RSS MB", "input MB",
                 "time vs DuckDB"], rows)
    console.print(f"pandas: json.load {pd_['json_load_s']:.1f} s + DataFrame "
                  f"{pd_['dataframe_s']:.1f} s; DuckDB connect {d['connect_s'] * 1000:.0f} ms")
    for side in results.values():
        side.pop("histogram"), side.pop("filter")
    results.update(sizes, objects=counts["objects"], images=counts["images"],
                   shards=counts["shards"], filter_selected=n_kept_hi,
                   speedup_duckdb_vs_pandas=pd_["total_s"] / d["total_s"],
                   rss_ratio_pandas_vs_duckdb=pd_["peak_rss_mb"] / d["peak_rss_mb"])
    config = {"objects": n_objects, "duckdb_repeats": args.repeats,
              "pandas_repeats": pandas_repeats,
              "histogram_sql": HIST_SQL, "filter_sql": FILTER_SQL}
    write_results("query", args, config, results)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--side":
        side_main(sys.argv[2], Path(sys.argv[4]), int(sys.argv[6]))
    else:
        main()
