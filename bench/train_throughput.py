"""Training throughput of MQ-Former, and the data loader's alone: the loader must not be the limit.

Data: the demo dataset (9 photos + 12 scenes) synthesized once with the box masker into
<data-dir>/train-throughput/demo; the mixture trains instance, semantic and referring on it.

- loader: `MixtureLoader` batches per second with no image cache (every image decoded and resized
  from disk: the case of a dataset much larger than the cache) and with the default cache (warm).
- train: `model.train.train` (the real loop: loader, forward, matching, loss, backward, AdamW),
  images/s over the steps after the first (which includes start-up).
- ratio = loader images/s (uncached) / train images/s: above 1 the loader keeps up; its share of
  a training step is about 1 / ratio (the loop is single-process, so that share adds to the step).

    .venv/bin/python bench/train_throughput.py [--quick] [--steps 40] [--image-sizes 128,256]
    .venv/bin/python bench/train_throughput.py --device cuda --models r50,swin-t --image-size 1024

The CUDA mode measures images/s and peak GPU memory (torch.cuda.max_memory_allocated) of each
model in bf16 autocast (what `engine train` does on a GPU); it exits with an error when no GPU is
present.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import check, console, parser, print_table, write_results

from engine.cli import main as engine
from model.data import MixtureLoader
from model.mixture import parse_mixture
from model.train import TrainConfig, train


def demo_shards(data_dir: Path) -> Path:
    out = Path(data_dir) / "train-throughput" / "demo"
    if not (out / "manifest.json").is_file():
        code = engine(["synthesize", "--source", "demo", "--out", str(out), "--masker", "box",
                       "--executor", "local", "--unit-size", "8"])
        check(code == 0, "engine synthesize of the demo data failed")
    return out


def mixture(shards: Path):
    return parse_mixture({"datasets": [{"path": str(shards),
                                        "tasks": ["instance", "semantic", "referring"]}]})


def loader_rate(shards: Path, image_size: int, batch_size: int, batches: int,
                cache_images: int) -> float:
    """Images per second drawn from a fresh MixtureLoader (cache_images=0: always from disk)."""
    loader = MixtureLoader(mixture(shards), image_size=image_size, batch_size=batch_size,
                           cache_images=cache_images)
    if cache_images:  # warm: every image decoded once before timing
        for _ in range(len(loader.shards[0]) // batch_size + 1):
            loader.next_batch()
    start = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    return batches * batch_size / (time.perf_counter() - start)


def train_rate(shards: Path, model: str, image_size: int, batch_size: int, steps: int,
               device: str, text_encoder: str) -> dict:
    """images/s of the real training loop over steps 2..N (and peak CUDA memory in GiB)."""
    loader = MixtureLoader(mixture(shards), image_size=image_size, batch_size=batch_size)
    times: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(out_dir=out, model_size=model, text_encoder=text_encoder,
                             max_iters=steps, warmup_iters=1, lr=1e-4, log_interval=steps,
                             ckpt_interval=steps, tensorboard=False, device=device,
                             grad_clip=1.0)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def on_step(step: int, row) -> None:
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())

        train(config, loader, on_step=on_step)
    check(len(times) == steps, f"{len(times)} step callbacks for {steps} steps")
    rate = (steps - 1) * batch_size / (times[-1] - times[0])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"images_per_s": rate, "s_per_step": (times[-1] - times[0]) / (steps - 1),
            "peak_gpu_memory_gib": peak}


def run_cpu(args, shards: Path) -> tuple[dict, list]:
    torch.set_num_threads(args.threads)
    sizes = [128] if args.quick else [int(s) for s in args.image_sizes.split(",")]
    steps = 12 if args.quick else args.steps
    results, rows = {}, []
    for size in sizes:
        cold = loader_rate(shards, size, args.batch_size, 4 if args.quick else 20, 0)
        warm = loader_rate(shards, size, args.batch_size, 10 if args.quick else 50, 256)
        tr = train_rate(shards, "tiny", size, args.batch_size, steps, "cpu", "hashed")
        ratio = cold / tr["images_per_s"]
        results[f"tiny@{size}"] = {"loader_uncached_images_per_s": cold,
                                   "loader_cached_images_per_s": warm, "train": tr,
                                   "ratio_loader_uncached_to_train": ratio,
                                   "ratio_loader_cached_to_train": warm / tr["images_per_s"]}
        rows.append([f"tiny @ {size}px, batch {args.batch_size}", tr["images_per_s"],
                     tr["s_per_step"], cold, warm, ratio, warm / tr["images_per_s"]])
        check(ratio > 1, f"the uncached loader ({cold:.1f} images/s) is slower than training "
                         f"({tr['images_per_s']:.1f} images/s) at {size}px")
    return results, rows


def run_cuda(args, shards: Path) -> tuple[dict, list]:
    results, rows = {}, []
    for model in args.models.split(","):
        cold = loader_rate(shards, args.image_size, args.batch_size, 10, 0)
        tr = train_rate(shards, model, args.image_size, args.batch_size, args.steps, "cuda",
                        args.text_encoder)
        ratio = cold / tr["images_per_s"]
        results[f"{model}@{args.image_size}"] = {"loader_uncached_images_per_s": cold,
                                                 "train": tr, "ratio_loader_to_train": ratio}
        rows.append([f"{model} @ {args.image_size}px bf16, batch {args.batch_size}",
                     tr["images_per_s"], tr["s_per_step"], tr["peak_gpu_memory_gib"], cold,
                     ratio])
    return results, rows


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--steps", type=int, default=40, help="training steps per measurement")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--image-sizes", default="128,256", help="CPU mode: tiny model input sides")
    p.add_argument("--threads", type=int, default=1, help="CPU mode: torch intra-op threads")
    p.add_argument("--models", default="r50,swin-t", help="CUDA mode: model sizes")
    p.add_argument("--image-size", type=int, default=1024, help="CUDA mode: input side")
    p.add_argument("--text-encoder", default="minilm", help="CUDA mode: text encoder")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        console.print("[red]error:[/red] --device cuda: no CUDA device is available on this "
                      "machine (torch.cuda.is_available() is False); run the CPU mode instead")
        return 2
    shards = demo_shards(args.data_dir)
    if args.device == "cuda":
        results, rows = run_cuda(args, shards)
        print_table(f"MQ-Former training throughput on {torch.cuda.get_device_name()}",
                    ["model", "train images/s", "s/step", "peak GiB", "loader images/s",
                     "loader / train"], rows)
        config = {"device": torch.cuda.get_device_name(), "models": args.models,
                  "image_size": args.image_size, "batch_size": args.batch_size,
                  "steps": args.steps, "dtype": "bf16 autocast", "text_encoder": args.text_encoder}
        write_results("train_throughput_cuda", args, config, results)
        return 0
    results, rows = run_cpu(args, shards)
    print_table("MQ-Former training throughput on CPU (tiny model; loader = MixtureLoader alone)",
                ["config", "train images/s", "s/step", "loader uncached", "loader cached",
                 "uncached / train", "cached / train"], rows)
    config = {"device": "cpu", "threads": args.threads, "batch_size": args.batch_size,
              "steps": 12 if args.quick else args.steps, "text_encoder": "hashed",
              "data": "demo (21 images, box masks, template captions)"}
    write_results("train_throughput", args, config, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
