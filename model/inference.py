"""Model outputs -> per-task predictions at the original image size -> streaming metrics.

    state, model = load_trained(Path("runs/mq/last.pt"))       # verified, rebuilt from its config
    evaluator = Evaluator(task, vocab, is_thing)
    for sample, output in run_model(model, iter_eval_samples(dir, task, size), device, 4):
        evaluator.add(sample, output)
    metrics = evaluator.result()

or all of it, as `engine eval` runs it: evaluate_checkpoint(EvalConfig(checkpoint, data, task)).

Frames: the model sees the (S, S) padded input; the task's record (model/tasks.py) runs its
model/postprocess.py function on that padded input and maps the result back through model/frames.py
to the original (height, width) pixels, where the ground
truth of `model.eval_data.iter_eval_samples` lives. Predicted category names come from the dataset
vocabulary: for instance, detection, semantic and panoptic the sample's text k is the template of
vocab[k] (model/tasks.py plan_targets builds them that way). The metric is the record's streaming
class (model/metrics.py): nothing at full resolution outlives its image.

The evaluator also runs the Hungarian matcher on the final decoder stage against the eval targets
and counts which query type (conditional / learnable) took each thing and stuff target: the paper's
query-type diagnostic, measured on held-out data.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from model.build import build_mqformer
from model.checkpoint import load_checkpoint_file
from model.criterion import count_matches_by_type
from model.eval_data import iter_eval_samples
from model.frames import boxes_to_original, segments_to_original
from model.heads import inference_logits
from model.matcher import HungarianMatcher
from model.mixture import MASK_KINDS
from model.mqformer import MQFormer
from model.shards import ShardSet
from model.tasks import TASKS as TASK_RECORDS
from model.tasks import task_record

TASKS = tuple(TASK_RECORDS)  # the task names (engine flags)
__all__ = ["TASKS", "EvalConfig", "Evaluator", "boxes_to_original", "dataset_categories",
           "evaluate_checkpoint", "input_size", "load_model", "load_trained", "query_split",
           "rebuild_model", "run_model", "segments_to_original"]


def load_model(state: dict) -> MQFormer:
    """An MQFormer rebuilt from a training checkpoint's resolved config, weights loaded, eval mode.

    The backbone checkpoint is not read again: its weights are in state["model"]. A run trained
    with a weight average (--ema-decay) is rebuilt with the averaged weights, state["ema"].
    """
    config = state["config"]
    model = build_mqformer(config["model_size"], text_encoder=config["text_encoder"],
                           queries=config["queries"],
                           text_encoder_path=config.get("text_encoder_path"),
                           **state["model_config"])
    model.load_state_dict(state["ema"]["weights"] if "ema" in state else state["model"])
    return model.eval()


def rebuild_model(state: dict, path: Path) -> MQFormer:
    """load_model, with a config or weights of another model version as one line naming `path`."""
    try:
        return load_model(state)
    except (KeyError, TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise ValueError(f"{path}: the model cannot be rebuilt from this checkpoint "
                         f"({type(exc).__name__}: {first})") from None


def load_trained(path: Path) -> tuple[dict, MQFormer]:
    """The one way a trained model is opened (eval, predict, the mqformer masker): the file
    verified and loaded weights-only (model.checkpoint.load_checkpoint_file), then rebuilt."""
    state = load_checkpoint_file(path)
    return state, rebuild_model(state, path)


def input_size(state: dict, image_size: int | None) -> int:
    """The model's square input side: --image-size, else the one it was trained at."""
    size = image_size or state["config"].get("data", {}).get("image_size", 512)
    if size < 64 or size % 32:
        raise ValueError(f"--image-size must be a multiple of 32 and >= 64, got {size}")
    return size


@dataclass
class EvalConfig:
    """`engine eval`'s options; every check names its flag and runs before any data is read."""

    checkpoint: Path               # an `engine train` checkpoint
    data: Path                     # the shard folder to evaluate on
    task: str                      # a key of model.tasks.TASKS
    image_size: int | None = None  # input side; None: the training run's
    batch_size: int = 4            # images per forward pass
    device: str = "auto"           # auto, cpu, cuda (pipelines.devices.resolve_device)
    masks: tuple[str, ...] = MASK_KINDS  # GT mask provenances
    keep_only: bool = True         # only objects with keep = true
    limit: int | None = None       # only the first N samples
    root: Path | None = None       # image root overriding the data manifest's

    def __post_init__(self):
        if self.task not in TASK_RECORDS:
            raise ValueError(f"--task {self.task!r} is not valid; choose one of: "
                             f"{', '.join(TASK_RECORDS)}")
        for flag, value in (("--batch-size", self.batch_size), ("--limit", self.limit)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        for m in self.masks or ("",):
            if m not in MASK_KINDS:
                raise ValueError(f"--masks {m!r} is not valid; choose one of: "
                                 f"{', '.join(MASK_KINDS)}")
        if not Path(self.checkpoint).is_file():
            raise FileNotFoundError(f"--checkpoint {self.checkpoint} does not exist")
        if self.root is not None and not Path(self.root).is_dir():
            raise FileNotFoundError(f"--root {self.root} is not a folder")


def evaluate_checkpoint(config: EvalConfig) -> dict:
    """Evaluator.result() of a checkpoint on one task of a shard folder, plus checkpoint, step,
    data, image_size and seconds."""
    from pipelines.devices import resolve_device

    device = resolve_device(config.device)
    state = load_checkpoint_file(config.checkpoint)
    size = input_size(state, config.image_size)
    shards = ShardSet(config.data, root=config.root)  # raises when --data is not a readable run
    vocab, is_thing = shards.categories(config.keep_only)
    torch.manual_seed(0)  # the matcher's random points: the same figures on every run
    model = rebuild_model(state, config.checkpoint).to(device)
    evaluator = Evaluator(config.task, vocab, is_thing,
                          num_points=state["config"].get("num_points", 12544))
    samples = iter_eval_samples(config.data, config.task, size, masks=tuple(config.masks),
                                keep_only=config.keep_only, root=config.root)
    start = time.perf_counter()
    for sample, output in run_model(model, islice(samples, config.limit), device,
                                    config.batch_size):
        evaluator.add(sample, output)
    result = evaluator.result()
    result.update(checkpoint=str(config.checkpoint), step=state.get("step"),
                  data=str(config.data), image_size=size, seconds=time.perf_counter() - start)
    return result


def dataset_categories(shards: ShardSet, keep_only: bool) -> tuple[list[str], dict[str, bool]]:
    """(vocabulary as iter_eval_samples builds it, category -> is_thing): ShardSet.categories."""
    return shards.categories(keep_only)


def _batches(samples: Iterable[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def run_model(model: MQFormer, samples: Iterable[dict], device: torch.device | str,
              batch_size: int = 4) -> Iterator[tuple[dict, dict]]:
    """Batches of eval samples through the model -> (sample, output) per sample.

    output: pred_logits (Q, K) against the sample's own texts, pred_masks (Q, h, w) at stride 4,
    pred_boxes (Q, 4) cxcywh in [0, 1] of the padded input (float32, on CPU), and query_types (Q,).
    A softmax model's (class_loss "softmax") pred_logits are converted here, once for eval,
    predict and the mqformer masker: sigmoid(pred_logits) is each text's softmax probability over
    [texts, no-object] (model/heads.py inference_logits), and no pred_noobj is handed on.
    """
    device = torch.device(device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else nullcontext())
    for batch in _batches(samples, batch_size):
        images = torch.stack([s["image"] for s in batch]).to(device)
        with autocast:
            out = model(images, [s["target"]["texts"] for s in batch])
        logits = inference_logits(out)
        for b, sample in enumerate(batch):
            k = len(sample["target"]["texts"])
            yield sample, {"pred_logits": logits[b, :, :k].float().cpu(),
                           "pred_masks": out["pred_masks"][b].float().cpu(),
                           "pred_boxes": out["pred_boxes"][b].float().cpu(),
                           "query_types": out["query_types"].cpu()}


class Evaluator:
    """Accumulates one task's metric image by image (model/metrics.py); result() -> metrics.

    vocab: the dataset's category names (text k of a vocabulary task is vocab[k]); is_thing:
    category -> thing flag (panoptic merging of stuff, PQ things/stuff split). Predictions go
    through the task record's `original()` (model/tasks.py), the path `engine predict` takes.
    """

    def __init__(self, task: str, vocab: list[str], is_thing: dict[str, bool] | None = None,
                 num_points: int = 12544):
        self.record = task_record(task)
        self.task, self.vocab = task, vocab
        self.is_thing = is_thing or dict.fromkeys(vocab, True)
        self.metric = self.record.metric(vocab, self.is_thing)
        self.matcher = HungarianMatcher(num_points=num_points)
        self.images = self.targets = 0
        self.counts: dict[str, int] = {}

    @property
    def gt(self) -> list[dict]:
        """instance / detection: the GT images COCOeval reads (InstanceMetric.gt)."""
        return self.metric.gt

    @property
    def pred(self) -> list[dict]:
        """instance / detection: the predictions COCOeval reads (InstanceMetric.pred)."""
        return self.metric.pred

    def add(self, sample: dict, output: dict) -> None:
        self.images += 1
        self.targets += len(sample["target"]["labels"])
        indices = self.matcher({k: v[None] for k, v in output.items() if k != "query_types"},
                               [sample["target"]])
        for k, v in count_matches_by_type(indices, output["query_types"],
                                          [sample["target"]]).items():
            self.counts[k] = self.counts.get(k, 0) + v
        pred = self.record.original(output, sample["geometry"],
                                    is_thing=[self.is_thing[v] for v in self.vocab])
        self.metric.add(sample["gt"], pred)

    def result(self) -> dict:
        """{"task", "images", "targets", "metrics": {...}, "query_split": {...}}."""
        if self.images == 0:
            raise ValueError(f"no image has ground truth for task {self.task!r}")
        return {"task": self.task, "images": self.images, "targets": self.targets,
                "metrics": self.metric.result(), "query_split": query_split(self.counts)}


def query_split(counts: dict[str, int]) -> dict:
    """Matched counts per query type and kind, plus the paper's two shares (None when no target
    of that kind was matched)."""
    things = counts.get("conditional/thing", 0) + counts.get("learnable/thing", 0)
    stuff = counts.get("conditional/stuff", 0) + counts.get("learnable/stuff", 0)
    return {**counts,
            "conditional_of_things": counts.get("conditional/thing", 0) / things if things
            else None,
            "learnable_of_stuff": counts.get("learnable/stuff", 0) / stuff if stuff else None}
