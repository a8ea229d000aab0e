"""Storage: bytes per object of the Parquet shards vs the same annotations as COCO JSON with RLE.

The shards come from a real run (`grabcut` masker, `template` captioner, local executor) over
generated 320x240 scenes. The baseline is the COCO JSON that `engine export --format coco` writes
from that run (pipelines/export.py, every object with a mask): images, annotations with
`segmentation` RLE counts as strings, bbox, area, category, plus provenance, scores and captions
as extra keys. Also shown: the same JSON gzip-compressed (level 6), a fairer
"compressed JSON" baseline. Goal: Parquet <= 0.5x the JSON.

Self-checks: the JSON holds one annotation per object row, pycocotools loads it, and its masks
decode to the same pixels as the shards'.

    .venv/bin/python bench/storage.py [--quick]
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import _data
import numpy as np
import pyarrow.parquet as pq
from _common import check, console, parser, print_table, timed, write_results
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipelines.captioners import CaptionerConfig
from pipelines.export import export_coco
from pipelines.maskers import MaskerConfig
from pipelines.shards import ROW_GROUP_ROWS
from pipelines.sources import SourceConfig
from pipelines.synthesize import SynthesizeConfig, run
from schemas.runs import open_run


def listed_rows(run, table: str) -> int:
    """Rows of the part files of `table` the run lists."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in run.files(table))


def listed_bytes(run, table: str) -> int:
    """Bytes of the part files of `table` the run lists."""
    return sum(Path(p).stat().st_size for p in run.files(table))


def check_same_masks(run, coco: COCO, n_objects: int) -> None:
    """The JSON's masks decode to the shards' masks (first objects part, every object)."""
    table = pq.read_table(run.files("objects")[0], columns=["object_id", "mask"]).to_pylist()
    by_object = {a["mq_object_id"]: a for a in coco.dataset["annotations"]}
    check(len(coco.dataset["annotations"]) == n_objects,
          f"COCO JSON has {len(coco.dataset['annotations'])} annotations, shards {n_objects}")
    for row in table:
        if row["mask"] is None:
            continue
        ann = by_object[row["object_id"]]
        m = row["mask"]
        a = mask_utils.decode({"size": [m["height"], m["width"]], "counts": m["counts"].encode()})
        b = coco.annToMask(ann)
        check(np.array_equal(a, b), f"{row['object_id']}: JSON mask differs from the shard's")


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, help="generated scenes (150; quick 30)")
    args = p.parse_args()
    n_scenes = args.scenes or (30 if args.quick else 150)
    ann = _data.scenes(args.data_dir, n_scenes)
    out = args.data_dir / f"storage-out-{n_scenes}"
    cfg = SynthesizeConfig(source=SourceConfig("coco", ann.parent, ann, "scenes"), out=out,
                           masker=MaskerConfig(name="grabcut"),
                           captioner=CaptionerConfig(name="template"), unit_size=16,
                           executor="local")
    console.print(f"synthesizing {n_scenes} scenes with grabcut (resumes a cached run) ...")
    t_run, summary = timed(lambda: run(cfg))
    n_obj = summary.totals["objects"]
    shards = open_run(out)
    check(n_obj > 0 and n_obj == listed_rows(shards, "objects"), "objects rows do not add up")

    json_path = args.data_dir / f"storage-coco-{n_scenes}.json"
    t_json, info = timed(lambda: export_coco(shards, json_path, where="mask IS NOT NULL"))
    info["bytes"] = json_path.stat().st_size
    gz_path = json_path.with_suffix(".json.gz")
    with open(json_path, "rb") as src, gzip.open(gz_path, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
    coco = COCO(str(json_path))
    check_same_masks(shards, coco, info["annotations"])
    # Each unit is its own file with its own footer (schema, statistics): at a few dozen objects
    # per file that is a visible share. One file of all rows shows the size without it.
    compact = args.data_dir / f"storage-compact-{n_scenes}.parquet"
    pq.write_table(pq.read_table(shards.files("objects")), compact, compression="zstd",
                   row_group_size=ROW_GROUP_ROWS)

    sizes = {
        "parquet objects": listed_bytes(shards, "objects"),
        "parquet images + objects": listed_bytes(shards, "images")
        + listed_bytes(shards, "objects"),
        "parquet objects, compacted to 1 file": compact.stat().st_size,
        "COCO JSON (RLE strings)": info["bytes"],
        "COCO JSON, gzip -6": gz_path.stat().st_size,
    }
    base = sizes["COCO JSON (RLE strings)"]
    rows = [[k, v, v / n_obj, v / base] for k, v in sizes.items()]
    print_table(f"{n_obj} objects in {info['images']} images (grabcut masks, template captions)",
                ["format", "bytes", "bytes/object", "vs COCO JSON"], rows)
    ratio = sizes["parquet images + objects"] / base
    vs_gzip = sizes["parquet images + objects"] / sizes["COCO JSON, gzip -6"]
    console.print(f"parquet / COCO JSON = {ratio:.3f} (goal <= 0.5); vs gzip JSON {vs_gzip:.3f}")
    results = {"objects": n_obj, "images": info["images"], "bytes": sizes,
               "bytes_per_object": {k: v / n_obj for k, v in sizes.items()},
               "ratio_parquet_vs_json": ratio,
               "ratio_parquet_vs_json_gzip": vs_gzip,
               "objects_per_file": n_obj / summary.units_total,
               "goal_ratio": 0.5, "synthesize_s": t_run, "write_json_s": t_json}
    config = {"scenes": n_scenes, "scene_size": "320x240", "masker": "grabcut",
              "captioner": "template", "unit_size": 16, "parquet_compression": "zstd"}
    write_results("storage", args, config, results)


if __name__ == "__main__":
    main()
