"""Metrics of the six tasks, as pure functions of predictions and ground truth (numpy / RLE values).

Conventions: masks are mask values of the contract ({counts, height, width}, schemas.masks) or
(H, W) bool arrays; boxes are xywh absolute pixels; categories are text.

- instance_ap: COCO mask and box AP through pycocotools' COCOeval (crowd GT = ignore regions).
- panoptic_quality: PQ = SQ * RQ per category, IoU > 0.5 matching (Kirillov et al. 2019),
  averaged over categories, with things/stuff splits; void (unlabelled) pixels and crowd regions
  as in panopticapi.
- semantic_miou: confusion-matrix mIoU over label maps.
- referring_iou: cumulative IoU (sum I / sum U) and mean per-expression IoU.
- foreground_mse: mean over images of the per-pixel squared error of [0, 1] maps.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from schemas import masks as mask_codec


def _as_bool(mask) -> np.ndarray:
    if isinstance(mask, dict):
        return mask_codec.decode([mask])[0].astype(bool)
    return np.asarray(mask, dtype=bool)


def _as_rle(mask) -> dict:
    if isinstance(mask, dict):
        return mask_codec.to_rle(mask)
    return mask_codec.to_rle(mask_codec.encode(np.asarray(mask, dtype=bool)[None])[0])


# ------------------------------------------------------------------------------------ instance AP
def _coco_gt(gt_images: list[dict], categories: list[str], with_masks: bool) -> COCO:
    cat_id = {c: i + 1 for i, c in enumerate(categories)}
    images, anns = [], []
    for n, image in enumerate(gt_images):
        images.append({"id": n + 1, "height": image["height"], "width": image["width"]})
        for obj in image["objects"]:
            x, y, w, h = (float(v) for v in obj["box"])
            ann = {
                "id": len(anns) + 1,
                "image_id": n + 1,
                "category_id": cat_id[obj["category"]],
                "bbox": [x, y, w, h],
                "iscrowd": int(bool(obj.get("iscrowd"))),
                "area": w * h,
            }
            if with_masks:
                rle = _as_rle(obj["mask"])
                ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
                ann["area"] = float(mask_codec.area([mask_codec.from_rle(rle)])[0])
            anns.append(ann)
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": i, "name": c} for c, i in cat_id.items()],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _coco_eval(coco_gt: COCO, results: list[dict], iou_type: str) -> tuple[float, float]:
    if not results:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


def instance_ap(gt_images: list[dict], predictions: list[dict]) -> dict:
    """COCO AP of instance/detection predictions.

    gt_images: [{"image_id", "height", "width", "objects": [{"category", "box" xywh, "mask" (value
    or
        array; absent/None for box-only GT), "iscrowd"}]}].
    predictions: [{"image_id", "category", "score", "box" xywh, "mask" (optional)}].
    Returns {"box_AP", "box_AP50", "mask_AP", "mask_AP50"} (AP in [0, 1]; mask_* is None without
    masks;
    -1 where the GT has no non-crowd object, as COCOeval reports).
    """
    categories = sorted({o["category"] for im in gt_images for o in im["objects"]})
    index = {im["image_id"]: n + 1 for n, im in enumerate(gt_images)}
    unknown = [p["image_id"] for p in predictions if p["image_id"] not in index]
    if unknown:
        raise ValueError(f"predictions for unknown image_id(s) {sorted(set(unknown))[:5]}")
    known = [p for p in predictions if p["category"] in categories]  # others are false positives
    cat_id = {
        c: i + 1 for i, c in enumerate(categories)
    }  # of classes absent from GT: AP ignores them
    box_results = [
        {
            "image_id": index[p["image_id"]],
            "category_id": cat_id[p["category"]],
            "bbox": [float(v) for v in p["box"]],
            "score": float(p["score"]),
        }
        for p in known
    ]
    box_ap, box_ap50 = _coco_eval(_coco_gt(gt_images, categories, False), box_results, "bbox")
    out = {"box_AP": box_ap, "box_AP50": box_ap50, "mask_AP": None, "mask_AP50": None}
    has_gt_masks = all(o.get("mask") is not None for im in gt_images for o in im["objects"])
    if has_gt_masks and predictions and all(p.get("mask") is not None for p in predictions):
        seg_results = []
        for p in known:
            rle = _as_rle(p["mask"])
            seg_results.append(
                {
                    "image_id": index[p["image_id"]],
                    "category_id": cat_id[p["category"]],
                    "segmentation": {"size": rle["size"], "counts": rle["counts"]},
                    "score": float(p["score"]),
                }
            )
        out["mask_AP"], out["mask_AP50"] = _coco_eval(
            _coco_gt(gt_images, categories, True), seg_results, "segm"
        )
    return out


# ----------------------------------------------------------------------------------- panoptic PQ
def pq_image(gt: list[dict], pred: list[dict], stats: dict) -> None:
    """Accumulate per-category TP/FP/FN/IoU sums of one image (segments with bool masks)."""
    labelled = np.zeros_like(gt[0]["mask"]) if gt else None
    for g in gt:
        labelled |= g["mask"]
    void = ~labelled if labelled is not None else np.ones_like(pred[0]["mask"]) if pred else None

    def entry(cat):
        return stats.setdefault(cat, {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0})

    matched_gt, matched_pred = set(), set()
    for gi, g in enumerate(gt):
        if g["iscrowd"]:
            continue
        for pi, p in enumerate(pred):
            if p["category"] != g["category"] or pi in matched_pred:
                continue
            inter = np.logical_and(g["mask"], p["mask"]).sum()
            # Pixels the prediction puts on void do not count against it (panopticapi).
            union = (
                np.logical_or(g["mask"], p["mask"]).sum() - np.logical_and(p["mask"], void).sum()
            )
            iou = inter / union if union else 0.0
            if iou > 0.5:  # > 0.5 makes the match unique: no assignment problem to solve
                matched_gt.add(gi), matched_pred.add(pi)
                entry(g["category"])["tp"] += 1
                entry(g["category"])["iou"] += float(iou)
                break
    for gi, g in enumerate(gt):
        if not g["iscrowd"] and gi not in matched_gt:
            entry(g["category"])["fn"] += 1
    for pi, p in enumerate(pred):
        if pi in matched_pred:
            continue
        area = p["mask"].sum()
        ignored = np.logical_and(p["mask"], void).sum()
        for g in gt:  # a crowd region of the same class also excuses the prediction
            if g["iscrowd"] and g["category"] == p["category"]:
                ignored += np.logical_and(p["mask"], g["mask"]).sum()
        if area and ignored / area > 0.5:
            continue
        entry(p["category"])["fp"] += 1


def _pq_average(stats: dict, cats: list[str]) -> dict:
    pq, sq, rq, n = 0.0, 0.0, 0.0, 0
    for c in cats:
        s = stats[c]
        denom = s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"]
        if denom == 0:
            continue
        n += 1
        pq += s["iou"] / denom
        sq += s["iou"] / s["tp"] if s["tp"] else 0.0
        rq += s["tp"] / denom
    return (
        {"PQ": pq / n, "SQ": sq / n, "RQ": rq / n, "n": n}
        if n
        else {"PQ": 0.0, "SQ": 0.0, "RQ": 0.0, "n": 0}
    )


def pq_summary(stats: dict, isthing: dict[str, bool]) -> dict:
    """{"all", "things", "stuff", "per_class"} of accumulated per-category PQ statistics."""
    unknown = sorted(set(stats) - set(isthing))
    if unknown:
        raise ValueError(f"categories {unknown} missing from isthing")
    cats = sorted(stats)
    return {
        "all": _pq_average(stats, cats),
        "things": _pq_average(stats, [c for c in cats if isthing[c]]),
        "stuff": _pq_average(stats, [c for c in cats if not isthing[c]]),
        "per_class": {c: _pq_average(stats, [c])["PQ"] for c in cats},
    }


def panoptic_quality(
    gt_images: list[dict], pred_images: list[dict], isthing: dict[str, bool]
) -> dict:
    """PQ, SQ, RQ over all categories and split into things/stuff.

    gt_images / pred_images: aligned lists of [{"category", "mask" (value or (H, W) bool),
        "iscrowd" (GT only)}], non-overlapping segments per image.
    isthing: category -> thing (True) or stuff (False).
    Returns {"all": {PQ, SQ, RQ, n}, "things": {...}, "stuff": {...}, "per_class": {cat: PQ}}.
    """
    if len(gt_images) != len(pred_images):
        raise ValueError(f"{len(gt_images)} GT images but {len(pred_images)} prediction images")
    stats: dict[str, dict] = {}
    for gt, pred in zip(gt_images, pred_images, strict=True):
        gt = [{**g, "mask": _as_bool(g["mask"]), "iscrowd": bool(g.get("iscrowd"))} for g in gt]
        pred = [{**p, "mask": _as_bool(p["mask"])} for p in pred]
        pq_image(gt, pred, stats)
    return pq_summary(stats, isthing)


# ------------------------------------------------------------------------------ semantic / refer
def confusion_update(conf: np.ndarray, gt: np.ndarray, pred: np.ndarray,
                     ignore_index: int = 255) -> None:
    """Add one image's (H, W) GT and predicted label maps to the (C, C) confusion matrix."""
    num_classes = len(conf)
    gt, pred = np.asarray(gt).ravel(), np.asarray(pred).ravel()
    valid = gt != ignore_index
    if np.any((gt[valid] < 0) | (gt[valid] >= num_classes)):
        raise ValueError(f"GT label outside 0..{num_classes - 1} (ignore {ignore_index})")
    if np.any((pred[valid] < 0) | (pred[valid] >= num_classes)):
        raise ValueError(f"predicted label outside 0..{num_classes - 1}")
    conf += np.bincount(
        gt[valid] * num_classes + pred[valid], minlength=num_classes**2
    ).reshape(num_classes, num_classes)


def miou_from_confusion(conf: np.ndarray) -> dict:
    """{"mIoU", "pixel_acc", "iou"} of a confusion matrix (classes never seen left out)."""
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    total = conf.sum()
    return {
        "mIoU": float(np.nanmean(iou)) if np.any(union > 0) else 0.0,
        "pixel_acc": float(inter.sum() / total) if total else 0.0,
        "iou": iou,
    }


def iou_by_name(iou: np.ndarray, vocab: list[str]) -> dict[str, float | None]:
    """The "iou" array of miou_from_confusion by class name; None for a class absent from both
    the ground truth and the predictions."""
    return {name: None if np.isnan(v) else float(v) for name, v in zip(vocab, iou, strict=True)}


def semantic_miou(
    gt_maps: list[np.ndarray],
    pred_maps: list[np.ndarray],
    num_classes: int,
    ignore_index: int = 255,
) -> dict:
    """mIoU from a confusion matrix over (H, W) int label maps (class ids 0..num_classes-1).

    Classes absent from both GT and predictions are left out of the mean.
    Returns {"mIoU", "pixel_acc", "iou": (num_classes,) array with NaN for absent classes}.
    """
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for gt, pred in zip(gt_maps, pred_maps, strict=True):
        confusion_update(conf, gt, pred, ignore_index)
    return miou_from_confusion(conf)


def mask_overlap(gt, pred) -> tuple[int, int]:
    """(intersection, union) pixel counts of two masks of one size."""
    g, p = _as_bool(gt), _as_bool(pred)
    if g.shape != p.shape:
        raise ValueError(f"mask shapes differ: GT {g.shape}, prediction {p.shape}")
    return int(np.logical_and(g, p).sum()), int(np.logical_or(g, p).sum())


def iou_summary(inters: list[int], unions: list[int]) -> dict:
    if not inters:
        raise ValueError("referring_iou needs at least one expression")
    ious = [i / u if u else 1.0 for i, u in zip(inters, unions, strict=True)]
    total_union = sum(unions)
    return {"cIoU": sum(inters) / total_union if total_union else 1.0, "mIoU": float(np.mean(ious))}


def referring_iou(gt_masks: list, pred_masks: list) -> dict:
    """cIoU = sum of intersections / sum of unions; mIoU = mean per-expression IoU (empty/empty =
    1)."""
    pairs = [mask_overlap(g, p) for g, p in zip(gt_masks, pred_masks, strict=True)]
    return iou_summary([i for i, _ in pairs], [u for _, u in pairs])


def squared_error(gt, pred) -> float:
    """mean((pred - gt)^2) of one image's (H, W) maps in [0, 1] (bool GT allowed)."""
    g, p = np.asarray(gt, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    if g.shape != p.shape:
        raise ValueError(f"map shapes differ: GT {g.shape}, prediction {p.shape}")
    if g.min(initial=0) < 0 or g.max(initial=0) > 1 or p.min(initial=0) < 0 \
            or p.max(initial=0) > 1:
        raise ValueError("foreground maps must lie in [0, 1]")
    return float(np.mean((p - g) ** 2))


def foreground_mse(gt_maps: list[np.ndarray], pred_maps: list[np.ndarray]) -> float:
    """Mean over images of mean((pred - gt)^2); maps are (H, W) in [0, 1] (bool GT allowed)."""
    errors = [squared_error(g, p) for g, p in zip(gt_maps, pred_maps, strict=True)]
    if not errors:
        raise ValueError("foreground_mse needs at least one image")
    return float(np.mean(errors))
