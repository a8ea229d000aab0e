"""Box-prompted SAM and SAM 2 through transformers' own implementations (no extra install).

`--masker hf-sam` loads a `SamModel` folder (e.g. a copy of facebook/sam-vit-huge), `--masker sam2`
a `Sam2Model` folder (e.g. facebook/sam2.1-hiera-large), each saved with its processor. As with
the segment-anything masker, the vision encoder runs once per image and the image's boxes are
decoded together in chunks; the best multimask candidate is picked on the low-resolution logits
and only it is upsampled. Scores are the same as the `sam` masker's (see maskers/scores.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from pipelines.devices import (
    inference,
    loading,
    place_model,
    read_model_type,
)
from pipelines.maskers import MaskOutput
from pipelines.maskers.sam import MAX_CHUNK_PIXELS, check_prompt
from pipelines.maskers.scores import encode_chunk, pick_best, stability_scores
from pipelines.masksets import RleMasks

log = logging.getLogger(__name__)

# --masker name -> config.json model_type it loads
FAMILIES: dict[str, str] = {"hf-sam": "sam", "sam2": "sam2"}


def _classes(model_type: str) -> tuple[type, type]:
    from transformers import Sam2Model, Sam2Processor, SamModel, SamProcessor

    return {"sam": (SamModel, SamProcessor), "sam2": (Sam2Model, Sam2Processor)}[model_type]


def check_model_dir(folder: Path | None, masker: str) -> Path:
    """The folder exists and holds a transformers model of the family `masker` loads."""
    folder, model_type = read_model_type(folder, f"--masker {masker}", "--mask-model")
    if model_type != FAMILIES[masker]:
        other = [name for name, kind in FAMILIES.items() if kind == model_type]
        hint = (
            f"use --masker {other[0]}"
            if other
            else f"--masker {masker} needs model_type {FAMILIES[masker]!r}"
        )
        raise ValueError(f"{folder} holds a {model_type!r} model, not {FAMILIES[masker]!r}; {hint}")
    return folder


def load_hf_sam(folder: Path, masker: str) -> tuple[torch.nn.Module, object]:
    """(model in eval mode, processor) from a checked folder; load failures name the folder."""
    model_cls, processor_cls = _classes(FAMILIES[masker])
    with loading(f"{masker} model", folder):
        model = model_cls.from_pretrained(folder)
        processor = processor_cls.from_pretrained(folder)
    return model.eval(), processor


class HfSamMasker:
    """Masker over a transformers SamModel / Sam2Model and its processor.

    Options as SamMasker: multimask, min_region_area, box_chunk.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor,
        origin: str,
        device: str = "auto",
        dtype: str = "auto",
        multimask: bool = True,
        min_region_area: int = 0,
        box_chunk: int = 64,
    ) -> None:
        if box_chunk < 1:
            raise ValueError(f"box_chunk must be >= 1, got {box_chunk}")
        self.model, self.device, self.dtype = place_model(model, device, dtype)
        self.processor = processor
        self.origin = origin
        self.multimask = multimask
        self.min_region_area = min_region_area
        self.box_chunk = box_chunk
        self.is_sam2 = model.config.model_type == "sam2"

    @property
    def uses_gpu(self) -> bool:
        return self.device.type == "cuda"

    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> MaskOutput:
        """image (H, W, 3) uint8 RGB, boxes (N, 4) XYXY pixels -> N masks (H, W) and scores."""
        boxes, nothing = check_prompt(image, boxes)
        if nothing is not None:
            return nothing
        height, width = image.shape[:2]
        # The processor resizes the image and maps the boxes into the model's input frame.
        inputs = self.processor(images=image, input_boxes=[boxes.tolist()], return_tensors="pt")
        chunk = max(1, min(self.box_chunk, MAX_CHUNK_PIXELS // (height * width)))
        with inference(self.device, self.dtype):
            pixels = inputs["pixel_values"].to(self.device)
            embeddings = self.model.get_image_embeddings(pixels)
            input_boxes = inputs["input_boxes"].to(self.device)  # (1, N, 4) model frame
            parts = [
                self._decode(embeddings, input_boxes[:, i : i + chunk], inputs)
                for i in range(0, len(boxes), chunk)
            ]
        masks = RleMasks(height, width, [m for p in parts for m in p[0]])
        pred_iou = np.concatenate([p[1] for p in parts]).astype(np.float32)
        stability = np.concatenate([p[2] for p in parts]).astype(np.float32)
        return MaskOutput(masks=masks, pred_iou=pred_iou, stability=stability)

    def _decode(self, embeddings, input_boxes: torch.Tensor, inputs) -> tuple[np.ndarray, ...]:
        """(1, n, 4) boxes in the model frame -> n RLE masks, pred IoU (n,), stability (n,)."""
        out = self.model(
            image_embeddings=embeddings, input_boxes=input_boxes, multimask_output=self.multimask
        )
        best_iou, best = pick_best(out.iou_scores[0].float(), out.pred_masks[0].float())
        sizes = [inputs["original_sizes"]]
        if not self.is_sam2:  # SAM's processor also needs the pre-padding resized size
            sizes.append(inputs["reshaped_input_sizes"])
        logits = self.processor.post_process_masks(best[None, :, None], *sizes, binarize=False)
        logits = logits[0][:, 0].float()  # (n, H, W)
        stability = stability_scores(logits, 0.0)
        masks = logits > 0.0  # both families threshold logits at 0
        encoded = encode_chunk(masks.cpu().numpy(), self.min_region_area)
        return encoded, best_iou.cpu().numpy(), stability.cpu().numpy()


def build_hf_sam_masker(folder: Path | None, masker: str, **kwargs) -> HfSamMasker:
    """Check and load the folder; provenance is `<masker>:<folder name>` (sam2:sam2.1-large)."""
    folder = check_model_dir(folder, masker)
    model, processor = load_hf_sam(folder, masker)
    return HfSamMasker(model, processor, origin=f"{masker}:{folder.name}", **kwargs)
