"""Shards -> COCO-format JSON (instances with RLE segmentation), for tools that only read COCO.

Streams rows from DuckDB in batches and writes the JSON incrementally, so exporting a large run does
not hold it in memory. Ids are renumbered to the integers COCO tools expect; the engine's ids are
kept in `mq_image_id` / `mq_object_id`, and provenance, scores and captions travel as extra
annotation keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb

BATCH = 10_000


def _where(where: str | None) -> str:
    return f"WHERE {where}" if where else ""


def export_coco(con: duckdb.DuckDBPyConnection, dest: Path, where: str | None = "keep") -> dict:
    """Write the objects selected by SQL `where` (default: kept ones) as COCO JSON to `dest`.

    `con` has the views `images` and `objects` of an output folder (engine.query.connect)."""
    try:
        con.execute(f"CREATE TEMP TABLE sel AS SELECT * FROM objects {_where(where)}")
    except duckdb.Error as exc:
        raise ValueError(
            f"--where {where!r} is not a valid SQL condition on objects: {exc}"
        ) from exc
    cats = [
        r[0]
        for r in con.execute(
            "SELECT DISTINCT category FROM sel WHERE category IS NOT NULL ORDER BY 1"
        ).fetchall()
    ]
    cat_ids = {name: i + 1 for i, name in enumerate(cats)}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    counts = {"images": 0, "annotations": 0, "categories": len(cats)}
    with open(tmp, "w") as f:
        f.write('{"categories": ')
        json.dump([{"id": i, "name": n} for n, i in cat_ids.items()], f)
        image_ids = _write_images(con, f, counts)
        _write_annotations(con, f, image_ids, cat_ids, counts)
        f.write("}\n")
    os.replace(tmp, dest)
    return counts


def _write_images(con, f, counts: dict) -> dict[str, int]:
    f.write(', "images": [')
    image_ids: dict[str, int] = {}
    cursor = con.execute(
        "SELECT image_id, file_path, width, height FROM images WHERE image_id IN "
        "(SELECT image_id FROM sel) ORDER BY image_id"
    )
    while rows := cursor.fetchmany(BATCH):
        for image_id, path, width, height in rows:
            image_ids[image_id] = len(image_ids) + 1
            f.write("," if counts["images"] else "")
            json.dump(
                {
                    "id": image_ids[image_id],
                    "file_name": path,
                    "width": width,
                    "height": height,
                    "mq_image_id": image_id,
                },
                f,
            )
            counts["images"] += 1
    f.write("]")
    return image_ids


def _write_annotations(con, f, image_ids: dict, cat_ids: dict, counts: dict) -> None:
    f.write(', "annotations": [')
    cursor = con.execute(
        "SELECT object_id, image_id, category, box, mask, mask_area, iscrowd, mask_origin, "
        "pred_iou, stability, box_iou, status, captions FROM sel WHERE mask IS NOT NULL "
        "ORDER BY image_id, object_id"
    )
    while rows := cursor.fetchmany(BATCH):
        for (
            object_id,
            image_id,
            category,
            box,
            mask,
            area,
            iscrowd,
            origin,
            pred_iou,
            stability,
            box_iou,
            status,
            captions,
        ) in rows:
            counts["annotations"] += 1
            f.write("," if counts["annotations"] > 1 else "")
            json.dump(
                {
                    "id": counts["annotations"],
                    "image_id": image_ids[image_id],
                    "category_id": cat_ids[category],
                    "bbox": box,
                    "area": area,
                    "iscrowd": int(iscrowd),
                    "segmentation": {
                        "size": [mask["height"], mask["width"]],
                        "counts": mask["counts"],
                    },
                    "mq_object_id": object_id,
                    "mask_origin": origin,
                    "pred_iou": pred_iou,
                    "stability": stability,
                    "box_iou": box_iou,
                    "status": status,
                    "captions": captions,
                },
                f,
            )
    f.write("]")


def _exporters() -> dict:
    # kept apart from export_coco above, which takes a connection rather than a Run
    from pipelines.export_hf import export_hf
    from pipelines.export_sa1b import export_sa1b
    from pipelines.export_yolo_seg import export_yolo_seg

    return {"hf": export_hf, "yolo-seg": export_yolo_seg, "sa1b": export_sa1b}


# --format name -> export_X(run: schemas.runs.Run, dest: Path, where: str | None) -> counts
EXPORTERS = _exporters()
