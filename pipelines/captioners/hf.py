"""Captions from any transformers image-to-text model in a local folder, on context-padded crops.

Supported families are those that caption an image without a text prompt: BLIP
(BlipForConditionalGeneration), GIT (GitForCausalLM), both through AutoModelForImageTextToText +
AutoProcessor, and VisionEncoderDecoder models (ViT-GPT2 and the like), which ship a tokenizer and
an image processor but no processor class. transformers 5 has no "image-to-text" pipeline any more,
so the model's own `generate` is called directly.

K captions per object come from beam search (num_beams >= K, K returned sequences). The score of a
caption is exp(length-normalised log-probability) in (0, 1]: beam search's `sequences_scores` with
length_penalty=1.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipelines.captioners import Caption
from pipelines.captioners.crops import DEFAULT_MARGIN, context_crops
from pipelines.devices import (
    inference,
    loading,
    place_model,
    read_model_type,
)

log = logging.getLogger(__name__)

MAX_CHARS = 200  # captions are cut at a word boundary below this length


def load_image_captioner(folder: Path) -> tuple[torch.nn.Module, Callable, object]:
    """(model, images -> model inputs, tokenizer) for an image-to-text folder."""
    from transformers import (
        AutoImageProcessor,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
        VisionEncoderDecoderModel,
    )

    folder, model_type = read_model_type(folder, "--captioner hf", "--caption-model")
    if model_type == "florence2":
        raise ValueError(f"{folder} holds a Florence-2 model; use --captioner florence2")
    with loading(f"caption model ({model_type})", folder):
        if model_type == "vision-encoder-decoder":
            model = VisionEncoderDecoderModel.from_pretrained(folder)
            image_processor = AutoImageProcessor.from_pretrained(folder)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        else:
            model = AutoModelForImageTextToText.from_pretrained(folder)
            image_processor = AutoProcessor.from_pretrained(folder)
            tokenizer = image_processor.tokenizer

    def prepare(crops: list[np.ndarray]) -> dict:
        return {"pixel_values": image_processor(images=crops, return_tensors="pt")["pixel_values"]}

    return model.eval(), prepare, tokenizer


def beam_search(model, inputs: dict, k: int, num_beams: int, max_new_tokens: int):
    """generate() with K beams returned per input -> sequences (B*K, T), scores (B*K,) in (0, 1]."""
    out = model.generate(
        **inputs,
        num_beams=max(num_beams, k),
        num_return_sequences=k,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        length_penalty=1.0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    return out.sequences, out.sequences_scores.float().exp().clamp(max=1.0)


def tidy(
    texts: list[str], scores: list[float], provenance: str, max_chars: int = MAX_CHARS
) -> list[Caption]:
    """Strip, collapse spaces, bound length, drop empties and duplicates (case-insensitive);
    best score first."""
    seen, captions = set(), []
    for text, score in sorted(zip(texts, scores, strict=True), key=lambda ts: -ts[1]):
        text = re.sub(r"\s+", " ", text).strip()
        if len(text) > max_chars:
            text = text[:max_chars].rsplit(" ", 1)[0]
        if not text or text.lower() in seen:
            continue
        seen.add(text.lower())
        captions.append(Caption(text=text, provenance=provenance, score=float(score)))
    return captions


class HfCaptioner:
    """Captioner over an image-to-text model: crops -> up to K captions per object.

    batch_size: crops per generate() call (each expands to num_beams rows on the device).
    margin: context around each box (see crops.context_box).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        prepare: Callable,
        tokenizer,
        origin: str,
        captions_per_object: int = 5,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 16,
        max_new_tokens: int = 30,
        margin: float = DEFAULT_MARGIN,
        num_beams: int = 0,
    ) -> None:
        if captions_per_object < 1 or batch_size < 1 or max_new_tokens < 1:
            raise ValueError("captions_per_object, batch_size and max_new_tokens must be >= 1")
        self.model, self.device, self.dtype = place_model(model, device, dtype)
        self.prepare, self.tokenizer, self.origin = prepare, tokenizer, origin
        self.k, self.batch_size, self.max_new_tokens = (
            captions_per_object,
            batch_size,
            max_new_tokens,
        )
        self.margin, self.num_beams = margin, num_beams

    @property
    def uses_gpu(self) -> bool:
        return self.device.type == "cuda"

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, masks: np.ndarray, categories: list[str]
    ) -> list[list[Caption]]:
        """N boxes of one (H, W, 3) RGB image -> N lists of captions, best first."""
        return self.caption_crops(context_crops(image, boxes, self.margin))

    def caption_crops(self, crops: list[np.ndarray]) -> list[list[Caption]]:
        """(h_i, w_i, 3) uint8 crops -> one caption list per crop, in batches."""
        result: list[list[Caption]] = []
        for start in range(0, len(crops), self.batch_size):
            batch = crops[start : start + self.batch_size]
            inputs = {k: v.to(self.device) for k, v in self.prepare(batch).items()}
            with inference(self.device, self.dtype):
                sequences, scores = beam_search(
                    self.model, inputs, self.k, self.num_beams, self.max_new_tokens
                )
            texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
            scores = scores.cpu().tolist()
            for i in range(len(batch)):
                rows = slice(i * self.k, (i + 1) * self.k)
                result.append(tidy(texts[rows], scores[rows], self.origin))
        return result


def build_hf_captioner(folder: Path | None, **kwargs) -> HfCaptioner:
    """Load the folder; provenance is `hf:<folder name>` (e.g. hf:blip-image-captioning-base)."""
    model, prepare, tokenizer = load_image_captioner(folder)
    return HfCaptioner(model, prepare, tokenizer, origin=f"hf:{Path(folder).name}", **kwargs)
