"""A peer side by side: MQ-Former `tiny` vs transformers' Mask2FormerForUniversalSegmentation.

Both models train in one run on the same generated scenes' shards (bench/ablation.py's 1000
training / 100 held-out scenes, things plus the `background` stuff class), on the SAME batches:
one MixtureLoader (seed, instance + panoptic targets) is drawn once into a list of batches that
both training loops replay in order, so every step sees the same images and targets. Same steps,
batch, image size, lr, warmup + cosine schedule (model.train.get_lr), AdamW with weight decay on
>= 2-D weights only, grad clip 1, 1,024 sampled mask points, and 1 CPU thread.

The peer is built from a config (random weights, nothing downloaded): the same timm backbone as
ours (`test_convnext`, 4 levels at strides 4..32) through transformers' TimmBackbone, with our
backbone's initial weights copied in (bit-identical init, checked), hidden size 32 as ours, 30
queries as ours (10 learnable + 20 conditional), and a decoder depth / FFN width chosen so the
parameter counts match (both are reported). The peer keeps its own recipe (softmax + no-object
class, its Hungarian loss weights 2 / 5 / 5, no-object weight 0.1, auxiliary losses).

Evaluation goes through one path for both: bench/ablation.py `diagnose` (model.inference
run_model -> Evaluator -> model.evaluate.instance_ap, i.e. pycocotools COCOeval) on the held-out
shards: per-class and class-agnostic mask AP, matched IoU and matched-class accuracy. The peer is
wrapped so it returns our output dict: its softmax class probabilities p (no-object dropped) as
logits log(p / (1 - p)), so the shared instance post-processing (sigmoid, top-100 over queries x
classes, x mean mask probability) scores exactly Mask2Former's own instance inference; its mask
logits at stride 4; and boxes derived from its binary masks (the peer predicts no boxes, so its
box AP is the masks' boxes: named `box_AP_from_masks`).

Speed: wall seconds between consecutive optimizer-step ends (forward, loss, backward, clip,
step; batches are already in memory for both), the first 20 steps and the final checkpoint
excluded; median and mean.

    .venv/bin/python bench/peer_mask2former.py [--quick] [--steps 800]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
from _common import check, console, parser, print_table, write_results

WARM_STEPS = 20  # excluded from s/step (allocator warm-up, first-touch costs)


class Replay:
    """A fixed list of batches for model.train.train: same order every pass, no state."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __iter__(self):
        while True:
            yield from self.batches

    def state_dict(self) -> dict:
        return {"replay": len(self.batches)}


def draw_batches(mix: Path, image_size: int, batch_size: int, steps: int, seed: int) -> list:
    from model.data import MixtureLoader
    from model.mixture import load_mixture

    loader = MixtureLoader(load_mixture(mix), image_size=image_size, batch_size=batch_size,
                           seed=seed, train=True, cache_images=1100)
    return [loader.next_batch() for _ in range(steps)]


def step_seconds(ends: list[float]) -> dict:
    """Median / mean of the gaps between consecutive step ends, warm-up steps left out."""
    gaps = np.diff(ends)[WARM_STEPS:]
    check(len(gaps) > 0, f"too few steps to time (need > {WARM_STEPS + 1})")
    return {"median": float(np.median(gaps)), "mean": float(np.mean(gaps)), "n": int(len(gaps))}


# ------------------------------------------------------------------------------------------ ours
def train_ours(args, batches: list[dict], out: Path):
    from model.checkpoint import load_checkpoint_file
    from model.inference import load_model
    from model.train import train

    config = train_config(args, out)
    ends: list[float] = []
    ckpt = train(config, Replay(batches), on_step=lambda step, row: ends.append(
        time.perf_counter()))
    # the last step's gap holds the checkpoint write: drop it
    return load_model(load_checkpoint_file(ckpt)), step_seconds(ends[:-1])


def train_config(args, out: Path):
    from model.train import TrainConfig

    return TrainConfig(out_dir=str(out), model_size="tiny", queries="mixed",
                       text_encoder="hashed", max_iters=args.steps, lr=args.lr,
                       warmup_iters=min(50, args.steps // 10), grad_clip=1.0, num_points=1024,
                       log_interval=20, ckpt_interval=args.steps, seed=args.seed, device="cpu",
                       tensorboard=False, data={"image_size": args.image_size})


def our_initial_backbone(seed: int) -> dict:
    """The backbone state train() starts from: it seeds, then builds the model the same way."""
    import torch

    from model.build import build_mqformer

    torch.manual_seed(seed)
    model = build_mqformer("tiny", text_encoder="hashed", queries="mixed")
    return {k: v.clone() for k, v in model.backbone.body.state_dict().items()}


# ------------------------------------------------------------------------------------------ peer
def build_peer(num_labels: int, ffn: int, dec_layers: int):
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        TimmBackboneConfig,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "timm_backbone is not a supported model" (it works)
    backbone = TimmBackboneConfig(backbone="test_convnext", out_indices=(0, 1, 2, 3),
                                  use_pretrained_backbone=False)
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32,
                               hidden_dim=32, encoder_feedforward_dim=64, encoder_layers=1,
                               decoder_layers=dec_layers, num_attention_heads=4,
                               dim_feedforward=ffn, num_queries=30, train_num_points=1024,
                               num_labels=num_labels)
    return Mask2FormerForUniversalSegmentation(config)


def peer_backbone(peer):
    return peer.model.pixel_level_module.encoder._backbone


def train_peer(args, batches: list[dict], peer, backbone_init: dict):
    import torch

    from model.train import get_lr

    torch.manual_seed(args.seed)
    peer_backbone(peer).load_state_dict(backbone_init)
    decay = [p for p in peer.parameters() if p.ndim >= 2]
    no_decay = [p for p in peer.parameters() if p.ndim < 2]
    config = train_config(args, Path("unused"))
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: get_lr(it, config))
    peer.train()
    ends, losses = [], []
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        out = peer(pixel_values=batch["images"],
                   mask_labels=[t["masks"].float() for t in batch["targets"]],
                   class_labels=[t["labels"].long() for t in batch["targets"]])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(out.loss.detach()))
        ends.append(time.perf_counter())
    return step_seconds(ends), losses


class PeerAsOurs:
    """The peer behind our model's call and output dict, for the shared evaluation path."""

    def __init__(self, peer, num_labels: int):
        self.peer, self.num_labels = peer, num_labels

    def __call__(self, images, texts):
        import torch

        check(all(len(t) == self.num_labels for t in texts),
              "peer: eval texts differ from the training vocabulary")
        out = self.peer(pixel_values=images)
        prob = out.class_queries_logits.softmax(-1)[..., :-1].clamp(1e-7, 1 - 1e-7)
        masks = out.masks_queries_logits
        q = masks.shape[1]
        return {"pred_logits": torch.log(prob) - torch.log1p(-prob), "pred_masks": masks,
                "pred_boxes": boxes_of(masks > 0),
                "query_types": torch.zeros(q, dtype=torch.long)}


def boxes_of(binary):
    """(B, Q, h, w) bool -> (B, Q, 4) cxcywh in [0, 1]; an empty mask gets a 1-pixel box at 0."""
    import torch

    b, q, h, w = binary.shape
    rows, cols = binary.any(-1), binary.any(-2)
    ys, xs = torch.arange(h), torch.arange(w)
    big = torch.tensor(10 ** 6)
    y0 = torch.where(rows, ys, big).amin(-1).clamp(max=h - 1).float()
    y1 = torch.where(rows, ys, -1).amax(-1).clamp(min=0).float() + 1
    x0 = torch.where(cols, xs, big).amin(-1).clamp(max=w - 1).float()
    x1 = torch.where(cols, xs, -1).amax(-1).clamp(min=0).float() + 1
    y1, x1 = torch.maximum(y1, y0 + 1), torch.maximum(x1, x0 + 1)
    return torch.stack([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h], -1)


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=800, help="training steps each (quick: 40)")
    p.add_argument("--n-train", type=int, default=1000, help="training scenes (quick: 16)")
    p.add_argument("--n-val", type=int, default=100, help="held-out scenes (quick: 8)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer-ffn", type=int, default=80, help="peer decoder FFN width")
    p.add_argument("--peer-decoder-layers", type=int, default=6)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.n_train, args.n_val = 40, 16, 8
    import torch
    from ablation import diagnose, scene_shards

    from model.backbone import count_parameters
    from model.data import ShardSet

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train_shards = scene_shards(args.data_dir, "train", args.n_train, seed=101)
    held_out = scene_shards(args.data_dir, "heldout", args.n_val, seed=202)
    vocab = ShardSet(train_shards).vocabulary(True)
    check(vocab == ShardSet(held_out).vocabulary(True),
          "train and held-out vocabularies differ: the peer's class ids would not line up")
    out = Path(args.data_dir) / "peer" / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True)
    mix = out / "mix.yaml"
    mix.write_text(f"datasets:\n  - path: {train_shards}\n    tasks: [instance, panoptic]\n"
                   f"    masks: [gt]\nexclude: [{held_out}]\n")
    batches = draw_batches(mix, args.image_size, args.batch_size, args.steps, args.seed)
    console.print(f"{len(batches)} batches drawn ({time.perf_counter() - started:.0f} s)")

    init = our_initial_backbone(args.seed)
    peer = build_peer(len(vocab), args.peer_ffn, args.peer_decoder_layers)
    peer_backbone(peer).load_state_dict(init)
    check(all(torch.equal(v, init[k]) for k, v in peer_backbone(peer).state_dict().items()),
          "peer backbone init differs from ours")

    t0 = time.perf_counter()
    ours, ours_speed = train_ours(args, batches, out / "ours")
    ours_train_s = time.perf_counter() - t0
    check(all(torch.equal(v, w) for v, w in zip(our_initial_backbone(args.seed).values(),
                                                  init.values(), strict=True)),
          "our backbone init is not reproducible from the seed")
    t0 = time.perf_counter()
    peer_speed, peer_losses = train_peer(args, batches, peer, init)
    peer_train_s = time.perf_counter() - t0

    results = {}
    peer.eval()
    with torch.no_grad():
        for name, model, params, speed, train_s in (
                ("mqformer", ours, count_parameters(ours), ours_speed, ours_train_s),
                ("mask2former", PeerAsOurs(peer, len(vocab)), count_parameters(peer), peer_speed,
                 peer_train_s)):
            held = diagnose(model, held_out, args.image_size)
            if name == "mask2former":
                held["box_AP_from_masks"] = held.pop("box_AP")
            results[name] = {"params": params, "s_per_step": speed, "train_s": train_s,
                             "held_out": held}
    results["mqformer"]["backbone_params"] = count_parameters(ours.backbone)
    results["mask2former"]["backbone_params"] = count_parameters(peer_backbone(peer))
    results["mask2former"]["final_loss"] = statistics.mean(
        peer_losses[-max(1, len(peer_losses) // 4):])
    a, b = results["mqformer"], results["mask2former"]
    for r in (a, b):
        check(0 <= r["held_out"]["mask_AP"] <= 1, "mask AP out of range")
    ratios = {"mask_AP": ratio(a["held_out"]["mask_AP"], b["held_out"]["mask_AP"]),
              "agnostic_mask_AP": ratio(a["held_out"]["agnostic_mask_AP"],
                                        b["held_out"]["agnostic_mask_AP"]),
              # > 1: ours is faster per step
              "speed": ratio(b["s_per_step"]["median"], a["s_per_step"]["median"])}
    results["ours_vs_peer"] = ratios
    rows = []
    for name in ("mqformer", "mask2former"):
        r, h = results[name], results[name]["held_out"]
        rows.append([name, r["params"], r["backbone_params"], h["mask_AP"], h["mask_AP50"],
                     h["agnostic_mask_AP"], h["agnostic_mask_AP50"], h["matched_iou"],
                     h["matched_class_acc"], r["s_per_step"]["median"], r["s_per_step"]["mean"]])
    print_table(f"peer: {args.steps} steps x batch {args.batch_size} at {args.image_size}px, "
                f"{args.n_train} train / {args.n_val} held-out scenes, seed {args.seed}, "
                f"{args.threads} thread",
                ["model", "params", "backbone", "mask AP", "AP50", "AP agn.", "AP50 agn.",
                 "matched IoU", "class acc", "s/step med", "s/step mean"], rows)
    console.print(f"ours / peer: mask AP {fmt(ratios['mask_AP'])}, class-agnostic "
                  f"{fmt(ratios['agnostic_mask_AP'])}, speed per step {fmt(ratios['speed'])} "
                  f"(goal: >= 1, >= 1, >= 0.9); total {time.perf_counter() - started:.0f} s")
    config = {k: getattr(args, k) for k in ("steps", "n_train", "n_val", "image_size",
                                            "batch_size", "lr", "seed", "peer_ffn",
                                            "peer_decoder_layers", "threads")}
    config.update(train_scenes_seed=101, held_out_scenes_seed=202, run_dir=str(out),
                  total_s=time.perf_counter() - started)
    write_results("peer_mask2former", args, config, results)
    return 0


def ratio(x, y):
    return x / y if x is not None and y else None


def fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


if __name__ == "__main__":
    sys.exit(main())
