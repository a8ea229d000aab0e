"""`mqformer` masker: a trained MQ-Former (`engine train`'s last.pt) as a box-prompted masker.

Method: run the model once per image (all of its boxes share one forward pass) and, for each
prompt box, take the query whose binary mask has the highest IoU with the filled prompt box, then
keep that mask's pixels inside the box grown by `margin` (a fraction of its width/height per side).
Why not the box as a conditional query: MQ-Former's queries come from text-scored encoder tokens
and learned embeddings (model/queries.py); no box prompt or denoising query was ever trained, so a
box fed as a query would be out of distribution, and adding one means editing the decoder.
Matching needs only the model's own outputs.

Why mask-vs-box IoU and margin 0 (bench/flywheel.py, bench/results/flywheel.json: a tiny model
trained 500 steps on GrabCut masks of 80 scenes, 82 held-out objects, mean IoU vs exact masks):
matching by IoU of the mask's tight box with the prompt box scored 0.414 (margin 0), 0.389 (0.1),
0.348 (no window): one stray pixel stretches a tight box, so a query covering the object plus a
speck elsewhere loses to a worse one. IoU of the mask itself with the filled box scored 0.526
(margin 0) and 0.513 (0.1). The scene boxes are tight, so a margin only lets neighbours in.

- Texts: the masker contract carries no category, so the model scores the fixed foreground prompt
  (model.targets.FOREGROUND_PROMPT); only the conditional queries' selection depends on it, and the
  matching is geometric.
- Preprocessing and the forward pass are `engine predict`'s (model.predict.predict_sample,
  model.inference.run_model: long side resized to the training input size, padded square, bf16
  autocast on CUDA). Matching runs at the model's mask resolution (stride 4 of the padded input):
  a prompt box covers the cells whose centres it holds (at least the one under its centre). The
  matched query's logits are then upsampled to the padded input (bilinear, as postprocess does),
  unpadded and resized to the image, and thresholded at 0 inside the window.
- Ties go to the higher mask score. Two prompt boxes may take the same query.
- Scores: pred_iou = the matched query's mask score as model/postprocess.py instance_inference
  computes it (mean probability inside its binary mask, here the windowed mask); stability =
  segment-anything's stability score of the windowed logits (offset 1.0, pipelines/maskers/
  scores.py).
- A box whose best IoU is 0 (no predicted mask touches it) or whose windowed mask is empty has no
  usable prediction: it gets the filled box, named `mqformer:<id>+box-fallback` in
  MaskOutput.origins, with NaN scores (filtered as mask_fallback unless --keep-fallback).
- Provenance: `mqformer:<id>`, id = the folder name of the training run (the checkpoint's
  config out_dir), else the checkpoint's file stem.

Coordinates: image (H, W, 3) uint8 RGB; boxes (N, 4) XYXY absolute pixels; masks (N, H, W) bool.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipelines.maskers import MaskOutput
from pipelines.maskers.box import box_pixels
from pipelines.masksets import CropMasks

BOX_FALLBACK = "box-fallback"
MARGIN = 0.0  # the window is the box itself: best of 0 / 0.1 / none (bench/flywheel.py)
MATCH_CHUNK = 128  # prompt boxes matched at once: 8 MB of filled boxes at a 512 px input


def box_cells(box: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1) of the cells of a (height, width) grid whose centres lie in the XYXY box
    (grid units); at least the cell under the box's centre, so a box smaller than a cell still
    has one."""
    r0, r1, c0, c1 = box_pixels(height, width, box)
    cy, cx = (box[1] + box[3]) / 2, (box[0] + box[2]) / 2
    if r1 <= r0:
        r0 = min(max(int(cy), 0), height - 1)
        r1 = r0 + 1
    if c1 <= c0:
        c0 = min(max(int(cx), 0), width - 1)
        c1 = c0 + 1
    return r0, r1, c0, c1


def match_masks(binary: np.ndarray, prompts: np.ndarray, scores: np.ndarray,
                chunk: int = MATCH_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """For each prompt box (XYXY in cells of the (h, w) mask grid) the query whose binary mask
    (Q, h, w) has the highest IoU with the filled box (ties: higher score).
    -> (N,) query index, (N,) that IoU.

    Boxes are matched `chunk` at a time: the filled boxes take chunk x h x w floats, not N x h x w
    (1,000 boxes at 512 px were 65 MB). Intersections are sums of 0/1 cells, exact in float32,
    so any chunk size gives the same answer."""
    q, h, w = binary.shape
    flat = binary.reshape(q, -1).astype(np.float32)
    area = flat.sum(1)
    best = np.zeros(len(prompts), int)
    best_iou = np.zeros(len(prompts), np.float32)
    for start in range(0, len(prompts), max(1, chunk)):
        boxes = prompts[start:start + max(1, chunk)]
        inside = np.zeros((len(boxes), h, w), np.float32)
        for n, box in enumerate(boxes):
            r0, r1, c0, c1 = box_cells(box, h, w)
            inside[n, r0:r1, c0:c1] = 1
        inside = inside.reshape(len(boxes), -1)
        inter = flat @ inside.T  # (Q, chunk)
        union = area[:, None] + inside.sum(1)[None, :] - inter
        iou = inter / np.maximum(union, 1)
        for n in range(len(boxes)):
            k = np.lexsort((-scores, -iou[:, n]))[0]
            best[start + n], best_iou[start + n] = k, iou[k, n]
    return best, best_iou


def window(box: np.ndarray, height: int, width: int, margin: float | None):
    """Rows and columns of the box grown by `margin` x its size per side (None: whole image)."""
    if margin is None:
        return slice(0, height), slice(0, width)
    x0, y0, x1, y1 = box
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    r0, r1, c0, c1 = box_pixels(height, width, (x0 - dx, y0 - dy, x1 + dx, y1 + dy))
    return slice(r0, r1), slice(c0, c1)


class MQFormerMasker:
    """Masker over a loaded MQ-Former (or anything with its forward contract: images (B, 3, S, S),
    texts -> pred_logits (B, Q, K), pred_masks (B, Q, S/4, S/4), pred_boxes, query_types)."""

    def __init__(self, model: torch.nn.Module, origin: str, image_size: int,
                 device: str = "auto", margin: float | None = MARGIN):
        from pipelines.devices import configure_threads, resolve_device

        self.device = resolve_device(device)
        configure_threads(self.device)
        self.model = model.to(self.device).eval()
        self.origin, self.image_size, self.margin = origin, image_size, margin

    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> MaskOutput:
        from pipelines.maskers.sam import check_prompt

        boxes, nothing = check_prompt(image, boxes)
        if nothing is not None:
            return nothing
        logits, geo = self._mask_logits(image)  # (Q, h, w) at stride 4 of the padded input
        best, iou = self._match(logits, boxes, geo)
        height, width = image.shape[:2]
        crops: list = [None] * len(boxes)
        pred_iou = np.full(len(boxes), np.nan, np.float32)
        stability = pred_iou.copy()
        for q in np.unique(best):
            full = self._to_image(logits[q], geo)
            for n in np.flatnonzero((best == q) & (iou > 0)):
                rows, cols = window(boxes[n], height, width, self.margin)
                part = full[rows, cols]
                if (part > 0).any():
                    crops[n] = (rows.start, cols.start, part > 0)
                    pred_iou[n], stability[n] = _scores(part)
        return self._with_fallbacks(crops, boxes, height, width, pred_iou, stability)

    def _mask_logits(self, image: np.ndarray):
        """One forward pass -> ((Q, h, w) mask logits, the image's placement in the input)."""
        from model.inference import run_model
        from model.predict import predict_sample
        from model.targets import FOREGROUND_PROMPT

        sample = predict_sample(image, [FOREGROUND_PROMPT], self.image_size)
        _, output = next(run_model(self.model, [sample], self.device, 1))
        return output["pred_masks"], sample["geometry"]

    def _match(self, logits: torch.Tensor, boxes: np.ndarray,
               geo) -> tuple[np.ndarray, np.ndarray]:
        """Prompt boxes -> the mask grid's cells (original px -> resized input px -> stride), then
        match_masks against the queries' binary masks."""
        stride = self.image_size / logits.shape[-1]
        scale = np.array([geo.resized_width / geo.width, geo.resized_height / geo.height] * 2)
        binary = (logits > 0).numpy()
        prob = logits.sigmoid().numpy()
        area = binary.reshape(len(binary), -1).sum(1)
        score = (prob * binary).reshape(len(prob), -1).sum(1) / (area + 1e-6)
        return match_masks(binary, boxes * scale / stride, score)

    def _to_image(self, logits: torch.Tensor, geo) -> np.ndarray:
        """(h, w) logits at stride 4 -> (height, width) float32 logits of the original image."""
        from model import transforms as T
        from model.postprocess import upsample

        size = (self.image_size, self.image_size)
        return T.unpad_resize(upsample(logits[None], size).numpy(), geo)[0]

    def _with_fallbacks(self, crops, boxes, height, width, pred_iou, stability) -> MaskOutput:
        """Boxes without a usable prediction get the filled box, named as a substitute."""
        origins = [self.origin] * len(boxes)
        for n, crop in enumerate(crops):
            if crop is None:
                r0, r1, c0, c1 = box_pixels(height, width, boxes[n])
                crops[n] = (r0, c0, np.ones((r1 - r0, c1 - c0), bool))
                origins[n] = f"{self.origin}+{BOX_FALLBACK}"
        used = origins if any(o != self.origin for o in origins) else None
        return MaskOutput(CropMasks(height, width, crops), pred_iou, stability, used)


def _scores(logits: np.ndarray) -> tuple[float, float]:
    """(mask score, stability) of a mask's logits: mean probability inside the binary mask
    (postprocess.instance_inference's mask score) and segment-anything's stability score."""
    from pipelines.maskers.scores import stability_scores

    binary = logits > 0
    prob = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    score = float(prob[binary].mean())
    stab = float(stability_scores(torch.from_numpy(logits)[None])[0])
    return score, stab


def run_id(state: dict, checkpoint: Path) -> str:
    """The training run's folder name (config out_dir), else the checkpoint's file stem."""
    out_dir = state.get("config", {}).get("out_dir")
    return Path(out_dir).name if out_dir else checkpoint.stem


def build_mqformer_masker(checkpoint: Path | None, device: str = "auto",
                          margin: float | None = MARGIN) -> MQFormerMasker:
    """Load (sha256-checked, weights only) and rebuild the model; one-line errors naming the
    file."""
    from model.inference import load_trained

    if checkpoint is None:
        raise ValueError("--masker mqformer needs --mask-checkpoint PATH (an `engine train` "
                         "checkpoint, e.g. runs/mq/last.pt)")
    checkpoint = Path(checkpoint)
    state, model = load_trained(checkpoint)
    size = int(state["config"].get("data", {}).get("image_size", 512))
    return MQFormerMasker(model, f"mqformer:{run_id(state, checkpoint)}", size, device, margin)
