"""SAM box-prompted throughput: naive per-box calls vs one encoder pass + batched decoding.

Same random-weight model for all three methods (weights do not change the cost):
  (a) naive:   per box, SamPredictor.set_image + predict (the encoder runs once per box)
  (b) per-img: one set_image per image, then one predict per box
  (c) ours:    SamMasker (one set_image, all boxes through prompt encoder + decoder in chunks)
The encoder-bound limit is the time of set_image alone: no box-prompted SAM can beat it per image.

    .venv/bin/python bench/sam_throughput.py --quick           # tiny SAM, 4 and 16 boxes
    .venv/bin/python bench/sam_throughput.py                   # tiny + vit_b on CPU
    .venv/bin/python bench/sam_throughput.py --device cuda --dtype bf16 --models vit_b,vit_h

On CPU the vit_b encoder takes ~15 s per image, so (a) is measured on at most --naive-boxes boxes
per image and extrapolated linearly (flagged "extrapolated" in the table and JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from segment_anything import SamPredictor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.devices import inference, resolve_device, resolve_dtype  # noqa: E402
from pipelines.maskers.sam import SAM_VARIANTS, SamMasker, build_sam  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def make_images(n: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """Noisy images with a few flat rectangles (content does not change SAM's cost)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        img = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
        for _ in range(6):
            x0, y0 = rng.integers(0, width - 64), rng.integers(0, height - 64)
            img[y0 : y0 + rng.integers(32, 300), x0 : x0 + rng.integers(32, 300)] = rng.integers(
                0, 255, 3
            )
        images.append(img)
    return images


def make_boxes(n: int, height: int, width: int, seed: int) -> np.ndarray:
    """(n, 4) XYXY boxes of 16..40% of the image side, inside the image."""
    rng = np.random.default_rng(seed)
    size = rng.uniform(0.16, 0.4, (n, 2)) * [width, height]
    x0 = rng.uniform(0, width - size[:, 0])
    y0 = rng.uniform(0, height - size[:, 1])
    return np.stack([x0, y0, x0 + size[:, 0], y0 + size[:, 1]], axis=1)


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def naive(predictor: SamPredictor, image: np.ndarray, boxes: np.ndarray) -> None:
    for box in boxes:
        predictor.set_image(image)
        predictor.predict(box=box, multimask_output=True)


def per_image(predictor: SamPredictor, image: np.ndarray, boxes: np.ndarray) -> float:
    """Runs (b); returns the set_image (encoder) time alone."""
    encode = timed(lambda: predictor.set_image(image))
    for box in boxes:
        predictor.predict(box=box, multimask_output=True)
    return encode


def bench_model(variant: str, args, images: list[np.ndarray]) -> list[dict]:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    sam = build_sam(SAM_VARIANTS[variant])
    masker = SamMasker(sam, origin=f"sam:{variant}", device=args.device, dtype=args.dtype)
    predictor = masker.predictor  # the same model on the same device for all three methods
    naive_cap = 10**9 if variant == "tiny" else args.naive_boxes
    with inference(device, dtype):  # warm-up (first calls allocate and pick kernels)
        per_image(predictor, images[0], make_boxes(2, *images[0].shape[:2], seed=99))
    masker(images[0], make_boxes(2, *images[0].shape[:2], seed=99))
    rows = []
    for n_boxes in args.boxes:
        t = {"a": 0.0, "b": 0.0, "c": 0.0, "encoder": 0.0}
        extrapolated = n_boxes > naive_cap
        for i, image in enumerate(images):
            boxes = make_boxes(n_boxes, *image.shape[:2], seed=i)
            with inference(device, dtype):
                measured = boxes[: min(n_boxes, naive_cap)]
                run_a = partial(naive, predictor, image, measured)
                t["a"] += timed(run_a) * n_boxes / len(measured)
                t["encoder"] += per_image(predictor, image, boxes[:0])
                t["b"] += timed(partial(per_image, predictor, image, boxes))
            t["c"] += timed(partial(masker, image, boxes))
        n_img = len(images)
        rows.append(
            {
                "model": variant,
                "device": str(device),
                "dtype": str(dtype).replace("torch.", ""),
                "image_hw": list(images[0].shape[:2]),
                "images": n_img,
                "boxes_per_image": n_boxes,
                **{f"{m}_boxes_per_s": n_img * n_boxes / t[m] for m in "abc"},
                **{f"{m}_images_per_s": n_img / t[m] for m in "abc"},
                "encoder_s_per_image": t["encoder"] / n_img,
                "c_fraction_of_encoder_bound": t["encoder"] / t["c"],
                "c_over_a": t["a"] / t["c"],
                "c_over_b": t["b"] / t["c"],
                "a_extrapolated": extrapolated,
                "a_note": f"measured on {naive_cap} box(es) per image, scaled linearly"
                if extrapolated
                else "",
            }
        )
        print_row(rows[-1])
    return rows


def print_row(r: dict) -> None:
    flag = "*" if r["a_extrapolated"] else " "
    print(
        f"{r['model']:>6} {r['boxes_per_image']:>5} | {r['a_boxes_per_s']:9.2f}{flag} "
        f"{r['b_boxes_per_s']:9.2f} {r['c_boxes_per_s']:9.2f} | {r['c_images_per_s']:8.3f} "
        f"| {r['encoder_s_per_image']:8.3f} {r['c_fraction_of_encoder_bound']:6.2f} "
        f"| {r['c_over_a']:7.1f}x {r['c_over_b']:6.1f}x",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny SAM only, 4 and 16 boxes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16 | auto")
    parser.add_argument("--models", default="tiny,vit_b")
    parser.add_argument("--boxes", default="4,16,64")
    parser.add_argument("--images", type=int, default=1, help="images per setting")
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument(
        "--naive-boxes",
        type=int,
        default=2,
        help="most boxes per image timed for (a) on big models (rest extrapolated)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: leave torch's default); 1 is steadier on a "
        "machine shared with other jobs",
    )
    args = parser.parse_args()
    if args.threads:  # the env var also tells pipelines.devices.configure_threads to keep it
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    models = ["tiny"] if args.quick else args.models.split(",")
    args.boxes = [4, 16] if args.quick else [int(b) for b in args.boxes.split(",")]
    if args.device == "cuda" and args.naive_boxes == 2:
        args.naive_boxes = 10**9  # on a GPU the naive baseline is affordable: measure it all
    images = make_images(args.images, args.height, args.width)
    print(
        f"{'model':>6} {'boxes':>5} | {'(a) box/s':>10} {'(b) box/s':>9} {'(c) box/s':>9} | "
        f"{'(c) img/s':>8} | {'enc s/img':>8} {'c/enc':>6} | {'c vs a':>8} {'c vs b':>7}"
    )
    rows = [row for model in models for row in bench_model(model, args, images)]
    print(
        "(a) naive per-box set_image+predict, (b) one set_image + predict per box, (c) ours; "
        "c/enc = encoder-bound limit reached by (c); * = (a) extrapolated"
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("sam_throughput.quick.json" if args.quick else "sam_throughput.json")
    out.write_text(json.dumps({"torch_threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
