"""Model outputs -> per-task predictions at the original image size -> the metrics of evaluate.py.

    model = load_model(checkpoint_state)                       # rebuilt from the saved config
    evaluator = Evaluator(task, vocab, is_thing)
    for sample, output in run_model(model, iter_eval_samples(dir, task, size), device, 4):
        evaluator.add(sample, output)
    metrics = evaluator.result()

Frames: the model sees the (S, S) padded input; model/postprocess.py turns one sample's outputs
into masks / maps / boxes on that padded input, and `model.transforms.unpad_resize` (masks, maps) or
`boxes_to_original` (boxes) map them back to the original (height, width) pixels, where the ground
truth of `model.data.iter_eval_samples` lives. Predicted category names come from the dataset
vocabulary: for instance, detection, semantic and panoptic the sample's text k is the template of
vocab[k] (model/data.py builds them that way).

The evaluator also runs the Hungarian matcher on the final decoder stage against the eval targets
and counts which query type (conditional / learnable) took each thing and stuff target: the paper's
query-type diagnostic, measured on held-out data.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import nullcontext

import numpy as np
import torch

from model import evaluate as M
from model import transforms as T
from model.build import build_mqformer
from model.criterion import count_matches_by_type
from model.matcher import HungarianMatcher
from model.mqformer import MQFormer
from model.postprocess import POSTPROCESSORS
from model.shards import ShardSet
from schemas import masks as mask_codec

TASKS = tuple(POSTPROCESSORS)


def load_model(state: dict) -> MQFormer:
    """An MQFormer rebuilt from a training checkpoint's resolved config, weights loaded, eval mode.

    The backbone checkpoint is not read again: its weights are in state["model"].
    """
    config = state["config"]
    model = build_mqformer(config["model_size"], text_encoder=config["text_encoder"],
                           queries=config["queries"],
                           text_encoder_path=config.get("text_encoder_path"),
                           **state["model_config"])
    model.load_state_dict(state["model"])
    return model.eval()


def dataset_categories(shards: ShardSet, keep_only: bool) -> tuple[list[str], dict[str, bool]]:
    """(vocabulary as iter_eval_samples builds it, category -> is_thing): ShardSet.categories."""
    return shards.categories(keep_only)


def _batches(samples: Iterable[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def run_model(model: MQFormer, samples: Iterable[dict], device: torch.device | str,
              batch_size: int = 4) -> Iterator[tuple[dict, dict]]:
    """Batches of eval samples through the model -> (sample, output) per sample.

    output: pred_logits (Q, K) against the sample's own texts, pred_masks (Q, h, w) at stride 4,
    pred_boxes (Q, 4) cxcywh in [0, 1] of the padded input (float32, on CPU), and query_types (Q,).
    """
    device = torch.device(device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else nullcontext())
    for batch in _batches(samples, batch_size):
        images = torch.stack([s["image"] for s in batch]).to(device)
        with autocast:
            out = model(images, [s["target"]["texts"] for s in batch])
        for b, sample in enumerate(batch):
            k = len(sample["target"]["texts"])
            yield sample, {"pred_logits": out["pred_logits"][b, :, :k].float().cpu(),
                           "pred_masks": out["pred_masks"][b].float().cpu(),
                           "pred_boxes": out["pred_boxes"][b].float().cpu(),
                           "query_types": out["query_types"].cpu()}


def boxes_to_original(xyxy: torch.Tensor, geo: T.Geometry) -> np.ndarray:
    """(N, 4) xyxy pixels of the padded input -> (N, 4) xywh pixels of the original image."""
    b = xyxy.detach().cpu().double().numpy().reshape(-1, 4).copy()
    if geo.flipped:
        b[:, [0, 2]] = geo.resized_width - b[:, [2, 0]]
    b[:, [0, 2]] = np.clip(b[:, [0, 2]] * geo.width / geo.resized_width, 0, geo.width)
    b[:, [1, 3]] = np.clip(b[:, [1, 3]] * geo.height / geo.resized_height, 0, geo.height)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def segments_to_original(segments: torch.Tensor, geo: T.Geometry) -> np.ndarray:
    """(S, S) int segment map of the padded input -> (height, width) int32, nearest neighbour."""
    crop = segments.cpu().numpy()[: geo.resized_height, : geo.resized_width]
    if geo.flipped:
        crop = crop[:, ::-1]
    rows = T.nearest_indices(geo.resized_height, geo.height)
    cols = T.nearest_indices(geo.resized_width, geo.width)
    return crop[rows][:, cols].astype(np.int32)


def _postprocess(task: str, output: dict, geo: T.Geometry, **options) -> dict:
    return POSTPROCESSORS[task](output["pred_logits"], output["pred_masks"], output["pred_boxes"],
                                (geo.size, geo.size), **options)


def _decoded(gt_obj: dict) -> np.ndarray:
    return mask_codec.decode([gt_obj["mask"]])[0].astype(bool)


class Evaluator:
    """Accumulates one task's predictions (original frame) and ground truth; result() -> metrics.

    vocab: the dataset's category names (text k of a vocabulary task is vocab[k]); is_thing:
    category -> thing flag (panoptic merging of stuff, PQ things/stuff split).
    """

    def __init__(self, task: str, vocab: list[str], is_thing: dict[str, bool] | None = None,
                 num_points: int = 12544):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
        self.task, self.vocab = task, vocab
        self.is_thing = is_thing or dict.fromkeys(vocab, True)
        self.matcher = HungarianMatcher(num_points=num_points)
        self.images = self.targets = 0
        self.counts: dict[str, int] = {}
        self.gt: list = []
        self.pred: list = []

    def add(self, sample: dict, output: dict) -> None:
        self.images += 1
        self.targets += len(sample["target"]["labels"])
        indices = self.matcher({k: v[None] for k, v in output.items() if k != "query_types"},
                               [sample["target"]])
        for k, v in count_matches_by_type(indices, output["query_types"],
                                          [sample["target"]]).items():
            self.counts[k] = self.counts.get(k, 0) + v
        getattr(self, f"_add_{self.task}")(sample, output)

    # ---------------------------------------------------------------------------- per task
    def _add_instance(self, sample: dict, output: dict, with_masks: bool = True) -> None:
        geo, gt = sample["geometry"], sample["gt"]
        task = "instance" if with_masks else "detection"
        pred = _postprocess(task, output, geo)
        boxes = boxes_to_original(pred["boxes"], geo)
        masks = None
        if with_masks and len(pred["masks"]):
            masks = mask_codec.encode(T.unpad_resize(pred["masks"].numpy(), geo))
        for i in range(len(pred["scores"])):
            self.pred.append({"image_id": gt["image_id"],
                              "category": self.vocab[int(pred["labels"][i])],
                              "score": float(pred["scores"][i]), "box": boxes[i].tolist(),
                              **({"mask": masks[i]} if masks is not None else {})})
        self.gt.append(gt)

    def _add_detection(self, sample: dict, output: dict) -> None:
        self._add_instance(sample, output, with_masks=False)

    def _add_semantic(self, sample: dict, output: dict) -> None:
        geo, gt = sample["geometry"], sample["gt"]
        scores = _postprocess("semantic", output, geo)["scores"]
        self.pred.append(T.unpad_resize(scores.numpy(), geo).argmax(0))
        label_map = np.full((gt["height"], gt["width"]), 255, dtype=np.int64)
        for obj in gt["objects"]:
            if not obj["iscrowd"]:
                label_map[_decoded(obj)] = obj["label"]
        self.gt.append(label_map)

    def _add_panoptic(self, sample: dict, output: dict) -> None:
        geo, gt = sample["geometry"], sample["gt"]
        pred = _postprocess("panoptic", output, geo,
                            is_thing=[self.is_thing[v] for v in self.vocab])
        segments = segments_to_original(pred["segments"], geo)
        self.pred.append([{"category": self.vocab[s["label"]], "mask": segments == s["id"]}
                          for s in pred["info"]])
        self.gt.append([{"category": o["category"], "mask": o["mask"], "iscrowd": o["iscrowd"]}
                        for o in gt["objects"]])

    def _add_referring(self, sample: dict, output: dict) -> None:
        geo, gt = sample["geometry"], sample["gt"]
        masks = T.unpad_resize(_postprocess("referring", output, geo)["masks"].numpy(), geo)
        for obj in gt["objects"]:  # one per expression; label k = expression k
            self.gt.append(obj["mask"])
            self.pred.append(masks[obj["label"]])

    def _add_foreground(self, sample: dict, output: dict) -> None:
        geo, gt = sample["geometry"], sample["gt"]
        prob = _postprocess("foreground", output, geo)["prob"]
        self.pred.append(np.clip(T.unpad_resize(prob[None].numpy(), geo)[0], 0.0, 1.0))
        fg = np.zeros((gt["height"], gt["width"]), dtype=bool)
        for obj in gt["objects"]:
            fg |= _decoded(obj)
        self.gt.append(fg)

    # ---------------------------------------------------------------------------- metrics
    def result(self) -> dict:
        """{"task", "images", "targets", "metrics": {...}, "query_split": {...}}."""
        if self.images == 0:
            raise ValueError(f"no image has ground truth for task {self.task!r}")
        t = self.task
        if t in ("instance", "detection"):
            metrics = M.instance_ap(self.gt, self.pred)
            if t == "detection":
                metrics = {k: v for k, v in metrics.items() if not k.startswith("mask")}
        elif t == "semantic":
            out = M.semantic_miou(self.gt, self.pred, num_classes=len(self.vocab))
            metrics = {"mIoU": out["mIoU"], "pixel_acc": out["pixel_acc"]}
        elif t == "panoptic":
            out = M.panoptic_quality(self.gt, self.pred, self.is_thing)
            metrics = {"PQ": out["all"]["PQ"], "SQ": out["all"]["SQ"], "RQ": out["all"]["RQ"],
                       "PQ_things": out["things"]["PQ"] if out["things"]["n"] else None,
                       "PQ_stuff": out["stuff"]["PQ"] if out["stuff"]["n"] else None}
        elif t == "referring":
            metrics = M.referring_iou(self.gt, self.pred)
        else:
            metrics = {"MSE": M.foreground_mse(self.gt, self.pred)}
        return {"task": t, "images": self.images, "targets": self.targets, "metrics": metrics,
                "query_split": query_split(self.counts)}


def query_split(counts: dict[str, int]) -> dict:
    """Matched counts per query type and kind, plus the paper's two shares (None when no target
    of that kind was matched)."""
    things = counts.get("conditional/thing", 0) + counts.get("learnable/thing", 0)
    stuff = counts.get("conditional/stuff", 0) + counts.get("learnable/stuff", 0)
    return {**counts,
            "conditional_of_things": counts.get("conditional/thing", 0) / things if things
            else None,
            "learnable_of_stuff": counts.get("learnable/stuff", 0) / stuff if stuff else None}
