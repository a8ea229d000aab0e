"""The paper's claims in miniature, several seeds per arm (bench/ablation.py --claim NAME).

- table2: `--queries mixed` vs `learnable` vs `conditional` (MQ-Former's Table 2): held-out instance
  mask AP (per class and class-agnostic), panoptic PQ (things / stuff), semantic mIoU, and the
  query-type split of the matched held-out panoptic targets (the paper: conditional queries take
  99.6% of things, learnable ones 53.3% of stuff, on COCO).
- masks (Fig. 6, masks): train on set A's ground-truth masks only vs A plus a set B whose masks
  `engine synthesize` made from B's boxes alone (GrabCut); held-out instance AP on A's
  distribution.
- captions (Fig. 6, captions): referring trained with category-name prompts only (the template
  captioner's first caption, "a star") vs the same objects with all the template captions ("a red
  star on the left"); held-out referring cIoU / mIoU against the full template captions.

Every arm trains the same recipe (an arm of ablation.ARMS) for the same steps from the same seeds;
a paired comparison (per-seed difference to the first arm: mean, sd, wins, paired t-test p) goes
beside the mean +- sd of each arm.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import time
from pathlib import Path

from _common import check, console, print_table

from engine.cli import main as engine

TRAIN_SEED, HELD_OUT_SEED, EXTRA_SEED = 101, 202, 303


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(first: list[float], other: list[float]) -> dict:
    """Per-seed differences other - first: mean, sd, how many seeds `other` wins, paired t p
    (seeds where either value is missing are left out of all of them)."""
    from scipy.stats import ttest_rel

    pairs = [(a, b) for a, b in zip(first, other, strict=True) if a is not None and b is not None]
    diffs = [b - a for a, b in pairs]
    mean, sd = _mean_sd(diffs)
    p = None
    if len(diffs) >= 2 and any(d != diffs[0] for d in diffs):
        p = float(ttest_rel([b for _, b in pairs], [a for a, _ in pairs]).pvalue)
    return {"diff_mean": mean, "diff_sd": sd, "wins": sum(d > 0 for d in diffs),
            "seeds": len(diffs), "p": p}


def engine_eval(ckpt: Path, data: Path, task: str) -> dict:
    """`engine eval` of a checkpoint on a shard folder -> its result JSON (metrics, query split)."""
    dest = ckpt.parent / f"eval-{task}-{data.name}.json"
    with contextlib.redirect_stdout(io.StringIO()):  # its table; the figures are in dest
        code = engine(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--task", task,
                       "--out", str(dest), "--device", "cpu"])
    check(code == 0, f"engine eval --task {task} of {ckpt} on {data} failed")
    return json.loads(dest.read_text())


def synthesize(root: Path, annotations: Path, out: Path, *extra: str) -> Path:
    """`engine synthesize --source coco` of a scenes folder into `out` (cached)."""
    if not (out / "manifest.json").is_file():
        code = engine(["synthesize", "--source", "coco", "--root", str(root.resolve()),
                       "--annotations", str(annotations), "--out", str(out),
                       "--executor", "local", "--unit-size", "100", *extra])
        check(code == 0, f"engine synthesize of {root} into {out} failed")
    return out


def write_mix(path: Path, datasets: list[dict], exclude: Path) -> Path:
    lines = ["datasets:"]
    for d in datasets:
        lines.append(f"  - path: {d['path']}")
        lines += [f"    {k}: {v}" for k, v in d.items() if k != "path"]
    lines.append(f"exclude: [{exclude}]")
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------- the claims
def table2_arms(ctx) -> dict[str, dict]:
    train = ctx.scene_shards("train", ctx.args.n_train, TRAIN_SEED)
    mix = [{"path": train, "tasks": "[instance, panoptic]", "masks": "[gt]"}]
    return {mode: {"queries": mode, "mix": mix} for mode in ("mixed", "learnable", "conditional")}


def table2_measure(ctx, ckpt: Path, model) -> dict:
    held = ctx.held_out
    out = ctx.diagnose(model, held)
    pan = engine_eval(ckpt, held, "panoptic")
    sem = engine_eval(ckpt, held, "semantic")
    out.update(PQ=pan["metrics"]["PQ"], PQ_things=pan["metrics"]["PQ_things"],
               PQ_stuff=pan["metrics"]["PQ_stuff"], sem_mIoU=sem["metrics"]["mIoU"],
               stuff_IoU=sem["metrics"].get("iou_per_class", {}).get(ctx.stuff),
               conditional_of_things=pan["query_split"]["conditional_of_things"],
               learnable_of_stuff=pan["query_split"]["learnable_of_stuff"])
    return out


def masks_arms(ctx) -> dict[str, dict]:
    """A: n_a scenes with their GT masks; B: n_b other scenes given as boxes only, masked by
    GrabCut through `engine synthesize` (the paper's synthesized-mask data)."""
    n_a, n_b = ctx.args.n_a, ctx.args.n_b
    a = ctx.scene_shards("train", n_a, TRAIN_SEED)
    b_root = ctx.scenes_root("extra", n_b, EXTRA_SEED)
    b = synthesize(b_root, b_root / "scenes.json", b_root.with_name(b_root.name + "-grabcut"),
                   "--masker", "grabcut")
    a_only = [{"path": a, "tasks": "[instance]", "masks": "[gt]"}]
    with_b = a_only + [{"path": b, "tasks": "[instance]", "masks": "[synthesized]",
                        "weight": n_b / n_a}]
    return {"A gt": {"mix": a_only}, "A gt + B grabcut": {"mix": with_b}}


def masks_measure(ctx, ckpt: Path, model) -> dict:
    return ctx.diagnose(model, ctx.held_out)


def captions_arms(ctx) -> dict[str, dict]:
    """The same scenes and GT masks, referring prompts = the category name only vs every template
    caption (`--captions-per-object 1` keeps the plain "a star")."""
    root = ctx.scenes_root("train", ctx.args.n_train, TRAIN_SEED)
    gt = root / "scenes_gt.json"
    names = synthesize(root, gt, root.with_name(root.name + "-names"), "--masker", "box",
                       "--captions-per-object", "1")
    full = synthesize(root, gt, root.with_name(root.name + "-captions"), "--masker", "box")
    arm = {"tasks": "[instance, referring]", "masks": "[gt]"}
    return {"names": {"mix": [dict(arm, path=names)]},
            "names + captions": {"mix": [dict(arm, path=full)]}}


def captions_measure(ctx, ckpt: Path, model) -> dict:
    held_root = ctx.scenes_root("heldout", ctx.args.n_val, HELD_OUT_SEED)
    held = synthesize(held_root, held_root / "scenes_gt.json",
                      held_root.with_name(held_root.name + "-captions"), "--masker", "box")
    ref = engine_eval(ckpt, held, "referring")
    return {"cIoU": ref["metrics"]["cIoU"], "mIoU": ref["metrics"]["mIoU"],
            "expressions": ref["targets"], **{f"instance_{k}": v for k, v in
                                              ctx.diagnose(model, ctx.held_out).items()}}


CLAIMS = {
    "table2": (table2_arms, table2_measure, ["mask_AP", "agnostic_mask_AP", "PQ", "PQ_things",
                                              "PQ_stuff", "sem_mIoU", "stuff_IoU",
                                              "conditional_of_things", "learnable_of_stuff"]),
    "masks": (masks_arms, masks_measure, ["mask_AP", "agnostic_mask_AP", "mask_AP50",
                                          "matched_iou"]),
    "captions": (captions_arms, captions_measure, ["cIoU", "mIoU", "instance_mask_AP"]),
}


def run_claim(ctx, name: str, seeds: list[int]) -> dict:
    """Every arm of claim `name` for every seed -> per-run figures, mean +- sd, paired diffs."""
    if name not in CLAIMS:
        raise ValueError(f"unknown claim {name!r}; choose one of: {', '.join(CLAIMS)}")
    make_arms, measure, keys = CLAIMS[name]
    arms = make_arms(ctx)
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for seed in seeds:  # seed-major: a stopped run still has complete pairs
        for arm, spec in arms.items():
            out = ctx.run_dir / f"{name}-{arm.replace(' ', '_').replace('+', 'plus')}-s{seed}"
            mix = write_mix(out.with_suffix(".yaml"), spec["mix"], ctx.held_out)
            ckpt, model, stats = ctx.train(mix, out, seed, spec.get("queries", "mixed"))
            runs[arm].append(dict(stats, seed=seed, **measure(ctx, ckpt, model)))
            console.print(f"{name} / {arm} / seed {seed}: " + ", ".join(
                f"{k} {runs[arm][-1][k]:.4f}" for k in keys[:3]
                if runs[arm][-1].get(k) is not None))
    summary = summarize(runs, keys)
    _print_claim(name, seeds, keys, summary, next(iter(arms)))
    return {"claim": name, "seeds": seeds, "arms": list(arms), "summary": summary, "runs": runs}


def summarize(runs: dict[str, list[dict]], keys: list[str]) -> dict:
    """Mean +- sd of every arm's runs, and each later arm's paired differences with the first."""
    first = next(iter(runs))
    summary = {}
    for arm, rs in runs.items():
        summary[arm] = {k: dict(zip(("mean", "sd"), _mean_sd([r.get(k) for r in rs]),
                                    strict=True)) for k in keys}
        if arm != first:
            summary[arm]["paired_vs_" + first] = {
                k: paired([r.get(k) for r in runs[first]], [r.get(k) for r in rs])
                for k in keys}
    return summary


def combine(parts: list[dict]) -> dict:
    """One claim result from several recorded ones of the same claim and recipe run on other
    seeds (side by side on both cores): their runs joined seed by seed, summarized again."""
    first = parts[0]
    for part in parts[1:]:
        for key in ("claim", "recipe", "arms", "n_train", "n_val", "text_encoder"):
            if part.get(key) != first.get(key):
                raise ValueError(f"cannot combine: {key} differs ({first.get(key)} vs "
                                 f"{part.get(key)})")
    seeds = [seed for part in parts for seed in part["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"cannot combine: a seed is in two parts ({seeds})")
    runs = {arm: sorted((r for part in parts for r in part["runs"][arm]),
                        key=lambda r: r["seed"]) for arm in first["arms"]}
    keys = CLAIMS[first["claim"]][2]
    summary = summarize(runs, keys)
    _print_claim(first["claim"], sorted(seeds), keys, summary, first["arms"][0])
    return dict(first, seeds=sorted(seeds), summary=summary, runs=runs,
                run_dir=[part["run_dir"] for part in parts])


def _fmt(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.3f} ± {stat['sd']:.3f}"


def _print_claim(name: str, seeds: list[int], keys: list[str], summary: dict, first: str) -> None:
    rows = [[k] + [_fmt(s[k]) for s in summary.values()] for k in keys]
    print_table(f"claim {name}: mean ± sd over seeds {seeds}", ["metric"] + list(summary), rows)
    diff_rows = []
    for arm, s in summary.items():
        if arm == first:
            continue
        for k in keys:
            d = s["paired_vs_" + first][k]
            if d["diff_mean"] is None:
                continue
            diff_rows.append([f"{arm} - {first}", k, f"{d['diff_mean']:+.4f}",
                              f"{d['diff_sd']:.4f}", f"{d['wins']}/{d['seeds']}",
                              "-" if d["p"] is None else f"{d['p']:.3f}"])
    print_table(f"claim {name}: paired per-seed differences", ["pair", "metric", "mean diff",
                                                                "sd", "wins", "paired t p"],
                diff_rows)


def run_dir(data_dir: Path, name: str) -> Path:
    path = Path(data_dir) / "ablation" / f"claim-{name}-{time.strftime('%Y%m%d-%H%M%S')}-" \
        f"{os.getpid()}"
    path.mkdir(parents=True)
    return path
