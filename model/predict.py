"""A trained MQ-Former on plain images: the eval path of model/inference.py, without ground truth.

    texts = prompt_texts("instance", classes=["dog", "cat"])
    samples = (predict_sample(pixels, texts, size) for pixels in images)
    for sample, output in inference.run_model(model, samples, device, batch_size):
        pred = to_original("instance", output, sample["geometry"])

Preprocessing is eval's: `model.transforms.geometry` + `prepare_image` (long side resized to the
training input size, padded to a square), class prompts are `model.targets.TEMPLATES[0]` of each
name, as `iter_eval_samples` builds them, and the fixed foreground prompt is data's. Outputs go
through the task record's `original()` (model/tasks.py: the task's inference, then model/frames.py
back to the original frame), the Evaluator's path, so `engine predict` and `engine eval` give one
answer for one image.

Matting is referring (with a prompt) or foreground (without) followed by pipelines.matting.refine
on the original image; that step needs the pixels, so it happens where they are (engine/).
"""

from __future__ import annotations

import numpy as np

from model import transforms as T
from model.targets import FOREGROUND_PROMPT, TEMPLATES
from model.tasks import TASKS, VOCAB_TASKS

PREDICT_TASKS = (*TASKS, "matting")


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

    Every task but matting is its record's `original()` (model/tasks.py lists the fields; is_thing
    per text, None: all things). matting: the referring (prompt) or foreground (no prompt: texts is
    the foreground prompt) result as masks (1, h, w) bool + scores (1,); the alpha is solved later.
    """
    kind = _mask_task(task, texts or [])
    pred = TASKS[kind].original(output, geo, is_thing=is_thing, top_k=top_k)
    if task == "matting" and kind == "foreground":
        return {"masks": (pred["prob"] >= 0.5)[None], "scores": np.array([pred["score"]])}
    return pred
