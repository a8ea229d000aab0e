"""Captioner throughput: crops/s one by one vs batched, tiny random BLIP and ViT-GPT2 (CPU).

Both runs go through the same HfCaptioner (context-padded crops, K beams per crop); only the
batch size differs, so the ratio is what batching buys. Random weights: the text is gibberish,
the cost is real for the model size.

    .venv/bin/python bench/captioner_throughput.py --quick
    .venv/bin/python bench/captioner_throughput.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.captioners import CAPTIONERS, CaptionerConfig  # noqa: E402
from tests.helpers.tiny_models import save_blip, save_vision_encoder_decoder  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FAMILIES = {"blip": save_blip, "vit-gpt2": save_vision_encoder_decoder}


def boxes_for(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    size = rng.uniform(0.1, 0.4, (n, 2)) * [width, height]
    x0, y0 = rng.uniform(0, width - size[:, 0]), rng.uniform(0, height - size[:, 1])
    return np.stack([x0, y0, x0 + size[:, 0], y0 + size[:, 1]], axis=1)


def crops_per_s(captioner, image: np.ndarray, boxes: np.ndarray, repeats: int) -> float:
    captioner(image, boxes[:2], None, ["x", "x"])  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        captioner(image, boxes, None, [""] * len(boxes))
    return repeats * len(boxes) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 crops, 1 repeat")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--crops", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--k", type=int, default=5, help="captions per object (beams)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    n_crops, repeats = (16, 1) if args.quick else (args.crops, args.repeats)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    boxes = boxes_for(n_crops, 480, 640)
    rows = []
    print(f"{'model':>9} {'crops':>5} {'K':>2} | {'1-by-1/s':>9} {'batched/s':>9} | {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for family, save in FAMILIES.items():
            folder = save(Path(tmp) / f"tiny-{family}")
            speed = {}
            for batch in (1, args.batch):
                cfg = CaptionerConfig(
                    name="hf",
                    caption_model=folder,
                    device=args.device,
                    dtype=args.dtype,
                    captions_per_object=args.k,
                    caption_batch_size=batch,
                    caption_max_tokens=20,
                )
                speed[batch] = crops_per_s(CAPTIONERS["hf"](cfg), image, boxes, repeats)
            rows.append(
                {
                    "model": family,
                    "device": args.device,
                    "dtype": args.dtype,
                    "crops": n_crops,
                    "k": args.k,
                    "batch": args.batch,
                    "one_by_one_crops_per_s": speed[1],
                    "batched_crops_per_s": speed[args.batch],
                    "batched_over_one_by_one": speed[args.batch] / speed[1],
                }
            )
            r = rows[-1]
            print(
                f"{family:>9} {n_crops:>5} {args.k:>2} | {speed[1]:9.2f} "
                f"{speed[args.batch]:9.2f} | {r['batched_over_one_by_one']:5.1f}x",
                flush=True,
            )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / (
        "captioner_throughput.quick.json" if args.quick else "captioner_throughput.json"
    )
    out.write_text(json.dumps({"rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
