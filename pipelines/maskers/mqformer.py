"""`mqformer` masker: a trained MQ-Former (`engine train`'s last.pt) as a box-prompted masker.

Method: run the model once per image (all of its boxes share one forward pass) and, for each
prompt box, take the predicted mask whose tight box best matches the prompt box by IoU, then
restrict that mask to the prompt box grown by `margin` (a fraction of its width/height on each
side). Why not the box as a conditional query: MQ-Former's queries come from text-scored encoder
tokens and learned embeddings (model/queries.py); no box prompt or denoising query was ever
trained, so a box fed as a query would be out of distribution, and adding one means editing the
decoder. Matching needs only the model's own outputs.

- Texts: the masker contract carries no category, so the model scores the fixed foreground prompt
  (model.data.FOREGROUND_PROMPT); only the conditional queries' selection depends on it, and the
  matching is geometric.
- Preprocessing and the forward pass are `engine predict`'s (model.predict.predict_sample,
  model.inference.run_model: long side resized to the training input size, padded square, bf16
  autocast on CUDA). Matching uses each query's binary mask (logit > 0) at the model's mask
  resolution (stride 4 of the padded input), its tight box mapped to the original frame by
  model.inference.boxes_to_original. The matched query's logits are then upsampled to the padded
  input, unpadded and resized to the image (bilinear) and thresholded at 0 inside the window.
- Ties in box IoU go to the higher mask score. Two prompt boxes may take the same query.
- Scores: pred_iou = the matched query's mask score as model/postprocess.py instance_inference
  computes it (mean probability inside its binary mask, here the restricted mask); stability =
  segment-anything's stability score of the restricted logits (offset 1.0, pipelines/maskers/
  scores.py).
- A box whose best IoU is 0 (no predicted mask overlaps it) or whose restricted mask is empty has
  no usable prediction: it gets the filled box, named `mqformer:<id>+box-fallback` in
  MaskOutput.origins with NaN scores (filtered as mask_fallback unless --keep-fallback).
- Provenance: `mqformer:<id>`, id = the folder name of the training run (the checkpoint's
  config out_dir), else the checkpoint's file stem.

Measured (bench/flywheel.py, results in bench/results/flywheel.json): the margin is chosen there
by held-out mIoU against exact scene masks.

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
MARGIN = 0.1  # window = box grown by 10% of its side on each side (bench/flywheel.py)


def mask_boxes(binary: np.ndarray, scale: float) -> np.ndarray:
    """(Q, h, w) bool masks -> (Q, 4) XYXY tight boxes in pixels of a frame `scale` times larger
    (a mask pixel j covers [j * scale, (j + 1) * scale)); an empty mask gets a zero box."""
    boxes = np.zeros((len(binary), 4), np.float64)
    for q, mask in enumerate(binary):
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if rows.size:
            boxes[q] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes * scale


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(Q, 4) x (N, 4) XYXY -> (Q, N) IoU; zero-area boxes have IoU 0 with everything."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_boxes(query_boxes: np.ndarray, prompts: np.ndarray,
                scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each prompt box the query whose box has the highest IoU with it (ties: higher score).
    -> (N,) query index, (N,) that IoU."""
    iou = box_iou(query_boxes, prompts)
    best = np.array([np.lexsort((-scores, -iou[:, n]))[0] for n in range(len(prompts))], int)
    return best, iou[best, np.arange(len(prompts))] if len(prompts) else np.zeros(0)


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
        logits = self._mask_logits(image)  # (Q, h, w) at stride 4 of the padded input
        best, iou = self._match(logits, boxes)
        height, width = image.shape[:2]
        crops: list = [None] * len(boxes)
        pred_iou = np.full(len(boxes), np.nan, np.float32)
        stability = pred_iou.copy()
        for q in np.unique(best):
            full = self._to_image(logits[q], height, width)
            for n in np.flatnonzero((best == q) & (iou > 0)):
                rows, cols = window(boxes[n], height, width, self.margin)
                part = full[rows, cols]
                if (part > 0).any():
                    crops[n] = (rows.start, cols.start, part > 0)
                    pred_iou[n], stability[n] = _scores(part)
        return self._with_fallbacks(crops, boxes, height, width, pred_iou, stability)

    def _mask_logits(self, image: np.ndarray) -> torch.Tensor:
        from model.data import FOREGROUND_PROMPT
        from model.inference import run_model
        from model.predict import predict_sample

        sample = predict_sample(image, [FOREGROUND_PROMPT], self.image_size)
        self._geo = sample["geometry"]
        _, output = next(run_model(self.model, [sample], self.device, 1))
        return output["pred_masks"]

    def _match(self, logits: torch.Tensor, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from model.inference import boxes_to_original

        binary = (logits > 0).numpy()
        xyxy = mask_boxes(binary, self.image_size / logits.shape[-1])
        xywh = boxes_to_original(torch.from_numpy(xyxy), self._geo)
        query_boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        prob = logits.sigmoid().numpy()
        score = (prob * binary).reshape(len(prob), -1).sum(1) / (binary.reshape(len(prob), -1)
                                                                 .sum(1) + 1e-6)
        return match_boxes(query_boxes, boxes, score)

    def _to_image(self, logits: torch.Tensor, height: int, width: int) -> np.ndarray:
        """(h, w) logits at stride 4 -> (height, width) float32 logits of the original image."""
        from model import transforms as T
        from model.postprocess import upsample

        size = (self.image_size, self.image_size)
        return T.unpad_resize(upsample(logits[None], size).numpy(), self._geo)[0]

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
    from model.checkpoint import load_checkpoint_file
    from model.inference import load_model

    if checkpoint is None:
        raise ValueError("--masker mqformer needs --mask-checkpoint PATH (an `engine train` "
                         "checkpoint, e.g. runs/mq/last.pt)")
    checkpoint = Path(checkpoint)
    state = load_checkpoint_file(checkpoint)
    try:
        model = load_model(state)
    except (KeyError, TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise ValueError(f"{checkpoint}: the model cannot be rebuilt from this checkpoint "
                         f"({type(exc).__name__}: {first})") from None
    size = int(state["config"].get("data", {}).get("image_size", 512))
    return MQFormerMasker(model, f"mqformer:{run_id(state, checkpoint)}", size, device, margin)
