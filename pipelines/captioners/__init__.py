"""Object -> captions. Each captioner is built once (models load in the builder) and called per
image.

Contract of a captioner call:
    captioner(image, boxes, masks, categories) -> list[list[Caption]]
    image: (H, W, 3) uint8 RGB.
    boxes: (N, 4) float64 XYXY absolute pixels (clipped); masks: (N, H, W) bool; categories: N
    texts. Returns N lists of captions, deduplicated, best first. Each Caption carries its
    provenance (e.g. "template", "hf:blip-base") and a score (None when the method has none).
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


def _template(cfg: CaptionerConfig) -> Captioner:
    from pipelines.captioners.template import TemplateCaptioner

    return TemplateCaptioner(max_captions=cfg.captions_per_object)


def _none(cfg: CaptionerConfig) -> Captioner:
    return lambda image, boxes, masks, categories: [[] for _ in categories]


CAPTIONERS: dict[str, Callable[[CaptionerConfig], Captioner]] = {
    "template": _template,
    "none": _none,
}


def build_captioner(cfg: CaptionerConfig) -> Captioner:
    if cfg.name not in CAPTIONERS:
        raise ValueError(f"unknown captioner {cfg.name!r}; choose one of: {', '.join(CAPTIONERS)}")
    return CAPTIONERS[cfg.name](cfg)
