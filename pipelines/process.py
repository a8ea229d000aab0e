"""One work unit of images -> rows of the `images` and `objects` tables. Pure: no Ray, no writing.

Order of work per image: check the record -> load pixels -> check and clip boxes -> mask (one masker
call for all of the image's boxes) -> measure and filter -> caption. Every input object ends as
exactly one row: `kept`, `filtered` (failed a quality threshold) or `rejected` (bad input or a
failed model call). A masker that embeds several images at once (SAM with --sam-batch-images N)
gets each group of N loaded images first (`masker.embed`), then the same per-image calls.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.captioners import Caption, Captioner
from pipelines.images import LoadedImage, load_image
from pipelines.maskers import Masker, batch_images
from pipelines.masksets import RleMasks
from pipelines.quality import QualityConfig, decide, measure
from pipelines.records import ImageRecord, SourceObject
from schemas import FILTERED, GT, IMAGE_STATUS_CODES, KEPT, REJECTED
from schemas import masks as rle

log = logging.getLogger(__name__)


@dataclass
class UnitContext:
    """What every unit of one run shares."""

    source: str
    split: str
    root: Path
    run_id: str
    quality: QualityConfig
    remask: bool = False


def image_key(ctx: UnitContext, record: ImageRecord) -> str:
    key = f"{ctx.source}:{ctx.split}:{record.image_id}"
    # Keep ids unique: the first occurrence owns the plain key.
    if record.error_status == "duplicate":
        key += f"#duplicate-{record.index}"
    return key


def clip_box(box_raw: list, width: int, height: int) -> tuple[list[float] | None, str | None]:
    """Source xywh box -> (clipped xywh box, None) or (None, reason it is unusable)."""
    if not isinstance(box_raw, list | tuple) or len(box_raw) != 4:
        return None, f"box must be 4 numbers [x, y, w, h], got {box_raw!r}"
    try:
        x, y, w, h = (float(v) for v in box_raw)
    except (TypeError, ValueError):
        return None, f"box has non-numeric values {box_raw!r}"
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None, f"box has non-finite values {box_raw!r}"
    if w <= 0 or h <= 0:
        return None, f"box has non-positive size w={w:g} h={h:g}"
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    if x1 - x0 < 1.0 or y1 - y0 < 1.0:
        return (
            None,
            f"box {box_raw!r} lies outside the {width}x{height} image (under 1 px after clipping)",
        )
    return [x0, y0, x1 - x0, y1 - y0], None


def base_row(ctx: UnitContext, image_id: str, obj: SourceObject) -> dict:
    raw = obj.box_raw if isinstance(obj.box_raw, list) and len(obj.box_raw) == 4 else None
    return {
        "object_id": f"{image_id}:{obj.ann_id}",
        "image_id": image_id,
        "source_ann_id": str(obj.ann_id),
        "category": obj.category,
        "source_category_id": obj.category_id,
        "source_category_name": obj.category_name,
        "box_raw": [_as_float(v) for v in raw] if raw is not None else None,
        "iscrowd": bool(obj.iscrowd),
        "attributes": json.dumps(obj.attributes, sort_keys=True) if obj.attributes else None,
        "gt_mask": obj.gt_mask,
        "captions": [{"text": t, "provenance": GT, "score": None} for t in obj.captions],
        "run_id": ctx.run_id,
    }


def _as_float(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def reject(row: dict, code: str, reason: str) -> dict:
    """The row as rejected input: `code` from schemas.REJECT_CODES, `reason` the detail."""
    return {**row, "status": REJECTED, "keep": False, "reject_code": code, "reject_reason": reason}


def image_row(
    ctx: UnitContext,
    record: ImageRecord,
    image_id: str,
    status: str,
    error: str | None,
    sha256: str | None,
    size: tuple[int, int] | None,
) -> dict:
    width, height = size if size else (record.width, record.height)
    return {
        "image_id": image_id,
        "source": ctx.source,
        "split": ctx.split,
        "source_image_id": str(record.image_id),
        "file_path": record.file,
        "width": width,
        "height": height,
        "sha256": sha256,
        "status": status,
        "error": error,
        "num_objects": len(record.objects),
        "run_id": ctx.run_id,
    }


def process_image(
    ctx: UnitContext,
    record: ImageRecord,
    masker: Masker,
    captioner: Captioner,
    loaded: LoadedImage | None = None,
) -> tuple[dict, list[dict]]:
    """One ImageRecord -> (its images row, its objects rows in source order). `loaded`: the
    record's image when the caller has already loaded it."""
    image_id = image_key(ctx, record)
    rows = [base_row(ctx, image_id, obj) for obj in record.objects]
    if record.error:
        img = image_row(ctx, record, image_id, record.error_status, record.error, None, None)
        code = IMAGE_STATUS_CODES[record.error_status]
        return img, [reject(r, code, f"image {record.error_status}: {record.error}") for r in rows]
    if loaded is None:
        loaded = load_image(ctx.root, record.file, record.width, record.height)
    if loaded.pixels is None:
        img = image_row(ctx, record, image_id, loaded.status, loaded.error, loaded.sha256, None)
        code = IMAGE_STATUS_CODES[loaded.status]
        return img, [reject(r, code, f"image {loaded.status}: {loaded.error}") for r in rows]
    height, width = loaded.pixels.shape[:2]
    img = image_row(ctx, record, image_id, "ok", None, loaded.sha256, (width, height))
    try:
        rows = annotate_objects(ctx, loaded.pixels, record.objects, rows, masker, captioner)
    except Exception as exc:  # a model failing on one image must not end the run
        log.warning("model call failed on %s: %s", image_id, exc, exc_info=True)
        img["error"] = f"model call failed: {type(exc).__name__}: {exc}"
        detail = f"model call failed: {type(exc).__name__}: {exc}"
        rows = [reject(r, "model_error", detail) for r in rows]
    return img, rows


def check_objects(
    objects: list[SourceObject], rows: list[dict], width: int, height: int
) -> list[int]:
    """Fill `box` or reject each row in place; return the indices of usable objects."""
    usable, seen = [], set()
    for i, (obj, row) in enumerate(zip(objects, rows, strict=True)):
        box, problem = clip_box(obj.box_raw, width, height)
        code = "box_invalid" if problem else None
        if obj.error:  # the source's reason is the more specific one
            code, problem = obj.error_code or "annotation_invalid", obj.error
        if problem is None and not (obj.category or "").strip():
            code, problem = "category_missing", "missing category"
        if problem is None and row["object_id"] in seen:
            code, problem = "duplicate_id", f"duplicate annotation id {obj.ann_id}"
        if (
            problem is None
            and obj.gt_mask is not None
            and (obj.gt_mask["height"] != height or obj.gt_mask["width"] != width)
        ):
            code, problem = "gt_mask_invalid", (
                f"gt mask is {obj.gt_mask['width']}x{obj.gt_mask['height']}, "
                f"image is {width}x{height}"
            )
        seen.add(row["object_id"])
        if problem:
            rows[i] = reject(row, code, problem)
        else:
            row["box"] = box
            usable.append(i)
    return usable


MASK_CHUNK = 64  # masks held at full resolution at once while scoring and encoding


def annotate_objects(
    ctx: UnitContext,
    pixels: np.ndarray,
    objects: list[SourceObject],
    rows: list[dict],
    masker: Masker,
    captioner: Captioner,
) -> list[dict]:
    """Mask, score and caption the usable objects of one image, with memory bounded by
    MASK_CHUNK full-size masks however many boxes the image has (pipelines/masksets.py)."""
    height, width = pixels.shape[:2]
    usable = check_objects(objects, rows, width, height)
    if not usable:
        return rows
    objs = [objects[i] for i in usable]
    to_mask = [j for j, o in enumerate(objs) if ctx.remask or o.gt_mask is None]
    made, pred_iou, stability, origins = run_masker(
        pixels, [rows[i]["box"] for i in usable], to_mask, masker, len(objs)
    )
    position = {j: k for k, j in enumerate(to_mask)}
    encoded: list[dict] = []
    for start in range(0, len(usable), MASK_CHUNK):
        chunk = range(start, min(start + MASK_CHUNK, len(usable)))
        full = np.zeros((len(chunk), height, width), dtype=bool)
        for n, j in enumerate(chunk):
            full[n] = made[position[j]] if j in position else rle.decode([objs[j].gt_mask])[0]
        chunk_encoded = rle.encode(full)
        for n, j in enumerate(chunk):
            fill_mask_columns(
                rows[usable[j]],
                full[n],
                chunk_encoded[n],
                float(pred_iou[j]),
                float(stability[j]),
                origins[j],
                masker.origin,
                ctx.quality,
            )
        encoded += chunk_encoded
    boxes = np.array([_xyxy(rows[i]["box"]) for i in usable], dtype=np.float64)
    masks = RleMasks(height, width, encoded)
    captions = captioner(pixels, boxes, masks, [o.category for o in objs])
    for i, caps in zip(usable, captions, strict=True):
        rows[i]["captions"] = rows[i]["captions"] + [_caption_dict(c) for c in caps]
    return rows


def run_masker(
    pixels: np.ndarray, boxes: list[list[float]], to_mask: list[int], masker: Masker, n: int
) -> tuple[object, np.ndarray, np.ndarray, list[str]]:
    """One masker call for the `to_mask` boxes (of `n` usable objects) -> (their mask set, and per
    usable object: predicted IoU, stability (NaN where none) and origin (`gt` for the others, the
    masker's origin, or the substitute the masker names in MaskOutput.origins))."""
    pred_iou = np.full(n, np.nan, dtype=np.float32)
    stability = np.full(n, np.nan, dtype=np.float32)
    origins = [GT] * n
    if not to_mask:
        return np.zeros((0, *pixels.shape[:2]), bool), pred_iou, stability, origins
    out = masker(pixels, np.array([_xyxy(boxes[j]) for j in to_mask], dtype=np.float64))
    if len(out.masks) != len(to_mask):
        raise ValueError(f"masker {masker.origin!r} returned {len(out.masks)} masks for "
                         f"{len(to_mask)} boxes")
    pred_iou[to_mask], stability[to_mask] = out.pred_iou, out.stability
    made = out.origins or [masker.origin] * len(to_mask)
    for j, origin in zip(to_mask, made, strict=True):
        origins[j] = origin
    return out.masks, pred_iou, stability, origins


def fill_mask_columns(
    row: dict,
    mask: np.ndarray,
    encoded: dict,
    pred_iou: float,
    stability: float,
    origin: str,
    masker_origin: str,
    quality_cfg: QualityConfig,
) -> None:
    """Scores and status of one mask. Ground truth is never filtered; a substitute the masker put
    in place of its own output (origin differs from the masker's) is filtered as `mask_fallback`
    unless the quality config keeps fallbacks, so it never passes as the method's output."""
    q = measure(mask, row["box"])
    failed = decide(q, pred_iou, stability, quality_cfg) if origin != GT else None
    if origin not in (GT, masker_origin) and not quality_cfg.keep_fallback:
        detail = f"the masker substituted {origin!r} for its own output"
        failed = ("mask_fallback", f"{detail}; {failed[1]}" if failed else detail)
    code, reason = failed or (None, None)
    row.update(
        mask=encoded,
        mask_origin=origin,
        mask_area=q.area,
        mask_box=q.mask_box,
        pred_iou=None if math.isnan(pred_iou) else pred_iou,
        stability=None if math.isnan(stability) else stability,
        box_iou=q.box_iou,
        box_fill=q.box_fill,
        n_components=q.n_components,
        status=FILTERED if reason else KEPT,
        keep=reason is None,
        reject_code=code,
        reject_reason=reason,
    )


def _xyxy(box: list[float]) -> list[float]:
    return [box[0], box[1], box[0] + box[2], box[1] + box[3]]


def _caption_dict(c: Caption | dict) -> dict:
    return c.to_dict() if isinstance(c, Caption) else c


def _load_for_batch(ctx: UnitContext, record: ImageRecord) -> LoadedImage | None:
    """The record's image, loaded ahead for a batched masker (None: the record has an error)."""
    if record.error:
        return None
    return load_image(ctx.root, record.file, record.width, record.height)


def _needs_masker(ctx: UnitContext, record: ImageRecord, pixels: np.ndarray | None) -> bool:
    """Whether the image will reach the masker: it loaded and has an object to mask with a
    usable box (an embedding for anything else would be encoder time thrown away)."""
    if pixels is None:
        return False
    height, width = pixels.shape[:2]
    return any((ctx.remask or o.gt_mask is None) and not o.error
               and clip_box(o.box_raw, width, height)[0] is not None for o in record.objects)


def process_unit(
    ctx: UnitContext, records: list[ImageRecord], masker: Masker, captioner: Captioner
) -> tuple[list[dict], list[dict]]:
    """A unit's records -> (images rows, objects rows), both sorted by image_id (stable, so an
    image's objects keep their source order)."""
    images, objects = [], []
    group = batch_images(masker)
    for start in range(0, len(records), group):
        batch = records[start : start + group]
        loaded = [_load_for_batch(ctx, r) for r in batch] if group > 1 else [None] * len(batch)
        if group > 1:
            masker.embed([im.pixels for im, r in zip(loaded, batch, strict=True)
                          if im is not None and _needs_masker(ctx, r, im.pixels)])
        for record, image in zip(batch, loaded, strict=True):
            img, rows = process_image(ctx, record, masker, captioner, image)
            images.append(img)
            objects.extend(rows)
    images.sort(key=lambda r: r["image_id"])
    objects.sort(key=lambda r: r["image_id"])
    return images, objects
