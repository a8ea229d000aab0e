"""One flywheel round: GrabCut masks -> a trained MQ-Former -> `--masker mqformer`, vs exact GT.

1. Generated scenes (`pipelines/scenes.py`, exact visible-pixel masks): a training set (seed 11)
   and a held-out set (seed 12, never trained on).
2. `engine synthesize --masker grabcut` on the training scenes' boxes (the teacher's labels).
3. `engine train` a tiny MQ-Former on those synthesized masks (mix.yaml: masks [synthesized],
   kept rows only), on CPU with 1 thread.
4. On the held-out scenes: mean mask IoU (pycocotools.mask.iou against the exact masks) of
   `mqformer` (the student, built from the checkpoint as `engine synthesize` builds it), `grabcut`
   (its teacher) and `box` (the baseline), through the same evaluate() as bench/mask_quality.py.
   The student is measured with its window margin 0 / 0.1 / none (the choice of
   pipelines/maskers/mqformer.py MARGIN) and with the alternative matching (IoU of each mask's
   tight box with the prompt box instead of the mask's IoU with the filled box); teacher and
   student are also measured on the training scenes (label quality, fit).

    .venv/bin/python bench/flywheel.py [--quick] [--train-scenes 80] [--test-scenes 30]
        [--steps 400] [--image-size 256] [--batch-size 4]

Everything runs in this process with 1 thread (OMP_NUM_THREADS=1 is set before torch loads).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib  # noqa: E402 - OMP_NUM_THREADS must be set before torch is imported
import io  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from _common import check, console, parser, print_table, write_results  # noqa: E402
from mask_quality import generated_scenes  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

TRAIN_SEED, TEST_SEED = 11, 12


def _quiet(fn, *args):
    """Run an engine command without its tables on stdout (the bench prints its own)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def teacher_labels(work, n: int) -> tuple:
    """Training scenes on disk and the grabcut run on their boxes -> (run dir, seconds)."""
    from engine.cli import main
    from pipelines.scenes import write_scenes

    scenes_dir, run = work / "train_scenes", work / "grabcut_run"
    boxes_json, _ = write_scenes(scenes_dir, n, seed=TRAIN_SEED)
    start = time.perf_counter()
    rc = _quiet(main, ["synthesize", "--source", "coco", "--root", str(scenes_dir),
                       "--annotations", str(boxes_json), "--out", str(run), "--executor",
                       "local", "--masker", "grabcut", "--captioner", "none"])
    check(rc == 0, f"engine synthesize --masker grabcut exited {rc}")
    return run, time.perf_counter() - start


def train_student(work, run, args) -> tuple:
    """engine train on the synthesized masks -> (checkpoint, seconds, last logged loss)."""
    from engine.cli import main

    mix = work / "mix.yaml"
    mix.write_text(f"datasets:\n  - path: {run}\n    weight: 1.0\n    tasks: [instance]\n"
                   "    masks: [synthesized]\n    keep_only: true\n")
    out = work / "student"
    start = time.perf_counter()
    rc = _quiet(main, ["train", "--mixture", str(mix), "--out", str(out), "--model", "tiny",
                       "--text-encoder", "hashed", "--image-size", str(args.image_size),
                       "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                       "--warmup", str(min(50, args.steps // 10)), "--lr", "1e-3",
                       "--grad-clip", "1", "--num-points", "1024", "--log-interval", "20",
                       "--ckpt-interval", str(args.steps), "--device", "cpu",
                       "--no-tensorboard", "--seed", "0"])
    check(rc == 0, f"engine train exited {rc}")
    seconds = time.perf_counter() - start
    lines = (out / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1]) if lines else {}
    return out / "last.pt", seconds, last.get("loss")


def _rles(masks: np.ndarray) -> list:
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def evaluate(masker, scenes) -> dict:
    """Per-object IoU (pycocotools) over `scenes`, split by whether the mask is the method's own
    or a substitute it named in MaskOutput.origins (the student's box fallback)."""
    ious, own, seconds = [], [], 0.0
    for image, boxes, gt, _ in scenes:
        start = time.perf_counter()
        out = masker(image, boxes)
        masks = out.dense()
        seconds += time.perf_counter() - start
        check(masks.shape == gt.shape, f"{masker.origin}: masks {masks.shape} != gt {gt.shape}")
        ious += np.diag(mask_utils.iou(_rles(masks), _rles(gt), [0] * len(gt))).tolist()
        own += [o == masker.origin for o in (out.origins or [masker.origin] * len(boxes))]
    v, own_v = np.array(ious), np.array(own, bool)
    return {"objects": len(v), "mean_iou": float(v.mean()), "median_iou": float(np.median(v)),
            "share_iou_ge_075": float((v >= 0.75).mean()), "s_per_box": seconds / max(len(v), 1),
            "share_own_masks": float(own_v.mean()),
            "mean_iou_own_masks": float(v[own_v].mean()) if own_v.any() else None,
            "mean_iou_fallbacks": float(v[~own_v].mean()) if (~own_v).any() else None}


def tight_box_variant(masker):
    """The alternative matching measured against the masker's: IoU of each query mask's tight box
    (mapped to the original frame) with the prompt box. Same model, window and fallback."""
    import torch

    from model.inference import boxes_to_original

    def match(logits, boxes, geo):
        binary = (logits > 0).numpy()
        stride = masker.image_size / logits.shape[-1]
        xyxy = np.zeros((len(binary), 4))
        for q, m in enumerate(binary):
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            if rows.size:
                xyxy[q] = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]) * stride
        xywh = boxes_to_original(torch.from_numpy(xyxy), geo)
        qb = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        lt = np.maximum(qb[:, None, :2], boxes[None, :, :2])
        rb = np.minimum(qb[:, None, 2:], boxes[None, :, 2:])
        inter = np.clip(rb - lt, 0, None).prod(-1)
        union = ((qb[:, 2:] - qb[:, :2]).prod(-1)[:, None]
                 + (boxes[:, 2:] - boxes[:, :2]).prod(-1)[None] - inter)
        iou = inter / np.maximum(union, 1e-9)
        best = iou.argmax(0)
        return best, iou[best, np.arange(len(boxes))]

    masker._match = match
    return masker


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--train-scenes", type=int, default=80)
    p.add_argument("--test-scenes", type=int, default=30)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args(argv)
    if args.quick:
        args.train_scenes, args.test_scenes, args.steps = 16, 8, 20
    import torch

    torch.set_num_threads(1)
    from pipelines.maskers import MaskerConfig, build_masker
    from pipelines.maskers.mqformer import build_mqformer_masker

    work = args.data_dir / "flywheel"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    run, teacher_s = teacher_labels(work, args.train_scenes)
    checkpoint, train_s, loss = train_student(work, run, args)
    held_out = generated_scenes(args.test_scenes, TEST_SEED)
    train_set = generated_scenes(args.train_scenes, TRAIN_SEED)
    student = {f"mqformer (margin {m})": build_mqformer_masker(checkpoint, "cpu", margin=m)
               for m in (0.0, 0.1, None)}
    for m in (0.0, 0.1, None):
        student[f"mqformer tight-box match (margin {m})"] = tight_box_variant(
            build_mqformer_masker(checkpoint, "cpu", margin=m))
    maskers = {"box": build_masker(MaskerConfig(name="box")),
               "grabcut": build_masker(MaskerConfig(name="grabcut")), **student}
    results = {"held-out": {name: evaluate(m, held_out) for name, m in maskers.items()},
               "training scenes": {"grabcut": evaluate(maskers["grabcut"], train_set),
                                   "mqformer (margin 0.0)":
                                   evaluate(maskers["mqformer (margin 0.0)"], train_set)}}
    rows = [[s, name, r["objects"], r["mean_iou"], r["median_iou"], r["share_iou_ge_075"],
             r["share_own_masks"], r["mean_iou_own_masks"], r["s_per_box"]]
            for s, rs in results.items() for name, r in rs.items()]
    print_table("flywheel round: mean mask IoU against exact GT (pycocotools); fallbacks are "
                "the filled box", ["scenes", "masker", "objects", "mean IoU", "median IoU",
                                   "IoU>=0.75", "own masks", "IoU own", "s/box"], rows)
    held = results["held-out"]
    student_iou = held["mqformer (margin 0.0)"]["mean_iou"]
    teacher_iou, box_iou = held["grabcut"]["mean_iou"], held["box"]["mean_iou"]
    verdict = "beats" if student_iou > teacher_iou else "does not beat"
    console.print(f"the student {verdict} its teacher on held-out scenes: mqformer "
                  f"{student_iou:.3f} vs grabcut {teacher_iou:.3f} (box {box_iou:.3f})")
    check(held["grabcut"]["mean_iou"] > held["box"]["mean_iou"], "grabcut does not beat the box")
    config = {"train_scenes": args.train_scenes, "test_scenes": args.test_scenes,
              "train_seed": TRAIN_SEED, "test_seed": TEST_SEED, "steps": args.steps,
              "image_size": args.image_size, "batch_size": args.batch_size, "model": "tiny",
              "text_encoder": "hashed", "threads": torch.get_num_threads(),
              "teacher_seconds": teacher_s, "train_seconds": train_s, "final_loss": loss,
              "student_beats_teacher": student_iou > teacher_iou}
    write_results("flywheel", args, config, results)
    return results


if __name__ == "__main__":
    main()
