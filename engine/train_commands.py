"""`engine train` and `engine eval`: flags -> model.train.TrainConfig / model.inference.Evaluator.

    engine train --mixture mix.yaml --out runs/mq --model tiny --steps 200 --text-encoder hashed
    engine eval --checkpoint runs/mq/last.pt --data runs/val --task instance

Every flag is checked before any data is read, and an error names the flag; a bad mix.yaml names the
key (model.mixture). Both raise ValueError/FileNotFoundError, which engine/cli.py's main() turns
into one line and exit code 2.

train writes DIR/last.pt (overwritten at every checkpoint; holds the resolved TrainConfig with the
data options under `data`, so eval can rebuild the model and its input size, and the training
vocabulary, data.vocabulary = {names, isthing}, predict's default classes), DIR/metrics.jsonl and
DIR/tensorboard/. eval prints a table and writes the metrics as JSON (default: next to the
checkpoint, eval-<task>-<data folder name>.json).
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

# torch and the model are imported inside the commands: `engine query` etc. stay fast to start.
console = Console(stderr=True)
CHECKPOINT_NAME = "last.pt"


def _one_of(flag: str, value: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{flag} {value!r} is not valid; choose one of: {', '.join(choices)}")
    return value


def _at_least(flag: str, value: float, low: float) -> None:
    if value < low:
        raise ValueError(f"{flag} must be >= {low}, got {value}")


def _image_size(value: int) -> int:
    if value < 64 or value % 32:
        raise ValueError(f"--image-size must be a multiple of 32 and >= 64, got {value}")
    return value


def _device(value: str) -> str:
    """--device through pipelines.devices.resolve_device (auto -> cuda when visible, else cpu)."""
    from pipelines.devices import resolve_device

    try:
        return str(resolve_device(value))
    except ValueError as exc:
        raise ValueError(f"--device: {exc}") from None


def _assignments(flag: str, items: list[str] | None, defaults: dict) -> dict:
    """Repeated KEY=VALUE flags -> {key: value}: a value is read as JSON (3, 0.5, true, "x") or
    else taken as text, and must have its default's type (an int passes for a float)."""
    chosen: dict = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE")
        if key not in defaults:
            raise ValueError(f"{flag} {key!r} is not valid; choose one of: "
                             f"{', '.join(sorted(defaults))}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        default = defaults[key]
        numeric = isinstance(default, float) and isinstance(value, int) \
            and not isinstance(value, bool)
        if default is not None and type(value) is not type(default) and not numeric:
            raise ValueError(f"{flag} {key}={raw!r}: expected type {type(default).__name__}, like "
                             f"{json.dumps(default)}")
        chosen[key] = float(value) if numeric else value
    return chosen


# ------------------------------------------------------------------------------------------ train
def train_command(
    mixture: Annotated[Path, typer.Option(help="mix.yaml: shard folders, weights, tasks.")],
    out: Annotated[Path, typer.Option(help="Run folder: last.pt, metrics.jsonl, tensorboard/.")],
    model: Annotated[str, typer.Option(help="Size: tiny, r50, swin-t, swin-l.")] = "tiny",
    steps: Annotated[int, typer.Option(help="Optimizer steps (the schedule's length).")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Images per micro-batch.")] = 2,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out exactly.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    queries: Annotated[str, typer.Option(help="mixed, learnable or conditional (ablation).")]
    = "mixed",
    text_encoder: Annotated[str, typer.Option(help="minilm, clip or hashed (tests).")]
    = "minilm",
    text_encoder_path: Annotated[Path | None, typer.Option(help="Local text encoder folder.")]
    = None,
    backbone_checkpoint: Annotated[Path | None, typer.Option(help="Backbone weights.")] = None,
    image_size: Annotated[int, typer.Option(help="Square input side (multiple of 32).")] = 512,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 1e-4,
    warmup: Annotated[int | None, typer.Option(help="Warmup steps (default: steps/10, <=100).")]
    = None,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    grad_clip: Annotated[float, typer.Option(help="Gradient-norm clip (0 = off).")] = 0.01,
    ema_decay: Annotated[float, typer.Option(
        help="Keep a moving average of the weights with this decay (e.g. 0.999, about the last "
             "1000 steps); eval and predict then use it. 0 = off.")] = 0.0,
    num_points: Annotated[int, typer.Option(help="Sampled points for mask cost/loss.")] = 12544,
    log_interval: Annotated[int, typer.Option(help="Steps between metrics.jsonl rows.")] = 10,
    ckpt_interval: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 500,
    stop_after: Annotated[
        int | None,
        typer.Option(help="Stop (and checkpoint) after this step; --resume continues later."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of weights, sampling and augmentation.")] = 0,
    tensorboard: Annotated[bool, typer.Option(help="Also write TensorBoard scalars.")] = True,
    cache_images: Annotated[int, typer.Option(help="Decoded images kept in memory.")] = 256,
    root: Annotated[Path | None, typer.Option(
        help="Image root overriding the manifest's (data moved); one-dataset mixtures only, "
             "else a `root:` key per mix.yaml entry.")] = None,
    model_option: Annotated[list[str] | None, typer.Option(
        metavar="KEY=VALUE",
        help="Override one hyper-parameter of --model (repeatable), e.g. class_loss=softmax, "
             "dn_groups=3, dec_layers=4, shape_masks=true.")] = None,
    loss_weight: Annotated[list[str] | None, typer.Option(
        metavar="NAME=VALUE",
        help="Override one loss weight (repeatable): loss_class (default 4), loss_mask (5), "
             "loss_dice (5), loss_bbox (5), loss_giou (2).")] = None,
) -> None:
    """Train MQ-Former on a weighted mixture of shard folders (mix.yaml)."""
    from model.build import MODEL_SIZES, model_config
    from model.criterion import DEFAULT_WEIGHTS
    from model.loader import MixtureLoader
    from model.mixture import load_mixture
    from model.mqformer import QUERY_MODES
    from model.text import TEXT_ENCODERS
    from model.train import TrainConfig, load_checkpoint, train

    _one_of("--model", model, MODEL_SIZES)
    model_options = _assignments("--model-option", model_option, model_config(model))
    try:
        model_config(model, **model_options)  # values a type check cannot judge (class_loss)
    except ValueError as exc:
        raise ValueError(f"--model-option: {exc}") from None
    loss_weights = _assignments("--loss-weight", loss_weight, DEFAULT_WEIGHTS)
    for name, value in loss_weights.items():
        _at_least(f"--loss-weight {name}", value, 0)
    _one_of("--queries", queries, QUERY_MODES)
    _one_of("--text-encoder", text_encoder, TEXT_ENCODERS)
    for flag, value, low in (("--steps", steps, 1), ("--batch-size", batch_size, 1),
                             ("--grad-accum", grad_accum, 1), ("--num-points", num_points, 1),
                             ("--log-interval", log_interval, 1), ("--grad-clip", grad_clip, 0),
                             ("--ckpt-interval", ckpt_interval, 1), ("--cache-images", cache_images,
                                                                     0)):
        _at_least(flag, value, low)
    if not lr > 0:
        raise ValueError(f"--lr must be > 0, got {lr}")
    if not 0 <= ema_decay < 1:
        raise ValueError(f"--ema-decay must be in [0, 1), got {ema_decay}")
    warmup = min(100, steps // 10) if warmup is None else warmup
    if not 0 <= warmup <= steps:
        raise ValueError(f"--warmup must be in [0, --steps={steps}], got {warmup}")
    if stop_after is not None and not 1 <= stop_after <= steps:
        raise ValueError(f"--stop-after must be in [1, --steps={steps}], got {stop_after}")
    if text_encoder == "clip" and text_encoder_path is None:
        raise ValueError("--text-encoder clip needs --text-encoder-path (a local CLIP folder)")
    for flag, path in (("--text-encoder-path", text_encoder_path),
                       ("--backbone-checkpoint", backbone_checkpoint)):
        if path is not None and not path.exists():
            raise FileNotFoundError(f"{flag} {path} does not exist")
    _image_size(image_size)
    device = _device(device)
    data = {"mixture": str(mixture.resolve()), "image_size": image_size, "batch_size": batch_size,
            "seed": seed}
    _check_run_folder(out, resume)
    mix = load_mixture(mixture)  # every key checked here, before the model is built
    if root is not None:
        _override_root(mix, root)
    config = TrainConfig(
        out_dir=str(out), model_size=model, queries=queries, text_encoder=text_encoder,
        text_encoder_path=None if text_encoder_path is None else str(text_encoder_path),
        backbone_checkpoint=None if backbone_checkpoint is None else str(backbone_checkpoint),
        max_iters=steps, grad_accum=grad_accum, lr=lr, warmup_iters=warmup, grad_clip=grad_clip,
        ema_decay=ema_decay,
        num_points=num_points, log_interval=log_interval, ckpt_interval=ckpt_interval, seed=seed,
        device=device, resume=resume, tensorboard=tensorboard, checkpoint_name=CHECKPOINT_NAME,
        stop_after=stop_after, model_options=model_options, loss_weights=loss_weights, data=data)
    # loaded once, here, so that a bad or mismatched checkpoint fails before the loader is built
    state = load_checkpoint(out / CHECKPOINT_NAME, config) if resume else None
    rank = int(os.environ.get("RANK", "0"))  # under torchrun: each rank draws its own batches
    loader = MixtureLoader(mix, image_size=image_size, batch_size=batch_size, seed=seed + rank,
                           train=True, cache_images=cache_images)
    # Saved with every checkpoint (config["data"]): predict's default --classes.
    config.data["vocabulary"] = loader.vocabulary()
    if rank:
        train(config, loader, resume_state=state)
        return
    for name, n in loader.excluded.items():
        if n:
            console.print(f"{name}: {n} images excluded (also in an evaluation set)")
    last = _train_with_progress(config, loader, functools.partial(train, resume_state=state),
                                batch_size * grad_accum)
    console.print(f"wrote {out / CHECKPOINT_NAME} and {out / 'metrics.jsonl'}")
    if last:
        _print_row("last logged step", last)


def _override_root(mix, root: Path) -> None:
    """--root: the image root of a one-dataset mixture (with several, which one would it be?)."""
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root} is not a folder")
    if len(mix.datasets) != 1:
        raise ValueError(f"--root: {mix.source} lists {len(mix.datasets)} datasets; give each "
                         "its own `root:` key in the mixture file instead")
    mix.datasets[0].root = root.resolve()


def _check_run_folder(out: Path, resume: bool) -> None:
    """Refuse to overwrite a run without --resume. What a resumed run must share with its
    checkpoint is checked where the checkpoint is loaded, once (model.train.load_checkpoint)."""
    ckpt = out / CHECKPOINT_NAME
    if not resume and ckpt.exists():
        raise ValueError(f"--out {out} already holds {CHECKPOINT_NAME}; pass --resume to "
                         "continue it or choose another --out")
    if resume and not ckpt.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint {ckpt}")


def _train_with_progress(config, loader, train_fn, images_per_step: int) -> dict | None:
    columns = (TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    last: dict = {}
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train", total=config.stop_after or config.max_iters,
                                 status="building the model...")
        clock = {"t": None, "first": None}

        def on_step(step: int, row: dict | None) -> None:
            now = time.perf_counter()
            if clock["t"] is None:  # the first step includes start-up: time from its end
                clock["t"], clock["first"] = now, step
            if row is not None:
                last.clear()
                last.update(row)
            done = step - clock["first"]
            rate = done * images_per_step / (now - clock["t"]) if done else 0.0
            loss = last.get("loss")
            status = f"loss {loss:.4f}  " if loss is not None else ""
            progress.update(task, completed=step, status=f"{status}{rate:.1f} images/s")

        train_fn(config, loader, on_step=on_step)
    return last or None


def _print_row(title: str, row: dict) -> None:
    keys = ["step", "loss", "loss_class", "loss_mask", "loss_dice", "loss_bbox", "loss_giou",
            "lr", "images_per_s", "share/conditional_of_things", "share/learnable_of_stuff",
            "class/accuracy", "class/text_cosine", "class/logit_scale"]
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in keys:
        table.add_row(k, _fmt(row.get(k)))
    Console().print(table)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if v == 0 or abs(v) >= 1e-3 else f"{v:.3e}"  # lr, tiny APs
    return str(v)


# ------------------------------------------------------------------------------------------- eval
def eval_command(
    checkpoint: Annotated[Path, typer.Option(help="A checkpoint written by `engine train`.")],
    data: Annotated[Path, typer.Option(help="Shard folder to evaluate on.")],
    task: Annotated[str, typer.Option(help="instance, semantic, panoptic, referring, "
                                           "foreground or detection.")],
    out: Annotated[Path | None, typer.Option(help="JSON file (default: beside the checkpoint).")]
    = None,
    image_size: Annotated[int | None, typer.Option(help="Input side (default: training's).")]
    = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    masks: Annotated[str, typer.Option(help="Ground-truth mask provenances: gt,synthesized.")]
    = "gt,synthesized",
    all_objects: Annotated[bool, typer.Option(help="Include objects with keep = false.")] = False,
    limit: Annotated[int | None, typer.Option(help="Only the first N images.")] = None,
    root: Annotated[Path | None, typer.Option(
        help="Image root overriding the --data manifest's (data moved).")] = None,
) -> None:
    """Evaluate a checkpoint on one task of a shard folder; print and write the metrics."""
    from model.inference import EvalConfig, evaluate_checkpoint

    config = EvalConfig(checkpoint, data, task, image_size, batch_size, device,
                        tuple(m.strip() for m in masks.split(",") if m.strip()),
                        keep_only=not all_objects, limit=limit, root=root)
    result = evaluate_checkpoint(config)
    out = out or checkpoint.parent / f"eval-{task}-{data.resolve().name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)  # atomic: a reader never sees half a metrics file
    _print_eval(result)
    console.print(f"wrote {out}")


def _print_eval(result: dict) -> None:
    table = Table(title=f"{result['task']} on {result['data']} ({result['images']} images, "
                        f"{result['targets']} targets, step {result['step']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result["metrics"].items():
        for name, value in (v.items() if isinstance(v, dict) else [(None, v)]):
            table.add_row(k if name is None else f"{k}: {escape(name)}", _fmt(value))
    for k, v in result["query_split"].items():
        table.add_row(f"query split: {k}", _fmt(v))
    Console().print(table)

