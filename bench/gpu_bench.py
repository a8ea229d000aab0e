"""GPU figures in one run (bench/gpu.sh calls this): SAM encoder limit, the engine's SAM masker
with and without fused attention / torch.compile, and the MQ-Former r50 training step.

Random weights throughout (weights do not change the cost). Per SAM variant (vit_b, vit_h), bf16:
  encoder      images/s of the image encoder alone, batch 1 and batch 4 (the limit of any
               box-prompted SAM; batch 4 shows what batching across images would give)
  masker       images/s of SamMasker (one encoder pass + chunked decoding) at 16 and 64
               boxes/image: plain (baseline), +sdpa, +compile, +sdpa+compile
  batched      images/s of SamMasker at 16 boxes/image with --sam-batch-images 1 (baseline),
               4 and 8: the encoder runs on a batch of images (`embed`), decoding per image
Then `bench/train_throughput.py --device cuda --models r50 --image-size 1024` (images/s, peak
memory). Prints tables and writes bench/results/gpu.json.

    .venv/bin/python bench/gpu_bench.py                    # on a CUDA machine
    .venv/bin/python bench/gpu_bench.py --device cpu --quick   # smoke test of the script itself
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import REPO, check, parser, print_table, write_results  # noqa: E402
from sam_throughput import make_boxes, make_images  # noqa: E402

from pipelines.devices import inference  # noqa: E402
from pipelines.maskers.sam import SAM_VARIANTS, SamMasker, build_sam  # noqa: E402

VARIANTS = {"cuda": ["vit_b", "vit_h"], "cpu": ["tiny"]}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def encoder_rate(variant: str, device: str, batch: int, n: int) -> float:
    sam = build_sam(SAM_VARIANTS[variant]).to(device).eval()
    size = sam.image_encoder.img_size
    x = torch.randn(batch, 3, size, size, device=device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with inference(torch.device(device), dtype):
        sam.image_encoder(x)  # warm up
        sync(device)
        start = time.perf_counter()
        for _ in range(n):
            sam.image_encoder(x)
        sync(device)
    return batch * n / (time.perf_counter() - start)


def masker_rate(variant: str, device: str, boxes: int, n: int, sdpa: bool, compiled: bool,
                batch: int = 1) -> float:
    """Images/s of SamMasker over n images; with batch > 1 as a unit worker drives it: `embed`
    of each group of `batch` images, then one call per image (n is rounded up to whole groups)."""
    torch.manual_seed(0)
    sam = build_sam(SAM_VARIANTS[variant])
    dtype = "bf16" if device == "cuda" else "fp32"
    masker = SamMasker(sam, f"sam:{variant}", device=device, dtype=dtype, sdpa=sdpa,
                       compile=compiled, batch_images=batch)
    n = -(-n // batch) * batch
    images = make_images(n + batch, 768, 1024)
    prompts = [make_boxes(boxes, 768, 1024, seed=i) for i in range(n + batch)]

    def group(lo: int) -> None:
        if batch > 1:
            masker.embed(images[lo : lo + batch])
        for image, box in zip(images[lo : lo + batch], prompts[lo : lo + batch], strict=True):
            out = masker(image, box)
            check(len(out.masks) == boxes, "masker returned the wrong number of masks")

    group(0)  # warm up (and compile)
    sync(device)
    start = time.perf_counter()
    for lo in range(batch, n + batch, batch):
        group(lo)
    sync(device)
    return n / (time.perf_counter() - start)


def train_step(device: str, quick: bool) -> dict:
    argv = [sys.executable, str(REPO / "bench" / "train_throughput.py"), "--device", device,
            "--steps", "3" if quick else "20"]
    argv += ["--models", "r50", "--image-size", "1024"] if device == "cuda" else ["--quick"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    return {"returncode": proc.returncode, "output_tail": proc.stdout[-3000:] + proc.stderr[-2000:]}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--images", type=int, default=8, help="images per masker measurement")
    args = p.parse_args()
    if args.device == "cuda":
        check(torch.cuda.is_available(), "no CUDA device: run with --device cpu for a smoke test")
    n = 2 if args.quick else args.images
    started = time.perf_counter()
    results: dict = {"encoder": {}, "masker": {}, "batched_masker": {}}
    enc_rows, mask_rows, batch_rows = [], [], []
    for variant in VARIANTS[args.device]:
        rates = {b: encoder_rate(variant, args.device, b, n) for b in (1, 4)}
        results["encoder"][variant] = rates
        enc_rows.append([variant, rates[1], rates[4]])
        for boxes in (16, 64):
            row = {}
            for name, sdpa, compiled in (("plain", False, False), ("sdpa", True, False),
                                         ("compile", False, True), ("sdpa+compile", True, True)):
                if compiled and args.device == "cpu":
                    continue  # compile on this CPU takes minutes and says nothing about GPUs
                row[name] = masker_rate(variant, args.device, boxes, n, sdpa, compiled)
            results["masker"][f"{variant}@{boxes}"] = row
            mask_rows.append([f"{variant} {boxes} boxes", *(row.get(k) for k in
                             ("plain", "sdpa", "compile", "sdpa+compile")),
                              row.get("sdpa", 0) / row["plain"]])
        rates = {b: masker_rate(variant, args.device, 16, n, False, False, batch=b)
                 for b in (1, 4, 8)}
        results["batched_masker"][f"{variant}@16"] = rates
        batch_rows.append([f"{variant} 16 boxes", rates[1], rates[4], rates[8],
                           rates[4] / rates[1], rates[8] / rates[1]])
    results["train_r50_1024"] = train_step(args.device, args.quick)
    results["wall_s"] = time.perf_counter() - started
    if args.device == "cuda":
        results["gpu"] = torch.cuda.get_device_name(0)
        results["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print_table("SAM image encoder, images/s", ["variant", "batch 1", "batch 4"], enc_rows)
    print_table("SamMasker images/s (bf16 on CUDA)",
                ["setting", "plain", "sdpa", "compile", "sdpa+compile", "sdpa/plain"], mask_rows)
    print_table("SamMasker images/s by --sam-batch-images (plain attention)",
                ["setting", "batch 1", "batch 4", "batch 8", "4 / 1", "8 / 1"], batch_rows)
    print(results["train_r50_1024"]["output_tail"][-1500:])
    write_results("gpu" if args.device == "cuda" else "gpu_cpu_smoke", args,
                  {"device": args.device, "images": n}, json.loads(json.dumps(results)))


if __name__ == "__main__":
    main()
