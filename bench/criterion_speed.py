"""Speed of the set criterion (Hungarian matching + losses, forward and backward), three ways.

On a CPU-sized MQ-Former the criterion was a quarter of a training step: deep supervision scores
every decoder stage (5 with 4 decoder layers, plus the encoder proposals) and each stage was
matched and scored sample by sample, thousands of tiny tensor ops a step. Measured in one run on
the same model outputs, with the same matcher and loss code:

- per sample: every (stage, sample) pair on its own, as the criterion did before
  (`HungarianMatcher` and `SetCriterion.stage_losses` called on one sample at a time);
- per stage: each stage batched over its samples;
- stacked: `SetCriterion.forward`, the decoder stages stacked along the batch as one pass.

Time = matching, losses and their backward to the model outputs (leaf tensors here, so the model's
own backward is left out). Self-check first: with deterministic matching and points (no mask cost,
full-mask loss) the three give the same total loss.

    .venv/bin/python bench/criterion_speed.py [--quick] [--batch-size 4] [--image-size 160]
"""

from __future__ import annotations

import sys

import torch
from _common import check, console, median_of, parser, print_table, write_results
from train_throughput import demo_shards

from model.build import build_mqformer
from model.criterion import DEFAULT_WEIGHTS, SetCriterion, prediction_stages
from model.data import MixtureLoader
from model.matcher import HungarianMatcher
from model.mixture import parse_mixture

OUTPUT_KEYS = ("pred_logits", "pred_boxes", "pred_masks")


def leaf_outputs(outputs: dict) -> dict:
    """The model's outputs as leaf tensors that require grad (the criterion's backward alone)."""
    def leaf(stage: dict) -> dict:
        return {k: stage[k].detach().clone().requires_grad_(True) for k in OUTPUT_KEYS}

    out = dict(leaf(outputs), query_types=outputs["query_types"],
               text_embed=outputs["text_embed"].detach(),
               aux_outputs=[leaf(s) for s in outputs["aux_outputs"]])
    if "interm_outputs" in outputs:
        out["interm_outputs"] = leaf(outputs["interm_outputs"])
    return out


def weighted(losses: dict) -> torch.Tensor:
    return sum(DEFAULT_WEIGHTS[k] * v for k, v in losses.items())


def normalisers(targets: list[dict]) -> tuple[float, float]:
    """(num_boxes, num_masks) of the whole batch, as SetCriterion.forward divides by on one
    process, whatever piece of the batch is scored."""
    return (max(sum(len(t["labels"]) for t in targets), 1),
            max(sum(len(t["labels"]) for t in targets if t["has_masks"]), 1))


def per_sample(crit: SetCriterion, outputs: dict, targets: list[dict]) -> torch.Tensor:
    norms, total = normalisers(targets), 0.0
    for _, stage in prediction_stages(outputs):
        for b, target in enumerate(targets):
            one = {k: stage[k][b:b + 1] for k in OUTPUT_KEYS}
            indices = crit.matcher(one, [target])
            total = total + weighted(crit.stage_losses(one, [target], indices, *norms))
    return total


def per_stage(crit: SetCriterion, outputs: dict, targets: list[dict]) -> torch.Tensor:
    norms, total = normalisers(targets), 0.0
    for _, stage in prediction_stages(outputs):
        indices = crit.matcher(stage, targets)
        total = total + weighted(crit.stage_losses(stage, targets, indices, *norms))
    return total


def stacked(crit: SetCriterion, outputs: dict, targets: list[dict]) -> torch.Tensor:
    return crit(outputs, targets)[0]["loss"]


WAYS = {"per sample": per_sample, "per stage": per_stage, "stacked": stacked}


def batches(args) -> list[tuple[dict, list[dict]]]:
    """Model outputs (leaves) and targets of a few training batches of the demo shards."""
    torch.manual_seed(0)
    model = build_mqformer("tiny", text_encoder="hashed", dec_layers=args.dec_layers)
    model.train()
    mix = parse_mixture({"datasets": [{"path": str(demo_shards(args.data_dir)),
                                       "tasks": ["instance", "panoptic"]}]})
    loader = iter(MixtureLoader(mix, image_size=args.image_size, batch_size=args.batch_size,
                                seed=0, train=True))
    out = []
    for _ in range(args.batches):
        batch = next(loader)
        targets = batch["targets"]
        with torch.no_grad():
            outputs = model(batch["images"], [t["texts"] for t in targets])
        out.append((leaf_outputs(outputs), targets))
    return out


def self_check(data: list[tuple[dict, list[dict]]]) -> None:
    crit = SetCriterion(HungarianMatcher(cost_mask=0.0, cost_dice=0.0), full_mask=True)
    for outputs, targets in data:
        totals = [float(fn(crit, outputs, targets).detach()) for fn in WAYS.values()]
        check(all(abs(t - totals[0]) <= 1e-4 * abs(totals[0]) for t in totals),
              f"the three ways disagree on the total loss: {totals}")


def measure(data, num_points: int, repeats: int) -> dict[str, float]:
    crit = SetCriterion(HungarianMatcher(num_points=num_points), num_points=num_points)

    def run(fn):
        def once():
            for outputs, targets in data:
                fn(crit, outputs, targets).backward()
        return once

    return {name: median_of(run(fn), repeats)[0] / len(data) for name, fn in WAYS.items()}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--dec-layers", type=int, default=4)
    p.add_argument("--num-points", type=int, default=512)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.repeats = 2, 2
    torch.set_num_threads(args.threads)
    data = batches(args)
    self_check(data)
    seconds = measure(data, args.num_points, args.repeats)
    base = seconds["per sample"]
    rows = [[name, f"{s * 1000:.1f}", f"{base / s:.2f}x"] for name, s in seconds.items()]
    print_table("criterion forward + backward per training batch",
                ["way", "ms / batch", "speed-up vs per sample"], rows)
    config = {k: getattr(args, k) for k in ("batch_size", "image_size", "dec_layers",
                                             "num_points", "batches", "repeats", "threads")}
    write_results("criterion_speed", args, config, {
        "ms_per_batch": {k: v * 1000 for k, v in seconds.items()},
        "speedup_vs_per_sample": {k: base / v for k, v in seconds.items()}})
    console.print(f"stacked: {base / seconds['stacked']:.2f}x the per-sample loop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
