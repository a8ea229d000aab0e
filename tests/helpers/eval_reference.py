"""The metrics of `engine eval` computed the way the Evaluator did before streaming: every image's
full-resolution predictions kept, then scored at the end. Instance/detection AP comes straight from
pycocotools (COCO + COCOeval built here), the others from the list-based functions of
model/evaluate.py, each tested against numpy in tests/model/test_evaluate.py."""

import contextlib
import io

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from model import evaluate as M
from model import postprocess as P
from model import transforms as T
from model.frames import boxes_to_original, segments_to_original


def _decode(value: dict) -> np.ndarray:
    return mask_utils.decode({"size": [value["height"], value["width"]],
                              "counts": value["counts"].encode()}).astype(bool)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def _coco_ap(gts: list[dict], preds: list[dict], vocab: list[str], iou_type: str) -> list[float]:
    present = sorted({o["category"] for g in gts for o in g["objects"]})
    cat = {c: i + 1 for i, c in enumerate(present)}
    images, anns = [], []
    for n, g in enumerate(gts):
        images.append({"id": n + 1, "height": g["height"], "width": g["width"]})
        for o in g["objects"]:
            x, y, w, h = (float(v) for v in o["box"])
            ann = {"id": len(anns) + 1, "image_id": n + 1, "category_id": cat[o["category"]],
                   "bbox": [x, y, w, h], "iscrowd": int(o["iscrowd"]), "area": w * h}
            if iou_type == "segm":
                mask = _decode(o["mask"])
                ann["segmentation"], ann["area"] = _rle(mask), float(mask.sum())
            anns.append(ann)
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": i, "name": c} for c, i in cat.items()]}
    results = [{"image_id": p["image"] + 1, "category_id": cat[vocab[p["label"]]],
                "score": p["score"], **({"bbox": p["box"]} if iou_type == "bbox"
                                        else {"segmentation": p["rle"]})}
               for p in preds if vocab[p["label"]] in cat]
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(ev.stats[0]), float(ev.stats[1])]


def reference_metrics(task: str, pairs: list[tuple[dict, dict]], vocab: list[str],
                      is_thing: dict[str, bool]) -> dict:
    """pairs: (iter_eval_samples sample, run_model output) per image."""
    gts, preds = [], []
    for sample, out in pairs:
        geo, gt = sample["geometry"], sample["gt"]
        args = (out["pred_logits"], out["pred_masks"], out["pred_boxes"], (geo.size, geo.size))
        if task in ("instance", "detection"):
            infer = P.instance_inference if task == "instance" else P.detection_inference
            pred = infer(*args, is_thing=[is_thing[v] for v in vocab])
            boxes = boxes_to_original(pred["boxes"], geo)
            masks = T.unpad_resize(pred["masks"].numpy(), geo) if task == "instance" else None
            preds += [{"image": len(gts), "label": int(pred["labels"][i]),
                       "score": float(pred["scores"][i]), "box": boxes[i].tolist(),
                       "rle": _rle(masks[i]) if masks is not None else None}
                      for i in range(len(pred["scores"]))]
            gts.append(gt)
        elif task == "semantic":
            label_map = np.full((gt["height"], gt["width"]), 255, dtype=np.int64)
            for o in gt["objects"]:
                if not o["iscrowd"]:
                    label_map[_decode(o["mask"])] = o["label"]
            gts.append(label_map)
            preds.append(T.unpad_resize(P.semantic_inference(*args)["scores"].numpy(),
                                        geo).argmax(0))
        elif task == "panoptic":
            pred = P.panoptic_inference(*args, is_thing=[is_thing[v] for v in vocab])
            segments = segments_to_original(pred["segments"], geo)
            preds.append([{"category": vocab[s["label"]], "mask": segments == s["id"]}
                          for s in pred["info"]])
            gts.append([{"category": o["category"], "mask": _decode(o["mask"]),
                         "iscrowd": o["iscrowd"]} for o in gt["objects"]])
        elif task == "referring":
            masks = T.unpad_resize(P.referring_inference(*args)["masks"].numpy(), geo)
            for o in gt["objects"]:
                gts.append(_decode(o["mask"]))
                preds.append(masks[o["label"]])
        else:
            prob = P.foreground_inference(*args)["prob"]
            preds.append(np.clip(T.unpad_resize(prob[None].numpy(), geo)[0], 0.0, 1.0))
            fg = np.zeros((gt["height"], gt["width"]), dtype=bool)
            for o in gt["objects"]:
                fg |= _decode(o["mask"])
            gts.append(fg)
    if task in ("instance", "detection"):
        box = _coco_ap(gts, preds, vocab, "bbox") if preds else [0.0, 0.0]
        out = {"box_AP": box[0], "box_AP50": box[1]}
        if task == "instance":
            mask = _coco_ap(gts, preds, vocab, "segm") if preds else [0.0, 0.0]
            out.update(mask_AP=mask[0], mask_AP50=mask[1])
        return out
    if task == "semantic":
        out = M.semantic_miou(gts, preds, num_classes=len(vocab))
        per_class = {}
        for k, name in enumerate(vocab):  # IoU of one class straight from the maps
            inter = sum(int(((g == k) & (p == k)).sum()) for g, p in zip(gts, preds, strict=True))
            union = sum(int((((g == k) | (p == k)) & (g != 255)).sum())
                        for g, p in zip(gts, preds, strict=True))
            per_class[name] = inter / union if union else None
        return {"mIoU": out["mIoU"], "pixel_acc": out["pixel_acc"], "iou_per_class": per_class}
    if task == "panoptic":
        out = M.panoptic_quality(gts, preds, is_thing)
        return {"PQ": out["all"]["PQ"], "SQ": out["all"]["SQ"], "RQ": out["all"]["RQ"],
                "PQ_things": out["things"]["PQ"] if out["things"]["n"] else None,
                "PQ_stuff": out["stuff"]["PQ"] if out["stuff"]["n"] else None}
    if task == "referring":
        return M.referring_iou(gts, preds)
    return {"MSE": M.foreground_mse(gts, preds)}
