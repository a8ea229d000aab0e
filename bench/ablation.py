"""A miniature of MQ-Former's Table 2 ablation: mixed vs learnable-only vs conditional-only queries.

Data: generated scenes (pipelines/scenes.py: silhouettes pasted on real photos, exact masks) on two
seeds: a training set and a disjoint held-out set. Each scene's ground truth is its objects (things:
horse, ellipse, star, polygon) plus one stuff region, `background` (every pixel no object covers,
{"isthing": false}), so both halves of the paper's query-type split can be measured. The COCO files
become `gt` shards through `engine synthesize --source coco`; the held-out shards are also the
mixture's `exclude` set.

Each query mode trains the `tiny` model from the same seed for the same steps on CPU (`engine train
--queries ...`, the same total number of queries) on instance + panoptic targets, then `engine eval`
measures on the held-out set: instance mask / box AP (COCOeval) and panoptic PQ, plus the query-type
split of the matched held-out targets (share of things taken by conditional queries, share of stuff
by learnable ones; the paper reports ~99.6% and ~53% on COCO). Ratios are to `mixed`, measured in
the same run. A model this small trained this briefly only shows trends; several --seeds help tell
them from noise.

    .venv/bin/python bench/ablation.py [--quick] [--steps 1200] [--seeds 0] [--n-train 1000]

Levers (`--arm NAME`, one at a time): the mixed model under one recipe of `ARMS` (each differs
from `base` in one lever), trained in-process from the library (model.train.train) on 1000
training scenes and measured on 100 held-out scenes and on 100 of the training scenes: per-class
and class-agnostic mask AP (every category relabelled as one), the mean mask IoU of the queries
the Hungarian matcher assigns to the held-out targets, and how often such a query's best text is
its target's (matched-class accuracy). Each arm's figures are merged into
bench/results/ablation_levers.json.

    .venv/bin/python bench/ablation.py --arm base [--steps N]
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from _common import check, console, machine, parser, print_table, write_results
from pycocotools import mask as mask_utils

from engine.cli import main as engine
from pipelines.scenes import write_scenes

MODES = ("mixed", "learnable", "conditional")
STUFF = "background"


def add_stuff(gt_json: Path) -> Path:
    """A copy of a scenes COCO file with a `background` stuff segment per image (the pixels no
    object covers) and {"isthing": ...} on every annotation."""
    coco = json.loads(gt_json.read_text())
    stuff_id = max(c["id"] for c in coco["categories"]) + 1
    coco["categories"].append({"id": stuff_id, "name": STUFF, "supercategory": "stuff"})
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        ann["isthing"] = True
        by_image.setdefault(ann["image_id"], []).append(ann)
    for image in coco["images"]:
        covered = np.zeros((image["height"], image["width"]), dtype=bool)
        for ann in by_image.get(image["id"], []):
            seg = ann["segmentation"]
            covered |= mask_utils.decode({"size": seg["size"],
                                          "counts": seg["counts"].encode()}).astype(bool)
        rle = mask_utils.encode(np.asfortranarray((~covered).astype(np.uint8)))
        coco["annotations"].append({
            "id": image["id"] * 1000 + 999, "image_id": image["id"], "category_id": stuff_id,
            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
            "area": int(mask_utils.area(rle)), "isthing": False,
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    out = gt_json.with_name("scenes_gt_stuff.json")
    out.write_text(json.dumps(coco))
    return out


def scene_shards(data_dir: Path, name: str, n: int, seed: int) -> Path:
    """Shards of n generated scenes (seed) with gt things + background stuff; cached. The shards
    live beside the scenes folder: the engine refuses an --out inside its dataset root."""
    root = Path(data_dir) / "ablation" / f"{name}-{n}-s{seed}"
    shards = root.with_name(root.name + "-shards")
    if not (shards / "manifest.json").is_file():
        gt_json = root / "scenes_gt.json"
        if not gt_json.is_file():
            _, gt_json = write_scenes(root, n, seed=seed)
        code = engine(["synthesize", "--source", "coco", "--root", str(root.resolve()),
                       "--annotations", str(add_stuff(gt_json)), "--out", str(shards),
                       "--masker", "box", "--executor", "local", "--unit-size", "100"])
        check(code == 0, f"engine synthesize of {root} failed")
    return shards


def train_and_eval(args, mix: Path, held_out: Path, mode: str, seed: int, run_dir: Path) -> dict:
    out = run_dir / f"{mode}-s{seed}"
    argv = ["train", "--mixture", str(mix), "--out", str(out), "--queries", mode,
            "--model", "tiny", "--text-encoder", args.text_encoder, "--image-size",
            str(args.image_size), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
            "--lr", str(args.lr), "--warmup", str(min(50, args.steps // 10)), "--grad-clip", "1",
            "--num-points", "1024", "--log-interval", "10", "--ckpt-interval",
            str(args.steps), "--seed", str(seed), "--device", "cpu", "--no-tensorboard"]
    start = time.perf_counter()
    check(engine(argv) == 0, f"engine train failed: {' '.join(argv)}")
    train_s = time.perf_counter() - start
    evals = {}
    for task in ("instance", "panoptic"):
        dest = out / f"eval-{task}.json"
        with contextlib.redirect_stdout(io.StringIO()):  # its table; the figures are in dest
            code = engine(["eval", "--checkpoint", str(out / "last.pt"), "--data",
                           str(held_out), "--task", task, "--out", str(dest), "--device", "cpu"])
        check(code == 0, f"engine eval {task} of {out} failed")
        evals[task] = json.loads(dest.read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-max(1, len(rows) // 4):]  # the last quarter of training
    return {"train_s": train_s, "final_loss": statistics.mean(r["loss"] for r in last),
            "instance": evals["instance"], "panoptic": evals["panoptic"],
            "train_split": {k: sum(r.get(f"matched/{k}", 0) for r in last) for k in
                            ("conditional/thing", "conditional/stuff", "learnable/thing",
                             "learnable/stuff")}}


# One lever changed from `base` per arm (the list); steps chosen to fit <= 12 minutes of
# 1-thread CPU training on the shared 2-core box.
BASE = dict(model="tiny", image_size=128, batch_size=4, steps=1500, lr=5e-4, warmup=50,
            num_points=1024, full_mask=False, model_options={}, loss_weights={})
ARMS: dict[str, dict] = {
    "base": {},
    "dn": dict(model_options={"dn_groups": 3}),
    "small": dict(model="small", steps=1000),
    "img192": dict(image_size=192),
    "lr1e-3": dict(lr=1e-3),
    "steps4000": dict(steps=4000),
    "fullmask": dict(full_mask=True),
    "center": dict(model_options={"center_texts": True}),
    # the levers that helped, together, for the longest run that fits in 12 minutes
    "combo": dict(image_size=192, lr=1e-3, steps=2400),
    "combo-center": dict(image_size=192, lr=1e-3, steps=2400,
                         model_options={"center_texts": True}),
}


def arm_config(name: str, steps: int | None) -> dict:
    if name not in ARMS:
        raise ValueError(f"unknown arm {name!r}; choose one of: {', '.join(ARMS)}")
    cfg = dict(BASE, **ARMS[name])
    if steps:
        cfg["steps"] = steps
    return cfg


def one_label_per_query(predictions: list[dict]) -> list[dict]:
    """Class-agnostic copies of instance predictions: the top-100 over queries x texts holds a
    query once per text it scores, with the same box and mask; relabelled as one category those
    copies would be duplicates (false positives), so only each query's best-scoring copy stays
    (a query is identified by its image and box)."""
    best: dict[tuple, dict] = {}
    for p in predictions:
        key = (p["image_id"], tuple(p["box"]))
        if key not in best or p["score"] > best[key]["score"]:
            best[key] = dict(p, category="object")
    return list(best.values())


def diagnose(model, shards: Path, image_size: int, limit: int | None = None) -> dict:
    """Per-class and class-agnostic mask AP, matched-query mask IoU and class accuracy of
    `model` on the instance targets of a shard folder."""
    from itertools import islice

    import torch
    import torch.nn.functional as F

    from model.data import ShardSet, iter_eval_samples
    from model.evaluate import instance_ap
    from model.inference import Evaluator, dataset_categories, run_model
    from model.matcher import HungarianMatcher

    torch.manual_seed(0)
    vocab, is_thing = dataset_categories(ShardSet(shards), keep_only=True)
    evaluator = Evaluator("instance", vocab, is_thing, num_points=1024)
    matcher = HungarianMatcher(num_points=1024)
    ious, correct, total = [], 0, 0
    samples = islice(iter_eval_samples(shards, "instance", image_size), limit)
    for sample, out in run_model(model, samples, "cpu", 8):
        evaluator.add(sample, out)
        target = sample["target"]
        if not len(target["labels"]):
            continue
        (src, tgt), = matcher({k: v[None] for k, v in out.items() if k != "query_types"},
                              [target])
        masks = F.interpolate(out["pred_masks"][src][None], size=target["masks"].shape[-2:],
                              mode="bilinear", align_corners=False)[0] > 0
        gt = target["masks"][tgt].bool()
        inter = (masks & gt).flatten(1).sum(1).float()
        union = (masks | gt).flatten(1).sum(1).float().clamp(min=1)
        ious += (inter / union).tolist()
        correct += int((out["pred_logits"][src].argmax(-1) == target["labels"][tgt]).sum())
        total += len(src)
    per_class = instance_ap(evaluator.gt, evaluator.pred)
    agnostic_gt = [dict(im, objects=[dict(o, category="object") for o in im["objects"]])
                   for im in evaluator.gt]
    agnostic = instance_ap(agnostic_gt, one_label_per_query(evaluator.pred))
    return {"mask_AP": per_class["mask_AP"], "mask_AP50": per_class["mask_AP50"],
            "box_AP": per_class["box_AP"], "agnostic_mask_AP": agnostic["mask_AP"],
            "agnostic_mask_AP50": agnostic["mask_AP50"],
            "matched_iou": statistics.mean(ious) if ious else None,
            "matched_class_acc": correct / total if total else None, "images": evaluator.images}


def run_arm(args, name: str) -> dict:
    """Train the mixed model under arm `name` and diagnose it on held-out and training scenes."""
    import torch

    from model.checkpoint import load_checkpoint_file
    from model.data import MixtureLoader
    from model.inference import load_model
    from model.mixture import load_mixture
    from model.train import TrainConfig, train

    cfg = arm_config(name, args.steps)
    train_shards = scene_shards(args.data_dir, "train", args.n_train, seed=101)
    held_out = scene_shards(args.data_dir, "heldout", args.n_val, seed=202)
    out = Path(args.data_dir) / "ablation" / f"arm-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True)
    mix = out / "mix.yaml"
    mix.write_text(f"datasets:\n  - path: {train_shards}\n    tasks: [instance, panoptic]\n"
                   f"    masks: [gt]\nexclude: [{held_out}]\n")
    seed = int(args.seeds.split(",")[0])
    config = TrainConfig(out_dir=str(out), model_size=cfg["model"], queries="mixed",
                         text_encoder=args.text_encoder, max_iters=cfg["steps"], lr=cfg["lr"],
                         warmup_iters=min(cfg["warmup"], cfg["steps"] // 10), grad_clip=1.0,
                         num_points=cfg["num_points"], full_mask_loss=cfg["full_mask"],
                         log_interval=20,
                         ckpt_interval=cfg["steps"], seed=seed, device="cpu",
                         tensorboard=False, model_options=cfg["model_options"],
                         loss_weights=cfg["loss_weights"],
                         data={"image_size": cfg["image_size"]})
    loader = MixtureLoader(load_mixture(mix), image_size=cfg["image_size"],
                           batch_size=cfg["batch_size"], seed=seed, train=True, cache_images=1100)
    start = time.perf_counter()
    ckpt = train(config, loader)
    train_s = time.perf_counter() - start
    model = load_model(load_checkpoint_file(ckpt))
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        held = diagnose(model, held_out, cfg["image_size"])
        fit = diagnose(model, train_shards, cfg["image_size"], limit=args.n_val)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-max(1, len(rows) // 4):]
    return {"config": cfg, "seed": seed, "params": n_params, "train_s": train_s,
            "s_per_step": train_s / cfg["steps"], "held_out": held, "train_set": fit,
            "final_loss": statistics.mean(r["loss"] for r in last),
            "train_class_acc": statistics.mean(r["class/accuracy"] for r in last
                                               if r.get("class/accuracy") is not None),
            "text_cosine": [rows[0].get("class/text_cosine"), rows[-1].get("class/text_cosine")],
            "run_dir": str(out)}


def lever_main(args) -> int:
    result = run_arm(args, args.arm)
    path = args.results / "ablation_levers.json"
    data = json.loads(path.read_text()) if path.is_file() else {"bench": "ablation_levers",
                                                                "arms": {}}
    data["arms"][args.arm] = dict(result, machine=machine())
    args.results.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
    rows = []
    for name, r in data["arms"].items():
        h, t = r["held_out"], r["train_set"]
        rows.append([name, r["params"], r["config"]["steps"], h["mask_AP"], h["agnostic_mask_AP"],
                     t["mask_AP"], t["agnostic_mask_AP"], h["matched_iou"],
                     h["matched_class_acc"], r["s_per_step"], r["train_s"]])
    print_table("levers: mixed queries, 1000 train / 100 held-out scenes, 1 thread",
                ["arm", "params", "steps", "AP held-out", "AP agn. held-out", "AP train",
                 "AP agn. train", "matched IoU", "matched class acc", "s/step", "train s"], rows)
    return 0


def summarise(runs: list[dict]) -> dict:
    """Mean over seeds of the figures in the table."""
    def mean(get):
        values = [get(r) for r in runs]
        values = [v for v in values if v is not None]
        return statistics.mean(values) if values else None

    return {
        "mask_AP": mean(lambda r: r["instance"]["metrics"]["mask_AP"]),
        "mask_AP50": mean(lambda r: r["instance"]["metrics"]["mask_AP50"]),
        "box_AP": mean(lambda r: r["instance"]["metrics"]["box_AP"]),
        "PQ": mean(lambda r: r["panoptic"]["metrics"]["PQ"]),
        "PQ_things": mean(lambda r: r["panoptic"]["metrics"]["PQ_things"]),
        "PQ_stuff": mean(lambda r: r["panoptic"]["metrics"]["PQ_stuff"]),
        "conditional_of_things": mean(
            lambda r: r["panoptic"]["query_split"]["conditional_of_things"]),
        "learnable_of_stuff": mean(lambda r: r["panoptic"]["query_split"]["learnable_of_stuff"]),
        "final_loss": mean(lambda r: r["final_loss"]),
        "train_s": mean(lambda r: r["train_s"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per mode (default 1200, quick: 60; an arm's own)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--n-train", type=int, default=1000, help="training scenes (quick: 16)")
    p.add_argument("--n-val", type=int, default=100, help="held-out scenes (quick: 8)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--text-encoder", default="hashed", help="hashed (fast) or minilm")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--arm", default=None, help=f"one lever arm: {', '.join(ARMS)}")
    args = p.parse_args(argv)
    if args.arm:
        import torch

        torch.set_num_threads(args.threads)
        return lever_main(args)
    args.steps = args.steps or 1200
    if args.quick:
        args.steps, args.n_train, args.n_val = 60, 16, 8
    import torch

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    train = scene_shards(args.data_dir, "train", args.n_train, seed=101)
    held_out = scene_shards(args.data_dir, "heldout", args.n_val, seed=202)
    run_dir = Path(args.data_dir) / "ablation" / f"runs-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True)
    mix = run_dir / "mix.yaml"
    mix.write_text(f"datasets:\n  - path: {train}\n    tasks: [instance, panoptic]\n"
                   f"    masks: [gt]\nexclude: [{held_out}]\n")
    results = {}
    for mode in MODES:
        runs = [train_and_eval(args, mix, held_out, mode, s, run_dir) for s in seeds]
        results[mode] = {"summary": summarise(runs), "runs": runs}
    base = results["mixed"]["summary"]
    rows = []
    for mode in MODES:
        s = results[mode]["summary"]
        s["mask_AP_ratio_to_mixed"] = s["mask_AP"] / base["mask_AP"] if base["mask_AP"] else None
        s["PQ_ratio_to_mixed"] = s["PQ"] / base["PQ"] if base["PQ"] else None
        rows.append([mode, s["mask_AP"], s["mask_AP50"], s["box_AP"], s["PQ"], s["PQ_things"],
                     s["PQ_stuff"], s["mask_AP_ratio_to_mixed"], s["conditional_of_things"],
                     s["learnable_of_stuff"], s["final_loss"], s["train_s"]])
        check(s["mask_AP"] is not None and 0 <= s["mask_AP"] <= 1, f"{mode}: mask AP out of range")
    print_table(f"query ablation, tiny model, {args.steps} steps x batch {args.batch_size} at "
                f"{args.image_size}px, {args.n_train} train / {args.n_val} held-out scenes, "
                f"seeds {args.seeds}",
                ["queries", "mask AP", "mask AP50", "box AP", "PQ", "PQ th", "PQ st", "AP / mixed",
                 "cond. share of things", "learn. share of stuff", "final loss", "train s"], rows)
    console.print("query-type shares: matched held-out panoptic targets (Hungarian matching of "
                  "the final decoder stage)")
    config = {k: getattr(args, k) for k in ("steps", "seeds", "n_train", "n_val", "image_size",
                                            "batch_size", "lr", "text_encoder", "threads")}
    config.update(train_scenes_seed=101, held_out_scenes_seed=202, run_dir=str(run_dir))
    write_results("ablation", args, config, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
