"""Peak memory of `engine eval`'s metric accumulation: streaming metrics vs full-resolution maps.

N synthetic images (640x480 by default, 6 objects each, RLE ground truth as iter_eval_samples
gives it) and random model outputs go through the task records' `original()` (model/tasks.py),
then either
- maps (baseline, the Evaluator before model/metrics.py): every image's full-resolution maps kept
  until the end (semantic: GT and predicted label maps; panoptic: one bool mask per predicted
  segment; referring: one predicted mask per expression; foreground: GT and predicted maps), then
  the list-based functions of model/evaluate.py;
- streaming (ours): model/metrics.py, per image only what the metric needs.
Peak is tracemalloc's (numpy's buffers included), so the figures are the Python heap of the
accumulation, the same in both runs except for what is kept. The metrics must be equal.
Instance/detection are not measured: both keep RLE (COCOeval reads every image at the end).

    .venv/bin/python bench/eval_memory.py [--quick]
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import torch
from _common import check, parser, print_table, write_results

VOCAB = ["cat", "dog", "sky", "grass", "car"]
IS_THING = {"cat": True, "dog": True, "sky": False, "grass": False, "car": True}
TASKS = ("semantic", "panoptic", "referring", "foreground")


def synthetic_gt(k: int, task: str, height: int, width: int) -> dict:
    """One image's GT as model.eval_data gives it: objects with RLE masks, labels per task."""
    from schemas import masks as mask_codec

    rng = np.random.default_rng(k)
    objects = []
    for j in range(6):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        mask = np.zeros((height, width), bool)
        mask[y0:y0 + rng.integers(20, height // 2), x0:x0 + rng.integers(20, width // 2)] = True
        category = VOCAB[j % len(VOCAB)]
        label = j if task == "referring" else VOCAB.index(category)
        objects.append({"label": label, "category": category, "iscrowd": False,
                        "mask": mask_codec.encode(mask[None])[0], "is_thing": IS_THING[category],
                        "rect": np.argwhere(mask)[[0, -1]].ravel()})  # y0, x0, y1, x1
    return {"image_id": f"img{k}", "height": height, "width": width, "objects": objects}


def synthetic_output(k: int, gt: dict, texts: int, geo, queries: int = 50) -> dict:
    """A noisy oracle: query j predicts object j (its label, its rectangle on the stride-4 grid of
    the padded input) plus noise; the other queries are noise. Metrics land between 0 and 1."""
    g = torch.Generator().manual_seed(k)
    cells = geo.size // 4
    logits = torch.randn(queries, texts, generator=g) - 3
    masks = torch.randn(queries, cells, cells, generator=g) * 2 - 4
    scale = geo.resized_height / geo.height / 4
    for j, o in enumerate(gt["objects"]):
        logits[j, min(o["label"], texts - 1)] += 6
        y0, x0, y1, x1 = (int(v * scale) for v in o["rect"])
        masks[j, y0:y1 + 1, x0:x1 + 1] += 8
    return {"pred_logits": logits, "pred_masks": masks,
            "pred_boxes": torch.rand(queries, 4, generator=g) * 0.5 + 0.25}


def samples(task: str, n: int, height: int, width: int, size: int):
    from model import transforms as T
    from model.tasks import TASKS as RECORDS

    geo = T.geometry(height, width, size)
    for k in range(n):
        gt = synthetic_gt(k, task, height, width)
        texts = len(gt["objects"]) if task == "referring" else len(VOCAB)
        if task == "foreground":
            texts = 1
        pred = RECORDS[task].original(synthetic_output(k, gt, texts, geo), geo,
                                      is_thing=[IS_THING[v] for v in VOCAB])
        yield gt, pred


def with_maps(task: str, stream) -> dict:
    """The Evaluator before streaming: keep the full-resolution maps, score at the end."""
    from model import evaluate as M
    from schemas import masks as mask_codec

    gts, preds = [], []
    for gt, pred in stream:
        if task == "semantic":
            label_map = np.full((gt["height"], gt["width"]), 255, dtype=np.int64)
            for o in gt["objects"]:
                label_map[mask_codec.decode([o["mask"]])[0].astype(bool)] = o["label"]
            gts.append(label_map)
            preds.append(pred["labels"].astype(np.int64))
        elif task == "panoptic":
            preds.append([{"category": VOCAB[s["label"]], "mask": pred["segments"] == s["id"]}
                          for s in pred["info"]])
            gts.append([{"category": o["category"], "mask": o["mask"], "iscrowd": o["iscrowd"]}
                        for o in gt["objects"]])
        elif task == "referring":
            for o in gt["objects"]:
                gts.append(o["mask"])
                preds.append(pred["masks"][o["label"]])
        else:
            fg = np.zeros((gt["height"], gt["width"]), dtype=bool)
            for o in gt["objects"]:
                fg |= mask_codec.decode([o["mask"]])[0].astype(bool)
            gts.append(fg)
            preds.append(pred["prob"])
    if task == "semantic":
        out = M.semantic_miou(gts, preds, num_classes=len(VOCAB))
        return {"mIoU": out["mIoU"], "pixel_acc": out["pixel_acc"],
                "iou_per_class": M.iou_by_name(out["iou"], VOCAB)}
    if task == "panoptic":
        out = M.panoptic_quality(gts, preds, IS_THING)
        return {"PQ": out["all"]["PQ"], "SQ": out["all"]["SQ"], "RQ": out["all"]["RQ"],
                "PQ_things": out["things"]["PQ"] if out["things"]["n"] else None,
                "PQ_stuff": out["stuff"]["PQ"] if out["stuff"]["n"] else None}
    if task == "referring":
        return M.referring_iou(gts, preds)
    return {"MSE": M.foreground_mse(gts, preds)}


def streaming(task: str, stream) -> dict:
    from model.tasks import TASKS as RECORDS

    metric = RECORDS[task].metric(VOCAB, IS_THING)
    for gt, pred in stream:
        metric.add(gt, pred)
    return metric.result()


def peak(fn, *args) -> tuple[int, object]:
    tracemalloc.start()
    value = fn(*args)
    _, top = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return top, value


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=None, help="images per task (default 40)")
    args = p.parse_args()
    n = args.images or (10 if args.quick else 40)
    height, width, size = 480, 640, 256
    torch.set_num_threads(1)
    rows, results = [], {}
    for task in TASKS:
        maps_peak, maps_value = peak(with_maps, task, samples(task, n, height, width, size))
        ours_peak, ours_value = peak(streaming, task, samples(task, n, height, width, size))
        check(maps_value == ours_value, f"{task}: metrics differ {maps_value} vs {ours_value}")
        results[task] = {"maps_peak_mb": maps_peak / 2**20, "streaming_peak_mb": ours_peak / 2**20,
                         "ratio": ours_peak / maps_peak, "metrics": ours_value}
        rows.append([task, maps_peak / 2**20, ours_peak / 2**20, ours_peak / maps_peak])
    print_table(f"eval metric accumulation, {n} images {width}x{height} (tracemalloc peak, MB)",
                ["task", "maps (baseline)", "streaming (ours)", "ours / baseline"], rows)
    write_results("eval_memory", args, {"images": n, "height": height, "width": width,
                                        "input_size": size, "objects_per_image": 6}, results)


if __name__ == "__main__":
    main()
