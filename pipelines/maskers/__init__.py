"""Box -> mask. Each masker is a callable built once (models load in the builder) and called per
image.

Contract of a masker call:
    masker(image, boxes) -> MaskOutput
    image: (H, W, 3) uint8 RGB.
    boxes: (N, 4) float64 XYXY in absolute pixels of `image`, already clipped to it, each with w,
    h > 0.
    MaskOutput.masks: N masks at full image resolution, as a mask set (pipelines/masksets.py:
        CropMasks for methods that stay inside the box, RleMasks for chunks encoded as soon as
        they are made) or an (N, H, W) bool array; a mask set keeps memory bounded by the chunk,
        not by the number of boxes.
    MaskOutput.pred_iou / .stability: (N,) float32, NaN where the method has no such score.
    MaskOutput.origins: None when every mask is the method's own output, else one provenance per
        mask; a substitute is named as such, e.g. "grabcut+ellipse-fallback" (never masker.origin).
`masker.origin` is the provenance written to `mask_origin` (e.g. "grabcut", "sam:vit_h").

`MASKERS` maps each `--masker` name to a builder taking a MaskerConfig. Builders import lazily so
that a weights-free run never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass
class MaskOutput:
    masks: np.ndarray
    pred_iou: np.ndarray
    stability: np.ndarray
    origins: list[str] | None = None

    def dense(self) -> np.ndarray:
        """The masks as one (N, H, W) bool array (tests and small callers; the pipeline keeps the
        mask set so memory stays bounded)."""
        from pipelines.masksets import stack

        return stack(self.masks, list(range(len(self.masks))))

    @classmethod
    def unscored(cls, masks: np.ndarray, origins: list[str] | None = None) -> MaskOutput:
        nan = np.full(len(masks), np.nan, dtype=np.float32)
        return cls(masks=masks, pred_iou=nan, stability=nan.copy(), origins=origins)


class Masker(Protocol):
    origin: str

    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> MaskOutput: ...


def batch_images(masker: Masker) -> int:
    """How many images the worker hands `masker.embed` ahead of their calls (1: no `embed`).
    Only SAM has it (`--sam-batch-images`): its image encoder takes a batch of images."""
    return getattr(masker, "batch_images", 1) if hasattr(masker, "embed") else 1


@dataclass
class MaskerConfig:
    """Options of the masker stage (the CLI fills these from flags of the same names)."""

    name: str = "grabcut"
    sam_checkpoint: Path | None = None
    sam_model: str = "vit_b"
    mask_model: Path | None = None
    device: str = "auto"
    grabcut_iterations: int = 3
    # compute dtype of model maskers: auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    dtype: str = "auto"
    multimask: bool = True  # SAM family: keep the best of 3 candidates by predicted IoU
    min_region_area: int = 0  # SAM family: fill holes / drop islands below this many pixels
    box_chunk: int = 64  # SAM family: most boxes decoded together per image
    sam_sdpa: bool = False  # sam: fused attention in the image encoder (same masks, faster on GPU)
    sam_compile: bool = False  # sam: torch.compile the image encoder (first image pays compile)
    sam_batch_images: int = 1  # sam: most images of a unit per encoder call (GPU; 1 on CPU)
    mask_checkpoint: Path | None = None  # mqformer: an `engine train` checkpoint (last.pt)


def _box(cfg: MaskerConfig) -> Masker:
    from pipelines.maskers.box import BoxMasker

    return BoxMasker()


def _grabcut(cfg: MaskerConfig) -> Masker:
    from pipelines.maskers.grabcut import GrabCutMasker

    return GrabCutMasker(iterations=cfg.grabcut_iterations)


def _model_options(cfg: MaskerConfig) -> dict:
    return dict(
        device=cfg.device,
        dtype=cfg.dtype,
        multimask=cfg.multimask,
        min_region_area=cfg.min_region_area,
        box_chunk=cfg.box_chunk,
    )


def _sam(cfg: MaskerConfig) -> Masker:
    from pipelines.maskers.sam import build_sam_masker

    return build_sam_masker(
        cfg.sam_checkpoint,
        cfg.sam_model,
        sdpa=cfg.sam_sdpa,
        compile=cfg.sam_compile,
        batch_images=cfg.sam_batch_images,
        **_model_options(cfg),
    )


def _hf_sam(cfg: MaskerConfig) -> Masker:
    from pipelines.maskers.hf_sam import build_hf_sam_masker

    return build_hf_sam_masker(cfg.mask_model, "hf-sam", **_model_options(cfg))


def _sam2(cfg: MaskerConfig) -> Masker:
    from pipelines.maskers.hf_sam import build_hf_sam_masker

    return build_hf_sam_masker(cfg.mask_model, "sam2", **_model_options(cfg))


def _mqformer(cfg: MaskerConfig) -> Masker:
    from pipelines.maskers.mqformer import build_mqformer_masker

    return build_mqformer_masker(cfg.mask_checkpoint, cfg.device)


MASKERS: dict[str, Callable[[MaskerConfig], Masker]] = {
    "grabcut": _grabcut,
    "box": _box,
    "sam": _sam,
    "hf-sam": _hf_sam,
    "sam2": _sam2,
    "mqformer": _mqformer,
}


def build_masker(cfg: MaskerConfig) -> Masker:
    from pipelines.registry import resolve

    return resolve(MASKERS, cfg.name, "masker")(cfg)
