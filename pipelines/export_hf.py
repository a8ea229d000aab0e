"""Export as a Hugging Face `datasets.DatasetDict` folder (`save_to_disk`), one split per split
of the run, one row per image:

    image_id, source, file_name, width, height     the engine's image record
    image                                          datasets.Image(): the original file's bytes
    objects: list of
        object_id, category, category_id (index into the ClassLabel names in the features),
        bbox [x, y, w, h] (absolute pixels), area (mask pixels),
        mask {"size": [height, width], "counts": str}   COCO compressed RLE (pycocotools' format,
                                                        column-major): pycocotools.mask.decode(
                                                        {"size": m["size"], "counts":
                                                        m["counts"].encode()}) gives the HxW mask
        mask_origin, status, reject_code, box_iou, box_fill, n_components, pred_iou, stability,
        captions: list of {text, provenance, score}

The mask is an RLE struct rather than a PNG: it is what the run stores, it is exact, and it is
~50x smaller than a PNG per object. `datasets.load_from_disk(DEST)` reads it back.
Rows are generated image by image (Dataset.from_generator writes them to Arrow in batches), so
memory stays bounded; the generator's cache lives in a temporary folder beside DEST.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from pipelines.export_select import (
    categories,
    image_path,
    iter_images,
    open_selection,
    staging,
    write_receipt,
)
from schemas.runs import Run


def features(names: list[str]):
    from datasets import ClassLabel, Features, Image, List, Value

    caption = {"text": Value("string"), "provenance": Value("string"), "score": Value("float32")}
    obj = {
        "object_id": Value("string"),
        "category": Value("string"),
        "category_id": ClassLabel(names=names) if names else Value("int64"),
        "bbox": List(Value("float64"), length=4),
        "area": Value("int64"),
        "mask": {"size": List(Value("int32"), length=2), "counts": Value("string")},
        "mask_origin": Value("string"),
        "status": Value("string"),
        "reject_code": Value("string"),
        "box_iou": Value("float32"),
        "box_fill": Value("float32"),
        "n_components": Value("int32"),
        "pred_iou": Value("float32"),
        "stability": Value("float32"),
        "captions": List(caption),
    }
    return Features({
        "image_id": Value("string"),
        "source": Value("string"),
        "file_name": Value("string"),
        "width": Value("int32"),
        "height": Value("int32"),
        "image": Image(),
        "objects": List(obj),
    })


def export_hf(run: Run, dest: Path, where: str | None = None) -> dict:
    """Write the selected objects (default: kept) of `run` as a DatasetDict folder at `dest`."""
    con = open_selection(run, where)
    names = categories(con)
    splits = [r[0] for r in con.execute(
        "SELECT DISTINCT i.split FROM sel JOIN images i USING (image_id) ORDER BY 1").fetchall()]
    skipped = con.execute("SELECT count(*) FROM sel WHERE mask IS NULL").fetchone()[0]
    with staging(dest) as tmp:
        parts = _build(run, names, splits, where, tmp)
        counts = {"images": sum(len(d) for d in parts.values()),
                  "objects": sum(_n_objects(d) for d in parts.values()),
                  "skipped_no_mask": skipped, "categories": len(names), "splits": splits}
        write_receipt(tmp, "hf", run, where, counts)
    return counts


def _build(run: Run, names: list[str], splits: list[str], where, tmp: Path) -> dict:
    from datasets import Dataset, DatasetDict

    cache = Path(tempfile.mkdtemp(prefix=f"{tmp.name}.cache-", dir=tmp.parent))
    try:
        parts = {}
        for split in splits:
            # strings only: datasets hashes gen_kwargs (a connection does not pickle) and shards
            # every list in them across generator calls (a list of names would repeat images)
            kwargs = {"run_dir": str(run.dir), "root": str(run.root), "names": json.dumps(names),
                      "where": _in_split(where, split)}
            parts[split] = Dataset.from_generator(
                _rows, features=features(names), cache_dir=str(cache), gen_kwargs=kwargs
            )
        DatasetDict(parts).save_to_disk(str(tmp))
        # the saved copy is on disk: reopen it so the counts do not read the cache about to go
        parts = dict(DatasetDict.load_from_disk(str(tmp)))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return parts


def _n_objects(dataset) -> int:
    import pyarrow.compute as pc

    # from the memory-mapped Arrow column: no Python objects for a million rows
    return int(pc.sum(pc.list_value_length(dataset.data.column("objects"))).as_py() or 0)


def _in_split(where: str | None, split: str) -> str:
    quoted = split.replace("'", "''")
    return (f"({where or 'keep'}) AND image_id IN "
            f"(SELECT image_id FROM images WHERE split = '{quoted}')")


def _rows(run_dir: str, root: str, names: str, where: str):
    from schemas.runs import open_run

    run = open_run(Path(run_dir), root=Path(root))
    class_ids = {n: k for k, n in enumerate(json.loads(names))}
    for image, objects in iter_images(open_selection(run, where)):
        rows = [_object_row(o, class_ids) for o in objects if o["mask"] is not None]
        if not rows:
            continue
        data = image_path(run, image).read_bytes()
        yield {"image_id": image["image_id"], "source": image["source"],
               "file_name": image["file_path"], "width": image["width"],
               "height": image["height"], "image": {"bytes": data, "path": image["file_path"]},
               "objects": rows}


def _object_row(o: dict, class_ids: dict[str, int]) -> dict:
    m = o["mask"]
    return {
        "object_id": o["object_id"], "category": o["category"],
        "category_id": class_ids.get(o["category"]), "bbox": o["box"], "area": o["mask_area"],
        "mask": {"size": [m["height"], m["width"]], "counts": m["counts"]},
        "mask_origin": o["mask_origin"], "status": o["status"], "reject_code": o["reject_code"],
        "box_iou": o["box_iou"], "box_fill": o["box_fill"], "n_components": o["n_components"],
        "pred_iou": o["pred_iou"], "stability": o["stability"], "captions": o["captions"] or [],
    }
