"""MQ-Former in miniature on CPU: training levers one at a time, and the paper's claims with seeds.

Data: generated scenes (pipelines/scenes.py, exact masks) on two seeds: a training set and a
disjoint held-out set. `--scenes plain` (the default: a texture background, flat shaded fills,
160x160) is the miniature in which a 0.3M-parameter model learns within minutes; `--scenes photo
--scene-size 320x240` is the harder set of the first levers (photo backgrounds and fills). Each
scene's ground truth is its objects (things: horse, ellipse, star, polygon) plus one stuff region,
`background` (every pixel no object covers, {"isthing": false}), so both halves of the paper's
query-type split can be measured. The COCO files become `gt` shards through `engine synthesize
--source coco`; the held-out shards are also every mixture's `exclude` set.

Levers (`--arm NAME [--set KEY=VALUE ...] [--tag NAME]`): the mixed model under one recipe of
`ARMS` (each differs from `base` in one lever; `--set` overrides one field, e.g.
`model_options.pool_masks=true`), trained in-process (model.train.train) on 1000 training scenes
and measured on the 100 held-out scenes and on 100 of the training scenes: per-class and
class-agnostic mask AP (every category relabelled as one), the mean mask IoU of the queries the
Hungarian matcher assigns to the held-out targets, and how often such a query's best text is its
target's (matched-class accuracy); wall and CPU seconds of training. Merged into
bench/results/ablation_levers.json.

    .venv/bin/python bench/ablation.py --arm long
    .venv/bin/python bench/ablation.py --arm long-dec4 --set 'tasks=["instance"]' --tag inst
    .venv/bin/python bench/ablation.py --rediagnose long   # again from its checkpoint, as today

Claims (`--claim table2|masks|captions --seeds 0,1,2`, bench/_claims.py): every arm of one of the
paper's claims under one recipe (`--arm`, default `claims`), each seed, mean +- sd and a paired
per-seed comparison with the first arm. Merged into bench/results/ablation_claims.json.

    .venv/bin/python bench/ablation.py --claim table2 --seeds 0,1,2
    .venv/bin/python bench/ablation.py --claim table2 --quick      # 30 steps, 16 scenes, 2 seeds

Seeds side by side (one process per core), then joined:

    .venv/bin/python bench/ablation.py --claim table2 --seeds 0,1 --tag t2-a &
    .venv/bin/python bench/ablation.py --claim table2 --seeds 2 --tag t2-b
    .venv/bin/python bench/ablation.py --claim table2 --combine t2-a,t2-b --tag table2
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from _common import check, machine, parser, print_table
from pycocotools import mask as mask_utils

from engine.cli import main as engine
from pipelines.scenes import write_scenes

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


def scenes_root(data_dir: Path, name: str, n: int, seed: int, style: str = "photo",
                size: tuple[int, int] = (320, 240)) -> Path:
    """The folder of n generated scenes (seed, style, (width, height)), written once."""
    tag = "" if (style, size) == ("photo", (320, 240)) else f"-{style}{size[0]}x{size[1]}"
    root = Path(data_dir) / "ablation" / f"{name}-{n}-s{seed}{tag}"
    if not (root / "scenes_gt.json").is_file():
        write_scenes(root, n, seed=seed, style=style, width=size[0], height=size[1])
    return root


def scene_shards(data_dir: Path, name: str, n: int, seed: int, style: str = "photo",
                 size: tuple[int, int] = (320, 240)) -> Path:
    """Shards of n generated scenes with gt things + background stuff; cached. The shards live
    beside the scenes folder: the engine refuses an --out inside its dataset root."""
    root = scenes_root(data_dir, name, n, seed, style, size)
    shards = root.with_name(root.name + "-shards")
    if not (shards / "manifest.json").is_file():
        code = engine(["synthesize", "--source", "coco", "--root", str(root.resolve()),
                       "--annotations", str(add_stuff(root / "scenes_gt.json")), "--out",
                       str(shards), "--masker", "box", "--executor", "local", "--unit-size",
                       "100"])
        check(code == 0, f"engine synthesize of {root} failed")
    return shards


# One lever changed from `base` per arm (the list); steps chosen to fit <= 12 minutes of
# 1-thread CPU training on the shared 2-core box.
BASE = dict(queries="mixed", model="tiny", image_size=128, batch_size=4, steps=1500, lr=5e-4,
            warmup=50, num_points=1024, full_mask=False, model_options={}, loss_weights={},
            tasks=["instance", "panoptic"], ema_decay=0.0)
# plain 160 px scenes, lr 1e-3, 4x Mask DINO's class weight and 4 decoder layers (the levers of
# `long-cls16` and `long-dec4` below); the arms after those differ from it in steps and points
DEC4 = dict(image_size=160, lr=1e-3, loss_weights={"loss_class": 16.0},
            model_options={"dec_layers": 4})
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
    # on plain 160 px scenes (--scenes plain, the default): the combo at the scenes' own size,
    # for as long as fits 12 minutes of 1-thread CPU
    "long": dict(image_size=160, lr=1e-3, steps=4000),
    # the best measured: `long` with 4x Mask DINO's class weight (2x: long-cls8)
    "long-cls16": dict(image_size=160, lr=1e-3, steps=4000, loss_weights={"loss_class": 16.0}),
    "long-cls8": dict(image_size=160, lr=1e-3, steps=4000, loss_weights={"loss_class": 8.0}),
    # long-cls16 with 4 decoder layers: the queries' self-attention gets to suppress duplicates
    "long-dec4": dict(DEC4, steps=4000),
    # the best measured (held-out mask AP 0.351 in 18 CPU minutes: over the 12 of the issue)
    "long-dec4-4800": dict(DEC4, steps=4800, num_points=512),
    # the recipe of the claims (--claim): the combo at 160 px, short enough for 3 seeds x 7 arms
    "claims": dict(image_size=160, lr=1e-3, steps=1200),
    # long-dec4-4800 at twice the learning rate (at 3,100 steps 2e-3 gave 0.257, 1e-3 0.215)
    "long-dec4-lr2": dict(DEC4, lr=2e-3, steps=4800, num_points=512),
    # after the stacked criterion (0.14 s per step instead of 0.23): the steps that fit 12 CPU
    # minutes, and twice the batch for as many images per CPU second (a step of 8 costs 1.44x 4)
    "long-dec4-5100": dict(DEC4, steps=5100, num_points=512),
    "dec4-b8": dict(DEC4, lr=2e-3, steps=3400, num_points=512, batch_size=8),
    # long-dec4-5100's recipe with an average of the weights (decay 0.999: about the last
    # thousand steps), for the steps that fit 12 CPU minutes with room for the box's variance;
    # within noise of the same runs' live weights (-0.005 / +0.015)
    "dec4-ema": dict(DEC4, steps=4600, num_points=512, ema_decay=0.999),
    # the class head sees each query's mask shape (model/heads.py shape_masks): with every query
    # given its best-matching object's class, long-dec4-5100 seed 0 scored 0.61 instead of 0.33.
    # At 4600 steps it reached 0.43 / 0.40 in 12.9 CPU minutes; 3800 steps fit 12 with room
    "dec4-shape": dict(DEC4, steps=3800, num_points=512,
                       model_options={"dec_layers": 4, "shape_masks": True}),
    # the claims again under what long-dec4 found (class weight 16, 4 decoder layers)
    "claims-dec4": dict(DEC4, steps=1200),
    # and under dec4-shape's class head
    "claims-shape": dict(DEC4, steps=1200, model_options={"dec_layers": 4, "shape_masks": True}),
}


def arm_config(name: str, steps: int | None) -> dict:
    if name not in ARMS:
        raise ValueError(f"unknown arm {name!r}; choose one of: {', '.join(ARMS)}")
    cfg = dict(BASE, **ARMS[name])
    if steps:
        cfg["steps"] = steps
    return cfg


def apply_overrides(cfg: dict, assignments: list[str]) -> dict:
    """cfg with `key=value` assignments applied (value parsed as JSON, else a string); a dotted
    key sets one entry of a dict option: `model_options.dn_groups=3`."""
    cfg = json.loads(json.dumps(cfg))
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node.setdefault(part, {})
        if not parents and leaf not in cfg:
            raise ValueError(f"--set {key}: unknown; choose one of: {', '.join(cfg)}")
        node[leaf] = value
    return cfg


def best_copies(predictions: list[dict]) -> list[dict]:
    """Each query's best-scoring copy: the top-100 over queries x texts holds a query once per
    text it scores, with the same box and mask (a query is identified by its image and box)."""
    best: dict[tuple, dict] = {}
    for p in predictions:
        key = (p["image_id"], tuple(p["box"]))
        if key not in best or p["score"] > best[key]["score"]:
            best[key] = p
    return list(best.values())


def one_label_per_query(predictions: list[dict]) -> list[dict]:
    """Class-agnostic copies of instance predictions: relabelled as one category, a query's
    copies would be duplicates (false positives), so only its best copy stays."""
    return [dict(p, category="object") for p in best_copies(predictions)]


def oracle_classes(gt: list[dict], predictions: list[dict]) -> list[dict]:
    """Each query once (its best-scoring copy), relabelled with the category of the ground-truth
    object its mask overlaps most (IoU through pycocotools): the AP this model's masks and
    ranking would get from a perfect classifier. Unmatched queries keep their own label."""
    from model.evaluate import _as_rle

    objects = {im["image_id"]: im["objects"] for im in gt}
    gt_rles = {i: [_as_rle(o["mask"]) for o in objs] for i, objs in objects.items()}
    out = []
    for p in best_copies(predictions):
        rles = gt_rles[p["image_id"]]
        label = p["category"]
        if rles:
            ious = mask_utils.iou([_as_rle(p["mask"])], rles, [0] * len(rles))[0]
            if ious.max() > 0:
                label = objects[p["image_id"]][int(ious.argmax())]["category"]
        out.append(dict(p, category=label))
    return out


def diagnose(model, shards: Path, image_size: int, limit: int | None = None) -> dict:
    """Per-class and class-agnostic mask AP, matched-query mask IoU and class accuracy of
    `model` on the instance targets of a shard folder; the oracle-class AP (oracle_classes) and
    the matched queries' confusions ("ground truth -> predicted": count)."""
    from collections import Counter
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
    ious, correct, total, confusion = [], 0, 0, Counter()
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
        predicted = out["pred_logits"][src].argmax(-1)
        correct += int((predicted == target["labels"][tgt]).sum())
        total += len(src)
        texts = target["texts"]
        confusion.update(f"{texts[g]} -> {texts[q]}"
                         for g, q in zip(target["labels"][tgt].tolist(), predicted.tolist(),
                                         strict=True))
    per_class = instance_ap(evaluator.gt, evaluator.pred)
    agnostic_gt = [dict(im, objects=[dict(o, category="object") for o in im["objects"]])
                   for im in evaluator.gt]
    agnostic = instance_ap(agnostic_gt, one_label_per_query(evaluator.pred))
    return {"mask_AP": per_class["mask_AP"], "mask_AP50": per_class["mask_AP50"],
            "box_AP": per_class["box_AP"], "agnostic_mask_AP": agnostic["mask_AP"],
            "agnostic_mask_AP50": agnostic["mask_AP50"],
            "matched_iou": statistics.mean(ious) if ious else None,
            "matched_class_acc": correct / total if total else None, "images": evaluator.images,
            "oracle_class_mask_AP": instance_ap(evaluator.gt, oracle_classes(
                evaluator.gt, evaluator.pred))["mask_AP"],
            "confusion": dict(sorted(confusion.items()))}


class Bench:
    """What every arm shares: the recipe (an arm of ARMS with --set overrides), the scene sets,
    training in-process (model.train.train) and the diagnosis."""

    def __init__(self, args, arm: str):
        self.args = args
        self.cfg = apply_overrides(arm_config(arm, args.steps), args.set)
        self.scenes = dict(style=args.scenes, size=args.scene_size)
        self.held_out = self.scene_shards("heldout", args.n_val, 202)
        self.stuff = STUFF
        self.run_dir: Path | None = None

    def scenes_root(self, name: str, n: int, seed: int) -> Path:
        return scenes_root(self.args.data_dir, name, n, seed, **self.scenes)

    def scene_shards(self, name: str, n: int, seed: int) -> Path:
        return scene_shards(self.args.data_dir, name, n, seed, **self.scenes)

    def diagnose(self, model, shards: Path, limit: int | None = None) -> dict:
        return diagnose(model, shards, self.cfg["image_size"], limit)

    def train(self, mix: Path, out: Path, seed: int, queries: str | None = None):
        """Train the recipe on a mixture -> (checkpoint, model, figures of the run)."""
        from model.checkpoint import load_checkpoint_file
        from model.data import MixtureLoader
        from model.inference import load_model
        from model.mixture import load_mixture
        from model.train import TrainConfig, train

        cfg = self.cfg
        config = TrainConfig(out_dir=str(out), model_size=cfg["model"],
                             queries=queries or cfg["queries"],
                             text_encoder=self.args.text_encoder, max_iters=cfg["steps"],
                             lr=cfg["lr"], warmup_iters=min(cfg["warmup"], cfg["steps"] // 10),
                             grad_clip=1.0, num_points=cfg["num_points"],
                             full_mask_loss=cfg["full_mask"], log_interval=20,
                             ckpt_interval=cfg["steps"], seed=seed, device="cpu",
                             tensorboard=False, model_options=cfg["model_options"],
                             loss_weights=cfg["loss_weights"], ema_decay=cfg["ema_decay"],
                             data={"image_size": cfg["image_size"]})
        loader = MixtureLoader(load_mixture(mix), image_size=cfg["image_size"],
                               batch_size=cfg["batch_size"], seed=seed, train=True,
                               cache_images=max(1100, self.args.n_train + 100))
        start, cpu_start = time.perf_counter(), time.process_time()
        ckpt = train(config, loader)
        train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        model = load_model(load_checkpoint_file(ckpt))
        model.eval()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        last = rows[-max(1, len(rows) // 4):]
        accuracy = [r["class/accuracy"] for r in last if r.get("class/accuracy") is not None]
        return Path(ckpt), model, {
            "params": sum(p.numel() for p in model.parameters()), "train_s": train_s,
            "train_cpu_s": train_cpu_s, "s_per_step": train_s / cfg["steps"],
            "final_loss": statistics.mean(r["loss"] for r in last),
            "train_class_acc": statistics.mean(accuracy) if accuracy else None,
            "text_cosine": [rows[0].get("class/text_cosine"), rows[-1].get("class/text_cosine")],
            "run_dir": str(out)}


def run_arm(args, name: str) -> dict:
    """Train the mixed model under arm `name` and diagnose it on held-out and training scenes."""
    import torch

    bench = Bench(args, name)
    train_shards = bench.scene_shards("train", args.n_train, 101)
    out = Path(args.data_dir) / "ablation" / (f"arm-{args.tag or name}-"
                                              f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    out.mkdir(parents=True)
    mix = out / "mix.yaml"
    mix.write_text(f"datasets:\n  - path: {train_shards}\n"
                   f"    tasks: [{', '.join(bench.cfg['tasks'])}]\n"
                   f"    masks: [gt]\nexclude: [{bench.held_out}]\n")
    seed = int(args.seeds.split(",")[0])
    ckpt, model, stats = bench.train(mix, out, seed)
    with torch.no_grad():
        held = bench.diagnose(model, bench.held_out)
        fit = bench.diagnose(model, train_shards, limit=args.n_val)
    return dict(stats, config=bench.cfg, seed=seed, n_train=args.n_train, held_out=held,
                train_set=fit)


def merge_result(path: Path, bench: str, section: str, key: str, value: dict) -> dict:
    """Add `value` under data[section][key] of the JSON results file at `path`, atomically and
    under a lock (arms run side by side on both cores); -> the whole file's data."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.is_file() else {"bench": bench, section: {}}
        data.setdefault(section, {})[key] = value
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        tmp.replace(path)
    return data


def rediagnose(args, tag: str) -> dict:
    """The recorded arm `tag` measured again from its run's checkpoint with today's inference and
    diagnosis (the training figures stay); the older figures are kept under `previous`."""
    import torch

    from model.checkpoint import load_checkpoint_file
    from model.inference import load_model
    from model.mixture import load_mixture

    path = args.results / "ablation_levers.json"
    arms = json.loads(path.read_text())["arms"] if path.is_file() else {}
    check(tag in arms, f"--rediagnose {tag}: no such arm in {path}")
    result = arms[tag]
    run = Path(result["run_dir"])
    ckpt = next((p for p in (run / "ckpt.pt", run / "last.pt") if p.is_file()), None)
    check(ckpt is not None, f"--rediagnose {tag}: {run} holds no checkpoint (removed?)")
    mix = load_mixture(run / "mix.yaml")  # the run's own training and held-out shards
    model = load_model(load_checkpoint_file(ckpt))
    model.eval()
    size = result["config"]["image_size"]
    with torch.no_grad():
        held = diagnose(model, Path(mix.exclude[0]), size)
        fit = diagnose(model, Path(mix.datasets[0].path), size, args.n_val)
    previous = {k: result[k] for k in ("held_out", "train_set")}
    return dict(result, held_out=held, train_set=fit, previous=previous,
                rediagnosed=machine())


def lever_main(args) -> int:
    if args.rediagnose:
        result, key = rediagnose(args, args.rediagnose), args.rediagnose
    else:
        result, key = run_arm(args, args.arm), args.tag or args.arm
        result.update(scenes=args.scenes, scene_size=args.scene_size, overrides=args.set,
                      text_encoder=args.text_encoder, machine=machine())
    data = merge_result(args.results / "ablation_levers.json", "ablation_levers", "arms",
                        key, result)
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


def claim_main(args) -> int:
    """--claim NAME: every arm of one of the paper's claims (bench/_claims.py), several seeds."""
    import _claims

    if args.combine:
        return combine_main(args)

    seeds = [int(v) for v in args.seeds.split(",")]
    bench = Bench(args, args.arm or "claims")
    bench.run_dir = _claims.run_dir(args.data_dir, args.claim)
    result = _claims.run_claim(bench, args.claim, seeds)
    result.update(claim=args.claim, recipe=bench.cfg, scenes=args.scenes,
                  scene_size=args.scene_size, text_encoder=args.text_encoder,
                  n_train=args.n_train, n_val=args.n_val,
                  run_dir=str(bench.run_dir))
    name = "ablation_claims" + (".quick" if args.quick else "")
    merge_result(args.results / f"{name}.json", "ablation_claims", "claims",
                 args.tag or args.claim,
                 dict(result, machine=machine()))
    for arm, runs in result["runs"].items():
        for r in runs:
            check(all(0 <= r[k] <= 1 for k in ("mask_AP", "cIoU") if r.get(k) is not None),
                  f"{args.claim} / {arm}: a metric out of [0, 1]")
    return 0


def combine_main(args) -> int:
    """--claim NAME --combine TAG,TAG --tag NEW: recorded parts of one claim (other seeds, run
    side by side) joined under NEW; the parts stay in the file."""
    import _claims

    path = args.results / ("ablation_claims" + (".quick" if args.quick else "") + ".json")
    recorded = json.loads(path.read_text())["claims"] if path.is_file() else {}
    tags = args.combine.split(",")
    missing = [t for t in tags if t not in recorded]
    check(not missing, f"--combine: no recorded claim {', '.join(missing)} in {path}")
    check(args.tag, "--combine needs --tag NEW (the combined result's name)")
    parts = [recorded[t] for t in tags]
    check(all(p["claim"] == args.claim for p in parts), f"--combine: not all are {args.claim}")
    try:
        combined = _claims.combine(parts)
    except ValueError as exc:
        check(False, f"--combine {args.combine}: {exc}")
    merge_result(path, "ablation_claims", "claims", args.tag,
                 dict(combined, combined_from=tags, machine=machine()))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the arm's)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated training seeds (default 0; quick: 0,1)")
    p.add_argument("--n-train", type=int, default=1000, help="training scenes (quick: 16)")
    p.add_argument("--n-val", type=int, default=100, help="held-out scenes (quick: 8)")
    p.add_argument("--n-a", type=int, default=250, help="claim masks: set A's scenes (GT masks)")
    p.add_argument("--n-b", type=int, default=750,
                   help="claim masks: set B's scenes (boxes only, GrabCut masks)")
    p.add_argument("--text-encoder", default="hashed", help="hashed (fast) or minilm")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--arm", default=None, help=f"the recipe: one of {', '.join(ARMS)}")
    p.add_argument("--claim", default=None, choices=("table2", "masks", "captions"),
                   help="run one of the paper's claims (all its arms, every seed)")
    p.add_argument("--combine", default=None, metavar="TAG,TAG",
                   help="with --claim and --tag: join recorded parts of one claim run on other "
                        "seeds (side by side) under --tag")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field of the arm's recipe (repeatable)")
    p.add_argument("--tag", default=None,
                   help="the arm's (or claim's) name in the results (default --arm / --claim)")
    p.add_argument("--rediagnose", default=None, metavar="TAG",
                   help="measure a recorded arm again from its checkpoint (today's diagnosis)")
    p.add_argument("--scenes", default="plain", choices=("photo", "plain"),
                   help="scene style (pipelines/scenes.py)")
    p.add_argument("--scene-size", default=(160, 160),
                   type=lambda v: tuple(int(x) for x in v.lower().split("x")),
                   help="scene width x height, e.g. 160x160")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.n_train, args.n_val, args.n_a, args.n_b = 30, 16, 8, 8, 8
        args.seeds = args.seeds or "0,1"
    args.seeds = args.seeds or "0"
    if args.quick and not args.arm and not args.claim:
        args.claim = "table2"  # `make bench`: the smoke test of the claims path
    if not args.arm and not args.claim and not args.rediagnose:
        p.error("give --arm NAME (one recipe, one seed), --claim NAME (several seeds) or "
                "--rediagnose TAG")
    import torch

    torch.set_num_threads(args.threads)
    return claim_main(args) if args.claim else lever_main(args)  # --arm / --rediagnose


if __name__ == "__main__":
    sys.exit(main())
