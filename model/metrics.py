"""Streaming metrics: per image, keep only what the metric needs, never a full-resolution map.

Each class takes one image at a time, `add(gt, pred)`, with gt as model.eval_data's sample["gt"]
(original frame, masks as RLE values) and pred as a task record's `original()` predictions
(model/tasks.py), and `result()` gives the metrics `engine eval` reports. What each keeps:

- instance / detection: the GT records (RLE values, as read) and each prediction with its mask
  RLE-encoded once; COCOeval needs every image at the end, and RLE is what it reads.
- semantic: a (C, C) confusion matrix.
- panoptic: per-category TP / FP / FN / IoU sums.
- referring: two integers per expression (intersection, union).
- foreground: one float per image (its mean squared error).

The sums run in the order the list-based functions of model/evaluate.py use, so the numbers are
the same as computing those functions over all images at once.
"""

from __future__ import annotations

import numpy as np

from model import evaluate as M
from schemas import masks as mask_codec


def _decoded(gt_obj: dict) -> np.ndarray:
    return mask_codec.decode([gt_obj["mask"]])[0].astype(bool)


class InstanceMetric:
    """COCO box and mask AP (model.evaluate.instance_ap). `gt` and `pred` are the lists it reads
    (bench/ablation.py re-scores them class-agnostically)."""

    masks = True

    def __init__(self, vocab: list[str], is_thing: dict[str, bool]):
        self.vocab = vocab
        self.gt: list[dict] = []
        self.pred: list[dict] = []

    def add(self, gt: dict, pred: dict) -> None:
        n = len(pred["scores"])
        rles = mask_codec.encode(pred["masks"]) if self.masks and n else None
        for i in range(n):
            self.pred.append({"image_id": gt["image_id"],
                              "category": self.vocab[int(pred["labels"][i])],
                              "score": float(pred["scores"][i]), "box": pred["boxes"][i].tolist(),
                              **({"mask": rles[i]} if rles is not None else {})})
        self.gt.append(gt)

    def result(self) -> dict:
        metrics = M.instance_ap(self.gt, self.pred)
        if not self.masks:
            metrics = {k: v for k, v in metrics.items() if not k.startswith("mask")}
        return metrics


class DetectionMetric(InstanceMetric):
    """COCO box AP only; predictions carry no masks."""

    masks = False


class SemanticMetric:
    """mIoU and pixel accuracy from a confusion matrix over the vocabulary (255 = unlabelled)."""

    def __init__(self, vocab: list[str], is_thing: dict[str, bool]):
        self.vocab = list(vocab)
        self.conf = np.zeros((len(vocab), len(vocab)), dtype=np.int64)

    def add(self, gt: dict, pred: dict) -> None:
        label_map = np.full((gt["height"], gt["width"]), 255, dtype=np.int64)
        for obj in gt["objects"]:
            if not obj["iscrowd"]:
                label_map[_decoded(obj)] = obj["label"]
        M.confusion_update(self.conf, label_map, pred["labels"])

    def result(self) -> dict:
        out = M.miou_from_confusion(self.conf)
        return {"mIoU": out["mIoU"], "pixel_acc": out["pixel_acc"],
                "iou_per_class": M.iou_by_name(out["iou"], self.vocab)}


class PanopticMetric:
    """PQ / SQ / RQ, with the things and stuff splits (panopticapi's void and crowd rules)."""

    def __init__(self, vocab: list[str], is_thing: dict[str, bool]):
        self.vocab, self.is_thing = vocab, is_thing
        self.stats: dict[str, dict] = {}

    def add(self, gt: dict, pred: dict) -> None:
        gt_segments = [{"category": o["category"], "mask": _decoded(o),
                        "iscrowd": bool(o["iscrowd"])} for o in gt["objects"]]
        pred_segments = [{"category": self.vocab[s["label"]],
                          "mask": pred["segments"] == s["id"]} for s in pred["info"]]
        M.pq_image(gt_segments, pred_segments, self.stats)

    def result(self) -> dict:
        out = M.pq_summary(self.stats, self.is_thing)
        return {"PQ": out["all"]["PQ"], "SQ": out["all"]["SQ"], "RQ": out["all"]["RQ"],
                "PQ_things": out["things"]["PQ"] if out["things"]["n"] else None,
                "PQ_stuff": out["stuff"]["PQ"] if out["stuff"]["n"] else None}


class ReferringMetric:
    """cIoU and mean IoU over expressions; GT object k is scored against predicted mask k."""

    def __init__(self, vocab: list[str], is_thing: dict[str, bool]):
        self.inters: list[int] = []
        self.unions: list[int] = []

    def add(self, gt: dict, pred: dict) -> None:
        for obj in gt["objects"]:  # one per expression; label k = expression k
            inter, union = M.mask_overlap(obj["mask"], pred["masks"][obj["label"]])
            self.inters.append(inter)
            self.unions.append(union)

    def result(self) -> dict:
        return M.iou_summary(self.inters, self.unions)


class ForegroundMetric:
    """Mean over images of the per-pixel squared error of the foreground probability."""

    def __init__(self, vocab: list[str], is_thing: dict[str, bool]):
        self.errors: list[float] = []

    def add(self, gt: dict, pred: dict) -> None:
        fg = np.zeros((gt["height"], gt["width"]), dtype=bool)
        for obj in gt["objects"]:
            fg |= _decoded(obj)
        self.errors.append(M.squared_error(fg, pred["prob"]))

    def result(self) -> dict:
        if not self.errors:
            raise ValueError("foreground_mse needs at least one image")
        return {"MSE": float(np.mean(self.errors))}
