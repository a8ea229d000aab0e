"""The flags of `engine synthesize`, generated from the config dataclasses they fill.

Each flag's type and default come from its dataclass field (SourceConfig, MaskerConfig,
CaptionerConfig, QualityConfig, SynthesizeConfig), so a default lives in exactly one place; this
module adds only what a person reads: the help text and the `--help` panel. `synthesize_config`
turns parsed flags back into one SynthesizeConfig.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from pipelines.captioners import CAPTIONERS, CaptionerConfig
from pipelines.maskers import MASKERS, MaskerConfig
from pipelines.quality import QualityConfig
from pipelines.sources import SOURCES, SourceConfig
from pipelines.synthesize import EXECUTORS, SynthesizeConfig

# what each flag target is filled into; "cli" flags steer the command itself
TARGETS = {
    "source": SourceConfig,
    "masker": MaskerConfig,
    "captioner": CaptionerConfig,
    "quality": QualityConfig,
    "run": SynthesizeConfig,
}
NESTED = {"source", "masker", "captioner", "quality"}  # SynthesizeConfig fields that are configs
NO_DEFAULT = dataclasses.MISSING  # a dataclass field without a default
UNSET = None  # Flag.default when the dataclass gives the default (no field here defaults to None
# without saying so in its dataclass)


@dataclass(frozen=True)
class Flag:
    """One flag: the dataclass fields it fills (`targets`, e.g. ("masker",)), its help and panel.
    `name` is the parameter (and flag) name when it differs from the field; `default` only for a
    field its dataclass leaves without one."""

    field: str
    targets: tuple[str, ...]
    panel: str
    help: str
    name: str | None = None
    default: Any = UNSET
    decls: tuple[str, ...] = ()

    @property
    def param(self) -> str:
        return self.name or self.field


def _names(choices) -> str:
    return ", ".join(choices)


SOURCE, MODELS, QUALITY, EXECUTION = "Source", "Models", "Quality", "Execution"
M, C, MC = ("masker",), ("captioner",), ("masker", "captioner")
SYNTHESIZE_FLAGS = (
    Flag("name", ("source",), SOURCE, f"Annotation source: {_names(SOURCES)}.", name="source",
         default="demo"),
    Flag("root", ("source",), SOURCE,
         "Dataset root: images (and, for objects365, the annotation files) live under it."),
    Flag("annotations", ("source",), SOURCE,
         "Annotation file (overrides the one found under --root)."),
    Flag("split", ("source",), SOURCE, "Split name, e.g. train or val."),
    Flag("bbox_format", ("source",), SOURCE,
         "hf source: box convention of `objects.bbox` (xywh, xyxy, auto)."),
    Flag("limit", ("run",), SOURCE, "Only the first N images."),
    Flag("name", M, MODELS, f"Box->mask method: {_names(MASKERS)}, or module:builder.",
         name="masker"),
    Flag("name", C, MODELS, f"Captioner: {_names(CAPTIONERS)}, or module:builder.",
         name="captioner"),
    Flag("remask", ("run",), MODELS,
         "Run the masker on objects that already have a ground-truth mask too (kept in gt_mask)."),
    Flag("sam_checkpoint", M, MODELS, "segment-anything checkpoint."),
    Flag("sam_model", M, MODELS, "SAM variant: vit_b, vit_l, vit_h (tiny: tests)."),
    Flag("mask_model", M, MODELS, "transformers SAM/SAM2 folder."),
    Flag("mask_checkpoint", M, MODELS, "mqformer: an `engine train` checkpoint (last.pt)."),
    Flag("caption_model", C, MODELS, "transformers captioner folder."),
    Flag("captions_per_object", C, MODELS, "Captions kept per object."),
    Flag("device", MC, MODELS, "cpu, cuda or auto (models only)."),
    Flag("dtype", MC, MODELS,
         "Model compute dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16."),
    Flag("multimask", M, MODELS,
         "SAM family: pick the best of 3 candidate masks by predicted IoU."),
    Flag("min_region_area", M, MODELS,
         "SAM family: remove islands and fill holes under this many pixels."),
    Flag("box_chunk", M, MODELS, "SAM family: most boxes of one image decoded together."),
    Flag("grabcut_iterations", M, MODELS, "grabcut: GrabCut iterations per box."),
    Flag("sam_sdpa", M, MODELS,
         "sam: fused attention (SDPA) in the image encoder; same masks, faster on GPUs."),
    Flag("sam_compile", M, MODELS,
         "sam: torch.compile the image encoder (the first image pays the compile time)."),
    Flag("sam_batch_images", M, MODELS,
         "sam: most images of a unit embedded by one encoder call; same masks. Helps on GPUs; "
         "keep 1 on CPU (no faster there, more memory)."),
    Flag("caption_batch_size", C, MODELS, "Model captioners: crops per generate() call."),
    Flag("caption_max_tokens", C, MODELS, "Model captioners: most new tokens per caption."),
    Flag("caption_margin", C, MODELS,
         "hf captioner: context around each box, as a fraction of its size."),
    Flag("caption_beams", C, MODELS,
         "Model captioners: beam width, at least --captions-per-object (0: that many)."),
    Flag("min_box_iou", ("quality",), QUALITY,
         "Keep masks whose tight box has at least this IoU with the prompt box."),
    Flag("min_box_fill", ("quality",), QUALITY, "... and cover at least this fraction of the box."),
    Flag("max_components", ("quality",), QUALITY,
         "... and have at most this many connected components (0 = any)."),
    Flag("min_pred_iou", ("quality",), QUALITY,
         "... and a model-predicted IoU of at least this (when the masker predicts one)."),
    Flag("min_stability", ("quality",), QUALITY,
         "... and a stability score of at least this (when the masker gives one)."),
    Flag("keep_fallback", ("quality",), QUALITY,
         "Keep masks a method substituted for its failed output (e.g. grabcut's ellipse; "
         "labelled in mask_origin) instead of filtering them as mask_fallback."),
    Flag("out", ("run",), EXECUTION,
         "Output folder, or file:///abs/path or s3://bucket/prefix (created; a rerun resumes "
         "it; docs/scale.md 'Where --out lives').",
         default=Path("runs/demo")),
    Flag("unit_size", ("run",), EXECUTION,
         "Images per work unit (= per shard); default: chosen from the input size so that small "
         "inputs still give every worker units (64 from 1,024 images up)."),
    Flag("workers", ("run",), EXECUTION, "Parallel workers; 0 = one per CPU or GPU."),
    Flag("executor", ("run",), EXECUTION,
         f"{_names(EXECUTORS)}: auto runs jobs too small for the Ray pool in-process (saying so) "
         "and the rest on Ray workers; ray forces Ray; local is one process without Ray."),
    Flag("ray_address", ("run",), EXECUTION,
         "Join this Ray cluster instead of starting a local one."),
    Flag("gpus_per_worker", ("run",), EXECUTION,
         "GPU share of each Ray worker (its masker and captioner together), e.g. 0.5 for two "
         "workers per GPU; 0 splits the cluster's GPUs evenly over the pool."),
    Flag("overwrite", ("run",), EXECUTION,
         "Replace an output folder written with a different configuration."),
    Flag("verbose", ("cli",), EXECUTION, "Log details.", default=False,
         decls=("--verbose", "-v")),
)


def field_of(target: str, name: str) -> dataclasses.Field:
    fields = {f.name: f for f in dataclasses.fields(TARGETS[target])}
    return fields[name]


def dataclass_default(target: str, name: str) -> Any:
    """The default of field `name` of the `target` dataclass (NO_DEFAULT when it has none)."""
    f = field_of(target, name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _type(flag: Flag) -> Any:
    if flag.targets == ("cli",):
        return type(flag.default)
    return typing.get_type_hints(TARGETS[flag.targets[0]])[flag.field]


def flag_default(flag: Flag) -> Any:
    """The flag's default: its dataclass field's (the one place it is written down), or, for a
    field without one, the flag's own."""
    if flag.targets == ("cli",):
        return flag.default
    default = dataclass_default(flag.targets[0], flag.field)
    if default is NO_DEFAULT:
        return flag.default
    assert flag.default is UNSET, f"{flag.param}: the dataclass already has a default"
    return default


def signature(flags=SYNTHESIZE_FLAGS) -> inspect.Signature:
    """A function signature typer turns into these flags (names, types, defaults, help, panels)."""
    params = []
    for flag in flags:
        option = typer.Option(*flag.decls, help=flag.help, rich_help_panel=flag.panel)
        params.append(inspect.Parameter(
            flag.param, inspect.Parameter.KEYWORD_ONLY,
            default=flag_default(flag), annotation=Annotated[_type(flag), option],
        ))
    return inspect.Signature(params, return_annotation=None)


def synthesize_config(values: dict[str, Any], flags=SYNTHESIZE_FLAGS) -> SynthesizeConfig:
    """The SynthesizeConfig of parsed flag `values` (parameter name -> value; "cli" flags are
    left out)."""
    parts: dict[str, dict[str, Any]] = {target: {} for target in TARGETS}
    for flag in flags:
        for target in flag.targets:
            if target != "cli":
                parts[target][flag.field] = values[flag.param]
    nested = {name: TARGETS[name](**parts[name]) for name in NESTED}
    return SynthesizeConfig(**nested, **parts["run"])
