"""Export as SA-1B (segment-anything's release layout): one `<name>.jpg` + `<name>.json` pair per
image.

Each JSON is `{"image": {image_id, file_name, width, height}, "annotations": [...]}`; every
annotation has the keys segment-anything's automatic mask generator (and scripts/amg.py) writes:
`segmentation` (COCO compressed RLE, `{"size": [h, w], "counts": str}`), `area` (pixels), `bbox`
(XYWH of the mask), `predicted_iou`, `stability_score` (null when the masker gives none),
`point_coords` (empty: the masks come from box prompts, not points) and `crop_box` (the whole
image: no crops were used), plus `id`, and `box_prompt`, `category`, `mask_origin` and `captions`
as extra keys. The file pair name is the engine image id made filesystem-safe.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.export_select import (
    copy_file,
    image_path,
    iter_images,
    open_selection,
    safe_name,
    staging,
    write_json_atomic,
    write_receipt,
)
from schemas import masks as rle
from schemas.runs import Run


def export_sa1b(run: Run, dest: Path, where: str | None = None) -> dict:
    """Write the selected objects (default: kept) of `run` into folder `dest`; returns counts."""
    con = open_selection(run, where)
    with staging(dest) as tmp:
        counts = _write(run, con, tmp)
        write_receipt(tmp, "sa1b", run, where, counts)
    return counts


def _write(run: Run, con, dest: Path) -> dict:
    counts = {"images": 0, "annotations": 0, "skipped_no_mask": 0}
    for image, objects in iter_images(con):
        annotations = [_annotation(o, image) for o in objects if o["mask"] is not None]
        counts["skipped_no_mask"] += len(objects) - len(annotations)
        if not annotations:
            continue
        name = safe_name(image["image_id"], image["file_path"])
        copy_file(image_path(run, image), dest / name)
        info = {"image_id": image["image_id"], "file_name": name,
                "width": image["width"], "height": image["height"],
                "source_file": image["file_path"]}
        write_json_atomic({"image": info, "annotations": annotations},
                          dest / (Path(name).stem + ".json"))
        counts["images"] += 1
        counts["annotations"] += len(annotations)
    return counts


def _annotation(obj: dict, image: dict) -> dict:
    mask = obj["mask"]
    bbox = rle.tight_box([mask])[0].tolist()
    return {
        "id": obj["object_id"],
        "segmentation": {"size": [mask["height"], mask["width"]], "counts": mask["counts"]},
        "area": int(rle.area([mask])[0]),
        "bbox": bbox,
        "predicted_iou": obj["pred_iou"],
        "stability_score": obj["stability"],
        "point_coords": [],
        "crop_box": [0, 0, image["width"], image["height"]],
        "box_prompt": obj["box"],
        "category": obj["category"],
        "mask_origin": obj["mask_origin"],
        "captions": obj["captions"] or [],
    }
