"""Shards -> other formats. EXPORTERS maps each `engine export --format` name to a function
`export(run, dest, where) -> counts` (run: schemas.runs.Run; where: one SQL condition on objects,
checked by `export_select.open_selection`, through which every exporter selects). This module
holds the COCO exporter; other formats live in their own modules, listed in EXPORTERS at the
bottom.

COCO: instances with RLE segmentation, streamed from DuckDB in batches and written incrementally
(a large run is never held in memory), to a temporary file renamed into place. Ids are the source's,
so the file lines up with the user's original annotation file (COCOeval, loadRes) with no
remapping:

- image `id` = images.source_image_id, annotation `id` = objects.source_ann_id, category `id` =
  objects.source_category_id, when those are integers, unique (one category id per name); otherwise
  that kind of id is renumbered 1..N in engine order and the file's `info.ids` says which and why.
  The engine's own ids travel as `mq_image_id` / `mq_object_id` either way.
- `score` = the masker's predicted IoU (`pred_iou`, SAM family) where it has one, else `box_iou`
  (IoU of the mask's tight box with the prompt box, which every mask has, ground truth included).
  One rule for every row, so results of different maskers rank on a scale they share.
- provenance (`mask_origin`, `status`), the scores and the captions are extra annotation keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from pipelines.export_hf import export_hf
from pipelines.export_sa1b import export_sa1b
from pipelines.export_select import open_selection
from pipelines.export_yolo_seg import export_yolo_seg
from schemas import SCHEMA_VERSION
from schemas.runs import Run

BATCH = 10_000


# A source id is kept when it is an integer written plainly ("42", not "042" or "a7").
_PLAIN_INT = "CAST(TRY_CAST(src AS BIGINT) AS VARCHAR) IS NOT DISTINCT FROM src AND src IS NOT NULL"


def _id_table(con, name: str, query: str, order: str, refuse: str | None = None,
              keep: str = "the engine's ids are in the mq_* keys") -> str:
    """Temp table `name(key, coco_id)` from `query` (columns key, src): the source ids when all are
    plain integers and unique (and `refuse` gives no reason not to), else 1..N by `order`.
    Returns what was done, for the file's `info`."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE {name}_src AS {query}")
    n, ints, distinct = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE {_PLAIN_INT}), count(DISTINCT src) "
        f"FROM {name}_src"
    ).fetchone()
    why = refuse or ("not all integers" if ints < n else "not unique" if distinct < n else None)
    if why is None:
        con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS "
                    f"SELECT key, CAST(src AS BIGINT) AS coco_id FROM {name}_src")
        return "source"
    con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS "
                f"SELECT key, row_number() OVER (ORDER BY {order}) AS coco_id FROM {name}_src")
    return f"renumbered 1..{n} in engine order (the source's ids are {why}; {keep})"


def _id_tables(con) -> dict[str, str]:
    """The id maps img_ids, ann_ids, cat_ids of the selection; what each did, for `info`."""
    images = _id_table(
        con, "img_ids",
        "SELECT image_id AS key, source_image_id AS src FROM images "
        "WHERE image_id IN (SELECT image_id FROM sel)",
        "key",
    )
    annotations = _id_table(
        con, "ann_ids",
        "SELECT object_id AS key, source_ann_id AS src, image_id FROM sel WHERE mask IS NOT NULL",
        "image_id, key",
    )
    # every category of the run (not only the selected ones), so category ids do not depend on
    # --where; kept only when each category has one id and each id one category
    con.execute(
        "CREATE OR REPLACE TEMP TABLE cat_pairs AS SELECT category AS key, "
        "CAST(source_category_id AS VARCHAR) AS src, "
        "coalesce(source_category_name, category) AS name FROM objects "
        "WHERE category IS NOT NULL GROUP BY ALL"
    )
    one_to_one = con.execute(
        "SELECT count(DISTINCT key) = count(*) AND count(DISTINCT src) = count(*) FROM cat_pairs"
    ).fetchone()[0]
    categories = _id_table(
        con, "cat_ids", "SELECT DISTINCT key, src FROM cat_pairs", "key",
        refuse=None if one_to_one else "not one id per category", keep="names as in the run",
    )
    return {"images": images, "annotations": annotations, "categories": categories}


def _check_categories(con) -> None:
    """A COCO annotation needs a category: refuse (rather than drop) a masked one without."""
    row = con.execute(
        "SELECT object_id FROM sel WHERE mask IS NOT NULL AND category IS NULL LIMIT 1"
    ).fetchone()
    if row is not None:
        raise ValueError(f"object {row[0]!r} has a mask but no category; COCO cannot hold it "
                         "(add 'AND category IS NOT NULL' to --where to leave such objects out)")


def export_coco(run: Run, dest: Path, where: str | None = "keep") -> dict:
    """Write the objects of `run` selected by `where` (default: kept ones) as COCO JSON to `dest`;
    return the counts of images, annotations and categories. Ids and `score`: see the module
    docstring."""
    con = open_selection(run, where, materialize=True)
    _check_categories(con)
    ids = _id_tables(con)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    info = {
        "description": "COCO export of mqengine shards",
        "schema_version": SCHEMA_VERSION,
        "run_id": run.run_id,
        "where": where,
        "ids": ids,
        "score": "pred_iou where the masker predicts one, else box_iou",
    }
    counts = {"images": 0, "annotations": 0, "categories": 0}
    try:
        with open(tmp, "w") as f:
            f.write('{"info": ')
            json.dump(info, f)
            _write_categories(con, f, counts)
            _write_images(con, f, counts)
            _write_annotations(con, f, counts)
            f.write("}\n")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return counts


def _write_categories(con, f, counts: dict) -> None:
    rows = con.execute(
        "SELECT c.coco_id, any_value(p.name ORDER BY p.name) FROM cat_ids c "
        "JOIN cat_pairs p USING (key) GROUP BY 1 ORDER BY 1"
    ).fetchall()
    f.write(', "categories": ')
    json.dump([{"id": i, "name": name} for i, name in rows], f)
    counts["categories"] = len(rows)


def _write_images(con, f, counts: dict) -> None:
    f.write(', "images": [')
    cursor = con.execute(
        "SELECT m.coco_id, i.image_id, i.file_path, i.width, i.height FROM images i "
        "JOIN img_ids m ON m.key = i.image_id ORDER BY m.coco_id"
    )
    while rows := cursor.fetchmany(BATCH):
        for coco_id, image_id, path, width, height in rows:
            f.write("," if counts["images"] else "")
            record = {"id": coco_id, "file_name": path, "width": width, "height": height,
                      "mq_image_id": image_id}
            json.dump(record, f)
            counts["images"] += 1
    f.write("]")


ANNOTATION_COLUMNS = (
    "a.coco_id AS id, i.coco_id AS image_id, c.coco_id AS category_id, s.box AS bbox, "
    "s.mask_area AS area, s.iscrowd, s.mask, s.object_id AS mq_object_id, s.mask_origin, "
    "coalesce(s.pred_iou, s.box_iou) AS score, s.pred_iou, s.stability, s.box_iou, s.status, "
    "s.captions"
)


def _write_annotations(con, f, counts: dict) -> None:
    f.write(', "annotations": [')
    cursor = con.execute(
        f"SELECT {ANNOTATION_COLUMNS} FROM sel s JOIN ann_ids a ON a.key = s.object_id "
        "JOIN img_ids i ON i.key = s.image_id JOIN cat_ids c ON c.key = s.category "
        "ORDER BY s.image_id, s.object_id"
    )
    names = [d[0] for d in cursor.description]
    while rows := cursor.fetchmany(BATCH):
        for row in rows:
            ann = dict(zip(names, row, strict=True))
            mask = ann.pop("mask")
            ann["iscrowd"] = int(ann["iscrowd"])
            ann["segmentation"] = {"size": [mask["height"], mask["width"]],
                                   "counts": mask["counts"]}
            f.write("," if counts["annotations"] else "")
            json.dump(ann, f)
            counts["annotations"] += 1
    f.write("]")


# --format name -> export_X(run: schemas.runs.Run, dest: Path, where: str | None) -> counts
EXPORTERS: dict[str, Callable[[Run, Path, str | None], dict]] = {
    "coco": export_coco, "hf": export_hf, "yolo-seg": export_yolo_seg, "sa1b": export_sa1b}
