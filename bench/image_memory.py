"""Peak memory of one image with many boxes: the mask-set contract vs full (N, H, W) masks.

Each case runs `process_image` on one 1024x768 image with N boxes (10 ... 5,000, 16-128 px) in a
fresh subprocess and reports its peak RSS above the RSS it had just before (VmHWM delta).
- dense (baseline): the masker hands over an (N, H, W) bool array, as every masker did before the
  mask-set contract (5,000 boxes: 3.9 GB for that array alone).
- ours: the same box masker handing over CropMasks; the stage scores and encodes MASK_CHUNK masks at
  a time and the captioner reads RleMasks.
Goal (issue "Objects365-train scale"): ours flat within 1.5x from 100 to 5,000 boxes.

    .venv/bin/python bench/image_memory.py [--quick]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from _common import REPO, check, parser, print_table, write_results

CASE = r"""
import json, sys, time
import numpy as np
from pathlib import Path
from pipelines.maskers import MaskOutput
from pipelines.maskers.box import BoxMasker, box_masks
from pipelines.process import UnitContext, process_image
from pipelines.quality import QualityConfig
from pipelines.records import ImageRecord, SourceObject
import cv2

def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

n, kind, folder = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
rng = np.random.default_rng(0)
h, w = 768, 1024
image = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
cv2.imwrite(str(folder / "img.png"), image)
objects = []
for k in range(n):
    bw, bh = rng.integers(16, 128, size=2)
    x, y = rng.integers(0, w - bw), rng.integers(0, h - bh)
    objects.append(SourceObject(str(k), "thing", [float(x), float(y), float(bw), float(bh)]))
record = ImageRecord("1", "img.png", w, h, objects)

class Dense(BoxMasker):
    def __call__(self, image, boxes):
        return MaskOutput.unscored(box_masks(image.shape[0], image.shape[1], boxes))

masker = Dense() if kind == "dense" else BoxMasker()
captioner = lambda image, boxes, masks, categories: [[] for _ in categories]
ctx = UnitContext("bench", "val", folder, "r", QualityConfig())
process_image(ctx, ImageRecord("1", "img.png", w, h, objects[:2]), masker, captioner)  # warm up
before = vm("VmRSS:")
start = time.perf_counter()
_, rows = process_image(ctx, record, masker, captioner)
seconds = time.perf_counter() - start
assert len(rows) == n and all(r["status"] == "kept" for r in rows), "unexpected rows"
print(json.dumps({"peak_delta": vm("VmHWM:") - before, "seconds": seconds}))
"""


def run_case(n: int, kind: str, folder) -> dict:
    proc = subprocess.run([sys.executable, "-c", CASE, str(n), kind, str(folder)], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    check(proc.returncode == 0, f"{kind} n={n} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    counts = [10, 100, 1000] if args.quick else [10, 100, 1000, 5000]
    folder = args.data_dir / "image_memory"
    folder.mkdir(parents=True, exist_ok=True)
    results, rows = {}, []
    started = time.perf_counter()
    for n in counts:
        dense, ours = run_case(n, "dense", folder), run_case(n, "ours", folder)
        results[n] = {"dense": dense, "ours": ours}
        mb = 1 / 2**20
        rows.append([n, dense["peak_delta"] * mb, ours["peak_delta"] * mb,
                     dense["peak_delta"] / max(ours["peak_delta"], 1), dense["seconds"],
                     ours["seconds"]])
    flat = results[counts[-1]]["ours"]["peak_delta"] / max(results[100]["ours"]["peak_delta"], 1)
    print_table("peak RSS above start, one 1024x768 image",
                ["boxes", "dense MB", "ours MB", "dense/ours", "dense s", "ours s"], rows)
    print(f"ours at {counts[-1]} boxes / ours at 100 boxes: {flat:.2f}x (goal <= 1.5x)")
    write_results("image_memory", args, {"counts": counts, "image": [768, 1024]},
                  {"cases": results, "ours_flatness_vs_100": flat,
                   "wall_s": time.perf_counter() - started})


if __name__ == "__main__":
    main()
