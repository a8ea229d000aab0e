"""Object -> captions. Each captioner is built once (models load in the builder) and called per
image.

Contract of a captioner call:
    captioner(image, boxes, masks, categories) -> list[list[Caption]]
    image: (H, W, 3) uint8 RGB.
    boxes: (N, 4) float64 XYXY absolute pixels (clipped); masks: a mask set of N masks
    (pipelines/masksets.py: `shape`, `[i]`, `region(i, rows, cols)`; the pipeline passes RleMasks,
    so memory stays bounded however many boxes an image has) or an (N, H, W) bool array;
    categories: N texts. Returns N lists of captions, deduplicated, best first. Each Caption
    carries its provenance (e.g. "template", "hf:blip-base") and a score (None when the method
    has none).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Caption:
    text: str
    provenance: str
    score: float | None = None

    def to_dict(self) -> dict:
        return {"text": self.text, "provenance": self.provenance, "score": self.score}


class Captioner(Protocol):
    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, masks: np.ndarray, categories: list[str]
    ) -> list[list[Caption]]: ...


@dataclass
class CaptionerConfig:
    """Options of the captioner stage (the CLI fills these from flags of the same names)."""

    name: str = "template"
    caption_model: Path | None = None
    captions_per_object: int = 5
    device: str = "auto"
    dtype: str = "auto"  # model captioners: auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    caption_batch_size: int = 16  # model captioners: objects per generate() call
    caption_max_tokens: int = 30  # model captioners: new tokens per caption
    caption_margin: float = 0.15  # hf: context around each box, as a fraction of its size
    caption_beams: int = 0  # model captioners: beam width (at least captions_per_object)


def _template(cfg: CaptionerConfig) -> Captioner:
    from pipelines.captioners.template import TemplateCaptioner

    return TemplateCaptioner(max_captions=cfg.captions_per_object)


def _none(cfg: CaptionerConfig) -> Captioner:
    return lambda image, boxes, masks, categories: [[] for _ in categories]


def _model_options(cfg: CaptionerConfig) -> dict:
    return dict(captions_per_object=cfg.captions_per_object, device=cfg.device, dtype=cfg.dtype,
                batch_size=cfg.caption_batch_size, max_new_tokens=cfg.caption_max_tokens,
                num_beams=cfg.caption_beams)


def _hf(cfg: CaptionerConfig) -> Captioner:
    from pipelines.captioners.hf import build_hf_captioner

    return build_hf_captioner(cfg.caption_model, margin=cfg.caption_margin, **_model_options(cfg))


def _florence2(cfg: CaptionerConfig) -> Captioner:
    from pipelines.captioners.florence2 import build_florence2_captioner

    return build_florence2_captioner(cfg.caption_model, **_model_options(cfg))


CAPTIONERS: dict[str, Callable[[CaptionerConfig], Captioner]] = {
    "template": _template,
    "none": _none,
    "hf": _hf,
    "florence2": _florence2,
}


def build_captioner(cfg: CaptionerConfig) -> Captioner:
    from pipelines.registry import resolve

    return resolve(CAPTIONERS, cfg.name, "captioner")(cfg)
