"""Train MQ-Former: one loop that reads top to bottom (nanoGPT-style).

    path = train(TrainConfig(out_dir="runs/x", model_size="tiny", max_iters=100), loader)

`data` is any object that yields batches {"images": (B, 3, H, W), "targets": [dict, ...]} (the
interface in model/mqformer.py; model/data.py's MixtureLoader) and has state_dict() /
load_state_dict() so that a resumed run sees the same batches as an uninterrupted one.

Setup -> optional resume -> loop: lr for this step, grad-accumulated forward/backward (bf16
autocast on CUDA), clip, step, log (JSONL + TensorBoard), checkpoint. Launched by torchrun, it runs
DDP (NCCL on GPUs, gloo on CPU); give each rank its own loader (e.g. seed + rank). Checkpoints hold
the model, optimizer, scheduler, step, RNG and loader states of every rank, the resolved config and
the schema version, and are written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from model.build import build_mqformer, model_config
from model.checkpoint import load_checkpoint_file, save_checkpoint
from model.criterion import SetCriterion
from model.matcher import HungarianMatcher
from model.mqformer import QUERY_MODES
from schemas import SCHEMA_VERSION

log = logging.getLogger(__name__)
CHECKPOINT = "ckpt.pt"


@dataclass
class TrainConfig:
    out_dir: str = "runs/mqformer"     # checkpoints, metrics.jsonl, tensorboard/
    model_size: str = "tiny"           # a key of model.build.MODEL_SIZES
    queries: str = "mixed"             # mixed | learnable | conditional (Table 2 ablation)
    text_encoder: str = "minilm"       # a key of model.text.TEXT_ENCODERS
    text_encoder_path: str | None = None
    backbone_checkpoint: str | None = None
    max_iters: int = 1000              # optimizer steps
    grad_accum: int = 1                # micro-batches per optimizer step
    lr: float = 1e-4                   # Mask DINO: AdamW 1e-4, backbone x0.1, wd 0.05
    backbone_lr_mult: float | None = None  # None: x0.1 for a pretrained backbone (Mask DINO), x1
                                       # for random init (x0.1 left it nearly untrained: issue 11)
    temperature_lr_mult: float = 10.0  # class head's logit scale and bias: scalars that AdamW moves
                                       # by ~lr per step, so at 1e-4 they barely moved (issue 11)
    weight_decay: float = 0.05
    warmup_iters: int = 100
    min_lr_ratio: float = 0.1          # cosine decays to lr * min_lr_ratio at max_iters
    grad_clip: float = 0.01            # full-model grad-norm clip (Mask DINO); 0 = off
    ema_decay: float = 0.0             # > 0: keep an exponential moving average of the weights
                                       # (checkpoint["ema"]), which eval and predict then use;
                                       # 0 = off
    num_points: int = 12544            # points for mask cost and loss
    full_mask_loss: bool = False       # mask losses on every stride-4 pixel instead of points
    log_interval: int = 10
    ckpt_interval: int = 500
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda
    resume: bool = False               # continue from out_dir/<checkpoint_name>
    tensorboard: bool = True
    checkpoint_name: str = CHECKPOINT  # file name of the (single, overwritten) checkpoint
    stop_after: int | None = None      # stop (and checkpoint) after this step; the schedule still
                                       # runs to max_iters, so a run can be split across jobs
    model_options: dict = field(default_factory=dict)  # overrides of the size variant's
                                       # hyper-parameters (model.build.model_config), e.g.
                                       # {"dn_groups": 3}; kept in the checkpoint's model_config
    loss_weights: dict = field(default_factory=dict)  # overrides of criterion.DEFAULT_WEIGHTS
    data: dict = field(default_factory=dict)  # the data side's resolved config (image size,
                                       # mixture...), kept in checkpoints for eval / reproduction

    def __post_init__(self):
        model_config(self.model_size, **self.model_options)  # raises with the valid names
        if self.backbone_lr_mult is None:
            self.backbone_lr_mult = 0.1 if self.backbone_checkpoint else 1.0
        for name in ("backbone_lr_mult", "temperature_lr_mult"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.queries not in QUERY_MODES:
            raise ValueError(f"queries={self.queries!r}; choose one of: {', '.join(QUERY_MODES)}")
        for name in ("max_iters", "grad_accum", "log_interval", "ckpt_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_iters <= self.max_iters:
            raise ValueError(f"warmup_iters={self.warmup_iters} must be in [0, max_iters]")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r}; choose one of: auto, cpu, cuda")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1)")
        if self.stop_after is not None and not 1 <= self.stop_after <= self.max_iters:
            raise ValueError(f"stop_after={self.stop_after} must be in [1, max_iters]")


def get_lr(it: int, config: TrainConfig) -> float:
    """Learning rate factor at optimizer step `it`: linear warmup, then cosine to min_lr_ratio."""
    if it < config.warmup_iters:
        return (it + 1) / (config.warmup_iters + 1)
    progress = (it - config.warmup_iters) / max(1, config.max_iters - config.warmup_iters)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


TEMPERATURE_PARAMS = ("heads.cls.logit_scale", "heads.cls.bias")


def param_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """Backbone at lr x backbone_lr_mult, the class head's temperature and bias at lr x
    temperature_lr_mult; no weight decay on biases, norms, scales, embeddings. Groups are keyed by
    part, not by multiplier, so the optimizer's layout is the same whatever the multipliers."""
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and "learnable." not in name  # embeddings are 2-D but not decayed
        part = ("backbone" if name.startswith("backbone.")
                else "temperature" if name in TEMPERATURE_PARAMS else "rest")
        groups.setdefault((part, decay), []).append(p)
    mult = {"backbone": config.backbone_lr_mult, "temperature": config.temperature_lr_mult,
            "rest": 1.0}
    return [{"params": ps, "lr": config.lr * mult[part],
             "weight_decay": config.weight_decay if decay else 0.0}
            for (part, decay), ps in groups.items()]


class WeightAverage:
    """An exponential moving average of a model's floating-point parameters and buffers.

    The decay ramps up as min(decay, (1 + t) / (10 + t)) over the first updates: with a fixed
    decay the random initial weights would keep a share of decay^t (1% after 4,600 updates at
    0.999). Integer buffers are copied as they are.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        floats, targets = [], []
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                floats.append(self.state[k])
                targets.append(v.detach())
            else:
                self.state[k].copy_(v)
        torch._foreach_lerp_(floats, targets, 1.0 - decay)

    def state_dict(self) -> dict:
        return {"weights": self.state, "updates": self.updates}

    def load_state_dict(self, saved: dict) -> None:
        for k, v in saved["weights"].items():
            self.state[k].copy_(v)
        self.updates = int(saved["updates"])


def rng_state() -> dict:
    """torch/CUDA/numpy/python RNG states in types that torch.load(weights_only=True) accepts."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [int(pos), int(has_gauss), float(cached)],
            "numpy_keys": torch.from_numpy(keys.astype(np.int64)), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos,
                         has_gauss, cached))
    random.setstate(state["python"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather(obj, world: int) -> list:
    """Every rank's `obj` (for per-rank RNG and loader states); [obj] without DDP."""
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _setup_distributed(config: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK."""
    want_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


# What a resumed run must share with its checkpoint (the flag named in the error): the model it
# builds, and the data options that decide its batches.
RESUME_KEYS = {"model_size": "--model", "queries": "--queries", "text_encoder": "--text-encoder",
               "model_options": "model options (--model-option)",
               "loss_weights": "loss weights (--loss-weight)", "ema_decay": "--ema-decay"}
RESUME_DATA_KEYS = {"image_size": "--image-size", "batch_size": "--batch-size", "seed": "--seed"}


def load_checkpoint(path: Path, config: TrainConfig) -> dict:
    """The checkpoint to resume from, once (checksum checked), refused with one line naming the
    option when this run asks for another model or other batches."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint {path}")
    state = load_checkpoint_file(path)
    saved = state["config"]
    defaults = {"model_options": {}, "loss_weights": {}, "ema_decay": 0.0}  # older checkpoints
    pairs = [(flag, saved.get(key, defaults.get(key)), getattr(config, key))
             for key, flag in RESUME_KEYS.items()]
    saved_data = saved.get("data", {})
    pairs += [(flag, saved_data[key], config.data[key]) for key, flag in RESUME_DATA_KEYS.items()
              if key in saved_data and key in config.data]
    for flag, was, now in pairs:
        if was != now:
            raise ValueError(f"--resume: {path} was trained with {flag} {was}, this run asks "
                             f"for {now} (the model or its batches would differ)")
    return state


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows of metrics.jsonl up to `step` (the checkpoint the run starts from; 0 on a
    fresh start): the run redoes every later step, so an attempt killed after logging them must not
    leave duplicates. A torn line (a kill mid-write) and any other unreadable line are dropped.
    Rewritten atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row_step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        if isinstance(row_step, int) and row_step <= step:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class MetricLog:
    """Running sums between log lines; writes metrics.jsonl (and TensorBoard) on rank 0."""

    def __init__(self, out_dir: Path, tensorboard: bool, start_step: int = 0):
        self.path = out_dir / "metrics.jsonl"
        truncate_metrics(self.path, start_step)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge what a killed attempt logged after the checkpoint (all of it on a fresh start)
            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.n, self.images, self.start = 0, 0, time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor], counts: dict[str, int], images: int) -> None:
        for k, v in losses.items():
            if k.startswith("loss") and not k[-1].isdigit() and not k.endswith("_interm") \
                    and "_dn" not in k:
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        self.n += 1
        self.images += images

    def write(self, step: int, lr: float, extra: dict | None = None) -> dict:
        elapsed = time.perf_counter() - self.start
        row = {"step": step, "lr": lr, "s_per_step": elapsed / max(self.n, 1),
               "images_per_s": self.images / max(elapsed, 1e-9)}
        row.update({k: v / max(self.n, 1) for k, v in self.sums.items()})
        row.update({f"matched/{k}": v for k, v in self.counts.items()
                    if not k.startswith("class/")})
        # the text classifier's health (issue 11): None when the interval had nothing to measure
        c = self.counts
        row["class/accuracy"] = c["class/correct"] / c["class/total"] \
            if c.get("class/total") else None
        row["class/text_cosine"] = c["class/cosine_sum"] / c["class/cosine_n"] \
            if c.get("class/cosine_n") else None
        row.update(extra or {})
        things = self.counts.get("conditional/thing", 0) + self.counts.get("learnable/thing", 0)
        stuff = self.counts.get("conditional/stuff", 0) + self.counts.get("learnable/stuff", 0)
        # the paper's diagnostic: share of things taken by conditional queries, of stuff by
        # learnable ones
        row["share/conditional_of_things"] = self.counts.get("conditional/thing", 0) / things \
            if things else None
        row["share/learnable_of_stuff"] = self.counts.get("learnable/stuff", 0) / stuff \
            if stuff else None
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and v is not None:
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()
        self.reset()
        return row

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def classifier_state(model) -> dict:
    """The class head's temperature and bias (logits = exp(s) * cos + b), as metrics."""
    head = model.heads.cls
    return {"class/logit_scale": float(head.scale().detach()),
            "class/bias": float(head.bias.detach())}


def _micro_step(model, criterion, batch: dict, device: torch.device, scale: float):
    """Forward + loss + backward of one micro-batch -> (losses, counts). Loss is scaled by
    1 / grad_accum so the accumulated gradient is the mean over micro-batches."""
    images = batch["images"].to(device, non_blocking=True)
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()}
               for t in batch["targets"]]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else nullcontext())
    with autocast:  # targets feed the denoising queries (when the model has them)
        outputs = model(images, [t["texts"] for t in targets], targets)
    losses, counts = criterion(outputs, targets)  # float32 outside autocast
    (losses["loss"] * scale).backward()
    return {k: v.detach() for k, v in losses.items()}, counts


def train(config: TrainConfig, data,
          on_step: Callable[[int, dict | None], None] | None = None,
          resume_state: dict | None = None) -> Path:
    """Run training; returns the path of the final checkpoint (out_dir/<checkpoint_name>).

    resume_state: the checkpoint load_checkpoint already returned (the CLI loads it before it
    builds the loader, so a bad checkpoint fails first); loaded here when None.

    on_step(step, row), on rank 0 after every optimizer step: row is the metrics.jsonl row when
    the step was logged, else None (progress bars).
    """
    rank, world, device = _setup_distributed(config)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / config.checkpoint_name
    torch.manual_seed(config.seed)  # same initial weights on every rank
    model = build_mqformer(config.model_size, text_encoder=config.text_encoder,
                           queries=config.queries, backbone_checkpoint=config.backbone_checkpoint,
                           text_encoder_path=config.text_encoder_path,
                           **config.model_options).to(device)
    criterion = SetCriterion(HungarianMatcher(num_points=config.num_points),
                             weights=config.loss_weights, num_points=config.num_points,
                             full_mask=config.full_mask_loss)
    # fused: one kernel for every parameter instead of a dozen ops each (5x faster on CPU)
    optimizer = torch.optim.AdamW(param_groups(model, config), lr=config.lr,
                                  fused=device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: get_lr(it, config))
    average = WeightAverage(model, config.ema_decay) if config.ema_decay > 0 else None
    step = 0
    if config.resume:
        state = resume_state if resume_state is not None else load_checkpoint(ckpt_path, config)
        model.load_state_dict(state["model"])
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as exc:  # parameter groups of another layout (an older engine)
            raise ValueError(f"resume: {ckpt_path}: its optimizer state does not fit this "
                             f"engine's parameter groups ({exc}); start a new --out") from exc
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        set_rng_state(state["rng"][rank])
        data.load_state_dict(state["data"][rank])
        if average is not None:
            if "ema" not in state:
                raise ValueError(f"--resume: {ckpt_path} was trained without a weight average; "
                                 "resume it without --ema-decay, or start a new --out")
            average.load_state_dict(state["ema"])  # load_checkpoint checked ema_decay
        log.info("resumed from %s at step %d", ckpt_path, step)
    else:
        torch.manual_seed(config.seed + rank)  # different mask points per rank from here on
    ddp = None
    if world > 1:  # one-set ablations leave the C<->L attention unused
        ddp = DistributedDataParallel(model, find_unused_parameters=model.num_conditional == 0
                                      or model.num_learnable == 0)
    net = ddp if ddp is not None else model
    metrics = MetricLog(out_dir, config.tensorboard, step) if rank == 0 else None
    batches = iter(data)
    model.train()

    def checkpoint() -> None:
        rngs, loaders = _gather(rng_state(), world), _gather(data.state_dict(), world)
        if rank == 0:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "rng": rngs, "data": loaders,
                "config": asdict(config),
                "model_config": model_config(config.model_size, **config.model_options),
                "schema_version": SCHEMA_VERSION,
                **({"ema": average.state_dict()} if average is not None else {})})

    last_step = config.stop_after or config.max_iters
    while step < last_step:
        optimizer.zero_grad(set_to_none=True)
        for micro in range(config.grad_accum):
            last = micro == config.grad_accum - 1
            sync = nullcontext() if (ddp is None or last) else ddp.no_sync()
            with sync:
                batch = next(batches)
                losses, counts = _micro_step(net, criterion, batch, device,
                                             1.0 / config.grad_accum)
            if metrics is not None:
                metrics.add(losses, counts, len(batch["targets"]))
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        lr = config.lr * get_lr(step, config)  # the head lr; the backbone runs at a multiple
        optimizer.step()
        scheduler.step()
        if average is not None:
            average.update(model)
        step += 1
        row = None
        if metrics is not None and (step % config.log_interval == 0 or step == last_step):
            row = metrics.write(step, lr, classifier_state(model))
            log.info("step %d loss %.4f lr %.2e", step, row.get("loss", float("nan")), lr)
        if step % config.ckpt_interval == 0 or step == last_step:
            checkpoint()
        if on_step is not None and rank == 0:
            on_step(step, row)
    if metrics is not None:
        metrics.close()
    if world > 1:
        dist.barrier()
    return ckpt_path
