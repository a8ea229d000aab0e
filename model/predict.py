"""A trained MQ-Former on plain images: the eval path of model/inference.py, without ground truth.

    texts = prompt_texts("instance", classes=["dog", "cat"])
    samples = (predict_sample(pixels, texts, size) for pixels in images)
    for sample, output in inference.run_model(model, samples, device, batch_size):
        pred = to_original("instance", output, sample["geometry"])

Preprocessing is eval's: `model.transforms.geometry` + `prepare_image` (long side resized to the
training input size, padded to a square), class prompts are `model.data.TEMPLATES[0]` of each
name, as `iter_eval_samples` builds them, and the fixed foreground prompt is data's. Outputs go
through the same POSTPROCESSORS and back to the original frame through the same
`transforms.unpad_resize` / `inference.boxes_to_original` / `segments_to_original` as the
Evaluator, so `engine predict` and `engine eval` give one answer for one image.

Matting is referring (with a prompt) or foreground (without) followed by pipelines.matting.refine
on the original image; that step needs the pixels, so it happens where they are (engine/).
"""

from __future__ import annotations

import numpy as np
import torch

from model import transforms as T
from model.inference import TASKS, boxes_to_original, segments_to_original
from model.postprocess import POSTPROCESSORS
from model.targets import FOREGROUND_PROMPT, TEMPLATES

PREDICT_TASKS = (*TASKS, "matting")
VOCAB_TASKS = ("instance", "detection", "semantic", "panoptic")


def prompt_texts(task: str, classes: list[str] | None = None,
                 prompts: list[str] | None = None) -> list[str]:
    """The texts the model scores for `task`: a class template per name (vocabulary tasks), the
    free-form prompts (referring; matting when given), or the foreground prompt (foreground;
    matting without a prompt). Raises ValueError naming the missing flag."""
    if task not in PREDICT_TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(PREDICT_TASKS)}")
    if task in VOCAB_TASKS:
        if not classes:
            raise ValueError(f"--task {task} needs --classes a,b,c (the category names)")
        return [TEMPLATES[0].format(c) for c in classes]
    if task == "referring" and not prompts:
        raise ValueError("--task referring needs --prompt TEXT (the expression to segment)")
    if task == "matting" and prompts and len(prompts) > 1:
        raise ValueError(f"--task matting takes one --prompt, got {len(prompts)}")
    if task in ("referring", "matting") and prompts:
        return list(prompts)
    return [FOREGROUND_PROMPT]


def predict_sample(pixels: np.ndarray, texts: list[str], size: int) -> dict:
    """(H, W, 3) uint8 RGB -> the sample `inference.run_model` takes: {"image": (3, S, S) float,
    "target": {"texts"}, "geometry": T.Geometry}."""
    geo = T.geometry(pixels.shape[0], pixels.shape[1], size)
    return {"image": T.prepare_image(pixels, geo), "target": {"texts": texts}, "geometry": geo}


def _mask_task(task: str, texts: list[str]) -> str:
    """Matting segments the prompted object first: referring with a prompt, else foreground."""
    if task != "matting":
        return task
    return "foreground" if texts == [FOREGROUND_PROMPT] else "referring"


def to_original(task: str, output: dict, geo: T.Geometry, texts: list[str] | None = None,
                is_thing: list[bool] | None = None, top_k: int = 100) -> dict:
    """One sample's model output -> predictions on the original (height, width) image.

    instance:  scores (N,), labels (N,) text index, boxes (N, 4) xywh px, masks (N, h, w) bool
    detection: scores, labels, boxes
    semantic:  labels (h, w) int32 text index (arg-max of the per-text score maps)
    panoptic:  segments (h, w) int32 (0 void, i = info[i-1]["id"]), info [{id, label, score,
               is_thing}]; is_thing per text (None: all things)
    referring: scores (K,), boxes (K, 4) xywh px, masks (K, h, w) bool, one per prompt
    foreground: prob (h, w) float32 in [0, 1], score
    matting:   the referring (prompt) or foreground (no prompt: texts is the foreground prompt)
               result as masks (1, h, w) bool + scores (1,); the alpha is solved later
    """
    kind = _mask_task(task, texts or [])
    size = (geo.size, geo.size)
    options = {"is_thing": is_thing} if kind == "panoptic" else {}
    if kind in ("instance", "detection"):
        options["top_k"] = top_k
    pred = POSTPROCESSORS[kind](output["pred_logits"], output["pred_masks"],
                                output["pred_boxes"], size, **options)
    if kind == "semantic":
        return {"labels": T.unpad_resize(pred["scores"].numpy(), geo).argmax(0).astype(np.int32)}
    if kind == "panoptic":
        return {"segments": segments_to_original(pred["segments"], geo), "info": pred["info"]}
    if kind == "foreground":
        prob = np.clip(T.unpad_resize(pred["prob"][None].numpy(), geo)[0], 0.0, 1.0)
        if task == "matting":
            return {"masks": (prob >= 0.5)[None], "scores": np.array([float(pred["score"])])}
        return {"prob": prob.astype(np.float32), "score": float(pred["score"])}
    out = {"scores": _numpy(pred["scores"]), "boxes": boxes_to_original(pred["boxes"], geo)}
    if kind != "referring":
        out["labels"] = _numpy(pred["labels"]).astype(np.int64)
    if kind != "detection":
        out["masks"] = T.unpad_resize(pred["masks"].numpy(), geo)
    return out


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy()
