"""Region captions from Florence-2 given the box: the closest public equivalent of the paper's
"caption given the bounding box" captioner.

transformers (>= 4.56, here 5.24) ships Florence2ForConditionalGeneration natively. The task is
`<REGION_TO_DESCRIPTION>` followed by the box as four location tokens `<loc_N>`, each coordinate
quantised to 1000 bins of the image's width or height (Florence-2's own box quantiser, floor mode).
The whole image is the input, not a crop: the model sees the context and is told where to look.

The vision tower runs once per image; its features are copied into every box's prompt and the
text encoder + decoder run per box, batched (the plain processor + generate path would re-encode
the image for every box).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from pipelines.captioners import Caption
from pipelines.captioners.hf import beam_search, tidy
from pipelines.devices import (
    inference,
    loading,
    place_model,
    read_model_type,
)

log = logging.getLogger(__name__)

TASK = "<REGION_TO_DESCRIPTION>"
BINS = 1000


def location_tokens(box: np.ndarray, width: int, height: int, bins: int = BINS) -> str:
    """XYXY pixel box -> "<loc_x0><loc_y0><loc_x1><loc_y1>", bin = floor(coord / size * bins)."""
    sizes = np.array([width, height, width, height], dtype=np.float64)
    quantised = np.floor(np.asarray(box, dtype=np.float64) / sizes * bins).clip(0, bins - 1)
    return "".join(f"<loc_{int(q)}>" for q in quantised)


def load_florence2(folder: Path | None) -> tuple[torch.nn.Module, object]:
    """(Florence2ForConditionalGeneration in eval mode, Florence2Processor) from a local folder."""
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    folder, model_type = read_model_type(folder, "--captioner florence2", "--caption-model")
    if model_type != "florence2":
        raise ValueError(
            f"{folder} holds a {model_type!r} model, not Florence-2; "
            "use --captioner hf for image-to-text models"
        )
    with loading("Florence-2 model", folder):
        model = Florence2ForConditionalGeneration.from_pretrained(folder)
        processor = AutoProcessor.from_pretrained(folder)
    return model.eval(), processor


class Florence2Captioner:
    """Captioner: up to K region descriptions per box, from beam search over the whole image.

    batch_size: boxes per generate() call (each expands to num_beams rows on the device).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor,
        origin: str,
        captions_per_object: int = 5,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 16,
        max_new_tokens: int = 30,
        num_beams: int = 0,
    ) -> None:
        if captions_per_object < 1 or batch_size < 1 or max_new_tokens < 1:
            raise ValueError("captions_per_object, batch_size and max_new_tokens must be >= 1")
        self.model, self.device, self.dtype = place_model(model, device, dtype)
        self.processor, self.origin = processor, origin
        self.k, self.batch_size, self.max_new_tokens = (
            captions_per_object,
            batch_size,
            max_new_tokens,
        )
        self.num_beams = num_beams

    @property
    def uses_gpu(self) -> bool:
        return self.device.type == "cuda"

    def prompts(self, boxes: np.ndarray, width: int, height: int) -> list[str]:
        return [TASK + location_tokens(box, width, height) for box in boxes]

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, masks: np.ndarray, categories: list[str]
    ) -> list[list[Caption]]:
        """N boxes of one (H, W, 3) RGB image -> N lists of captions, best first."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if len(boxes) == 0:
            return []
        height, width = image.shape[:2]
        prompts = self.prompts(boxes, width, height)
        pixels = self.processor(text=prompts[:1], images=[image], return_tensors="pt")
        result: list[list[Caption]] = []
        with inference(self.device, self.dtype):
            features = self.model.get_image_features(pixels["pixel_values"].to(self.device))
            features = features.pooler_output  # (1, image tokens, d_model)
            for start in range(0, len(prompts), self.batch_size):
                result += self._generate(prompts[start : start + self.batch_size], image, features)
        return result

    def _generate(
        self, prompts: list[str], image: np.ndarray, features: torch.Tensor
    ) -> list[list[Caption]]:
        """Encode each prompt with the shared image features, then beam-search its captions."""
        inputs = self.processor(
            text=prompts, images=[image] * len(prompts), return_tensors="pt", padding=True
        )
        ids = inputs["input_ids"].to(self.device)
        attention = inputs["attention_mask"].to(self.device)
        embeds = self.model.get_input_embeddings()(ids)
        slots = (ids == self.model.config.image_token_id)[..., None]
        shared = features.to(embeds.dtype).expand(len(prompts), -1, -1)
        embeds = embeds.masked_scatter(slots, shared)
        encoded = self.model.get_encoder()(inputs_embeds=embeds, attention_mask=attention)
        sequences, scores = beam_search(
            self.model,
            {"encoder_outputs": encoded, "attention_mask": attention},
            self.k,
            self.num_beams,
            self.max_new_tokens,
        )
        texts = self.processor.batch_decode(sequences, skip_special_tokens=True)
        scores = scores.cpu().tolist()
        return [
            tidy(
                texts[i * self.k : (i + 1) * self.k],
                scores[i * self.k : (i + 1) * self.k],
                self.origin,
            )
            for i in range(len(prompts))
        ]


def build_florence2_captioner(folder: Path | None, **kwargs) -> Florence2Captioner:
    """Load the folder; provenance is `florence2:<folder name>` (florence2:Florence-2-large)."""
    model, processor = load_florence2(folder)
    return Florence2Captioner(model, processor, origin=f"florence2:{Path(folder).name}", **kwargs)
