"""The training loop on a small fake loader: schedule, exact resume, checkpoint contents, logs,
gradient accumulation and DDP over gloo."""

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from model.train import TrainConfig, get_lr, train
from schemas import SCHEMA_VERSION

SIZE = 64


class FakeLoader:
    """Endless batches of 2 images with 1-2 random rectangles labelled "a photo of a box." or
    "a photo of a bar."; stands in for model.data.MixtureLoader (same batch and state API)."""

    def __init__(self, seed: int = 0, stop_after: int | None = None):
        self.seed, self.rng = seed, np.random.default_rng(seed)
        self.drawn, self.stop_after = 0, stop_after

    def __iter__(self):
        while True:
            if self.stop_after is not None and self.drawn >= self.stop_after:
                raise KeyboardInterrupt("simulated kill")
            self.drawn += 1
            samples = [self._sample(), self._sample()]
            yield {"images": torch.stack([s[0] for s in samples]),
                   "targets": [s[1] for s in samples]}

    def _sample(self):
        image = self.rng.normal(0, 0.1, (3, SIZE, SIZE)).astype(np.float32)
        n = int(self.rng.integers(1, 3))
        masks = np.zeros((n, SIZE, SIZE), bool)
        boxes = []
        for i in range(n):
            x0, y0 = self.rng.integers(0, SIZE // 2, 2)
            w, h = self.rng.integers(8, SIZE // 2, 2)
            masks[i, y0:y0 + h, x0:x0 + w] = True
            image[i, y0:y0 + h, x0:x0 + w] += 2.0
            boxes.append([(x0 + w / 2) / SIZE, (y0 + h / 2) / SIZE, w / SIZE, h / SIZE])
        target = {"texts": ["a photo of a box.", "a photo of a bar."],
                  "labels": torch.arange(n), "boxes": torch.tensor(boxes, dtype=torch.float32),
                  "masks": torch.from_numpy(masks), "has_masks": True,
                  "is_thing": torch.tensor([True, False][:n]), "task": "instance"}
        return torch.from_numpy(image), target

    def state_dict(self):
        return {"seed": self.seed, "rng": self.rng.bit_generator.state, "drawn": self.drawn}

    def load_state_dict(self, state):
        assert state["seed"] == self.seed
        self.rng.bit_generator.state = state["rng"]
        self.drawn = state["drawn"]


def _config(out_dir, **kw):
    base = dict(out_dir=str(out_dir), model_size="tiny", text_encoder="hashed", max_iters=4,
                warmup_iters=1, lr=1e-3, grad_clip=1.0, num_points=128, log_interval=1,
                ckpt_interval=2, tensorboard=False, device="cpu")
    return TrainConfig(**dict(base, **kw))


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(max_iters=100, warmup_iters=10, min_lr_ratio=0.1, text_encoder="hashed")
    factors = [get_lr(i, cfg) for i in range(101)]
    assert factors[0] == pytest.approx(1 / 11) and factors[9] == pytest.approx(10 / 11)
    assert factors[10] == pytest.approx(1.0)
    assert factors[55] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert factors[100] == pytest.approx(0.1)
    assert all(a <= b for a, b in zip(factors[:10], factors[1:11], strict=True))
    assert all(a >= b for a, b in zip(factors[10:-1], factors[11:], strict=True))


def test_resume_continues_exactly(tmp_path):
    straight = torch.load(train(_config(tmp_path / "a"), FakeLoader()), weights_only=True)
    # killed while drawing the 4th batch (step 4): the step-2 checkpoint is the last on disk
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path / "b"), FakeLoader(stop_after=3))
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 2
    resumed = torch.load(train(_config(tmp_path / "b", resume=True), FakeLoader()),
                         weights_only=True)
    assert resumed["step"] == straight["step"] == 4
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    rows_a = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").open()]
    rows_b = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").open()]
    # b logged steps 1-3 before the kill; resuming at 2 drops its old step-3 row and redoes it
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra["loss"] == rb["loss"] and ra["lr"] == rb["lr"]


def test_checkpoint_contents_logs_and_resume_errors(tmp_path):
    cfg = _config(tmp_path, max_iters=2, grad_accum=2, tensorboard=True)
    loader = FakeLoader()
    state = torch.load(train(cfg, loader), weights_only=True)
    assert loader.drawn == 4  # 2 steps x 2 micro-batches
    assert state["schema_version"] == SCHEMA_VERSION
    assert state["config"]["grad_accum"] == 2 and state["model_config"]["d"] == 32
    assert len(state["rng"]) == len(state["data"]) == 1 and state["data"][0]["drawn"] == 4
    assert {"model", "optimizer", "scheduler", "step"} <= set(state)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2]
    matched = sum(v for k, v in rows[0].items() if k.startswith("matched/"))
    assert matched > 0 and 0 <= (rows[0]["share/conditional_of_things"] or 0) <= 1
    assert np.isfinite(rows[-1]["loss"]) and rows[-1]["lr"] > 0
    assert any((tmp_path / "tensorboard").iterdir())
    with pytest.raises(ValueError, match="with --queries mixed, this run asks for learnable"):
        train(_config(tmp_path, resume=True, queries="learnable"), FakeLoader())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_config(tmp_path / "empty", resume=True), FakeLoader())
    with pytest.raises(ValueError, match="queries='both'"):
        _config(tmp_path, queries="both")


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import model.train as train_module

    built = []
    original = train_module.build_mqformer

    def keep(*args, **kwargs):  # capture this rank's model to compare it across ranks afterwards
        built.append(original(*args, **kwargs))
        return built[-1]

    train_module.build_mqformer = keep
    torch.manual_seed(0)  # as train() seeds before building: the same initial weights
    initial = {k: v.clone() for k, v in original(
        "tiny", text_encoder="hashed", queries="learnable").state_dict().items()}
    train(_config(out_dir, max_iters=2, queries="learnable"), FakeLoader(seed=rank))
    torch.save({"final": built[0].state_dict(), "initial": initial},
               Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_gloo_two_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["step"] == 2 and len(state["data"]) == len(state["rng"]) == 2
    assert state["data"][0]["seed"] == 0 and state["data"][1]["seed"] == 1
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    # Different data on each rank, yet identical weights after the steps: gradients were averaged.
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name, value in r0["final"].items():
        torch.testing.assert_close(value, r1["final"][name], rtol=0, atol=1e-6, msg=name)
    moved = [n for n, v in r0["final"].items() if not torch.equal(v, r0["initial"][n])]
    assert len(moved) > 10  # the steps really changed the weights


def _steps(out_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (Path(out_dir) / "metrics.jsonl").open()]


def test_torn_metrics_line_does_not_block_resume(tmp_path):
    with pytest.raises(KeyboardInterrupt):  # checkpoint at step 2, steps 1-3 logged, then killed
        train(_config(tmp_path), FakeLoader(stop_after=3))
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 1.2')  # killed mid-write
    train(_config(tmp_path, resume=True), FakeLoader())
    assert _steps(tmp_path) == [1, 2, 3, 4]


def test_fresh_run_after_a_kill_before_the_first_checkpoint_logs_each_step_once(tmp_path):
    with pytest.raises(KeyboardInterrupt):  # steps 1-2 logged, no checkpoint yet (interval 4)
        train(_config(tmp_path, ckpt_interval=4), FakeLoader(stop_after=2))
    assert not (tmp_path / "ckpt.pt").exists() and _steps(tmp_path) == [1, 2]
    train(_config(tmp_path, ckpt_interval=4), FakeLoader())
    assert _steps(tmp_path) == [1, 2, 3, 4]


def test_every_checkpoint_has_a_matching_sidecar(tmp_path):
    import hashlib

    path = train(_config(tmp_path, max_iters=2), FakeLoader())
    digest = (tmp_path / "ckpt.pt.sha256").read_text().split()[0]
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"ckpt.pt: checksum mismatch"):
        train(_config(tmp_path, max_iters=2, resume=True), FakeLoader())


def _backbone_lrs(config) -> set[float]:
    from model.build import build_mqformer
    from model.train import param_groups

    model = build_mqformer("tiny", text_encoder="hashed")
    ids = {id(p) for p in model.backbone.parameters()}
    return {g["lr"] for g in param_groups(model, config) if any(id(p) in ids for p in g["params"])}


def test_backbone_lr_is_full_for_random_init_and_a_tenth_for_pretrained(tmp_path):
    assert _backbone_lrs(_config(tmp_path, lr=1e-3)) == {1e-3}
    pretrained = _config(tmp_path, lr=1e-3, backbone_checkpoint=str(tmp_path / "bb.pth"))
    assert pretrained.backbone_lr_mult == 0.1
    assert _backbone_lrs(pretrained) == {1e-3 * 0.1}
    assert _backbone_lrs(_config(tmp_path, lr=1e-3, backbone_lr_mult=0.5)) == {1e-3 * 0.5}


def _zero_layer_scale_effect(model, images) -> float:
    """Relative change of the C5 features when every block's layer scale is zeroed: ~0 means the
    blocks do nothing (a dead backbone)."""
    with torch.no_grad():
        full = model.backbone(images)[-1]
        scales = [p for n, p in model.backbone.named_parameters() if n.endswith("gamma")]
        assert scales, "the tiny backbone has layer scales"
        saved = [p.clone() for p in scales]
        for p in scales:
            p.zero_()
        bare = model.backbone(images)[-1]
        for p, s in zip(scales, saved, strict=True):
            p.copy_(s)
    return float((full - bare).norm() / full.norm())


def test_backbone_blocks_contribute_and_train(tmp_path):
    from model.build import build_mqformer

    images = next(iter(FakeLoader()))["images"]
    torch.manual_seed(0)
    initial = build_mqformer("tiny", text_encoder="hashed")
    # timm's default layer scale 1e-6 gave ~1e-6 here (measured 0.0008 even after 400 steps)
    assert _zero_layer_scale_effect(initial, images) > 0.1
    state = torch.load(train(_config(tmp_path, max_iters=4), FakeLoader()), weights_only=True)
    start = initial.state_dict()
    blocks = [k for k in start if k.startswith("backbone.") and ".blocks." in k
              and k.endswith("weight")]
    moved = [float((state["model"][k] - start[k]).abs().mean()) for k in blocks]
    # AdamW moves a parameter by at most ~lr per step; the blocks moved at the full rate
    assert float(np.median(moved)) > 0.5 * 1e-3


def test_classifier_health_is_logged_and_the_temperature_moves(tmp_path):
    torch.manual_seed(0)
    train(_config(tmp_path, max_iters=6, warmup_iters=0), FakeLoader())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    for r in rows:
        assert 0.0 <= r["class/accuracy"] <= 1.0
        assert -1.0 <= r["class/text_cosine"] <= 1.0
        assert r["class/logit_scale"] > 0 and np.isfinite(r["class/bias"])
    # the two FakeLoader texts: the logged cosine is their projected embeddings' cosine
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    from model.build import build_mqformer

    model = build_mqformer("tiny", text_encoder="hashed")
    model.load_state_dict(state["model"])
    with torch.no_grad():
        emb, _ = model.embed_texts([["a photo of a box.", "a photo of a bar."]],
                                   torch.device("cpu"))
    cos = float(torch.nn.functional.cosine_similarity(emb[0, 0], emb[0, 1], dim=0))
    assert rows[-1]["class/logit_scale"] == pytest.approx(
        float(state["model"]["heads.cls.logit_scale"].exp()))
    assert abs(rows[-1]["class/text_cosine"] - cos) < 0.1  # logged before the last update
    # AdamW moves a parameter by about lr per step at most, so at the head lr the scale's log could
    # move ~sum(lr_t) in these steps (it moved 0.001 at x1); its own lr x10 must carry it further
    config = _config(tmp_path, max_iters=6, warmup_iters=0)
    head_budget = sum(config.lr * get_lr(i, config) for i in range(6))
    moved = abs(np.log(rows[-1]["class/logit_scale"]) - np.log(1 / 0.07))
    assert moved > head_budget


def test_resume_with_another_optimizer_layout_is_one_error(tmp_path):
    from model.checkpoint import save_checkpoint

    path = train(_config(tmp_path, max_iters=2), FakeLoader())
    state = torch.load(path, weights_only=True)
    groups = state["optimizer"]["param_groups"]  # as an engine without the temperature group
    state["optimizer"]["param_groups"] = groups[:-1]
    save_checkpoint(path, state)
    with pytest.raises(ValueError, match=r"ckpt.pt: its optimizer state does not fit"):
        train(_config(tmp_path, max_iters=4, resume=True), FakeLoader())


def _recording_build(monkeypatch):
    """Patch train()'s build_mqformer to keep the model it builds (weights seen step by step)."""
    import model.train as train_module

    built = []
    original = train_module.build_mqformer

    def keep(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(train_module, "build_mqformer", keep)
    return built


def test_weight_average_follows_its_formula_and_eval_loads_it(tmp_path, monkeypatch):
    from model.inference import load_model

    built = _recording_build(monkeypatch)
    snapshots = []  # the live weights after every step

    def snapshot(step, row):
        snapshots.append({k: v.detach().clone() for k, v in built[0].state_dict().items()})

    decay = 0.3
    path = train(_config(tmp_path, ema_decay=decay), FakeLoader(), on_step=snapshot)
    state = torch.load(path, weights_only=True)
    assert state["ema"]["updates"] == 4
    # independent: the initial weights again from train()'s seed, then the ramped decay by hand
    torch.manual_seed(0)
    from model.build import build_mqformer

    initial = build_mqformer("tiny", text_encoder="hashed", queries="mixed").state_dict()
    floats = [k for k, v in initial.items() if v.is_floating_point()]
    expected = {k: initial[k].double().numpy() for k in floats}
    for t, weights in enumerate(snapshots, start=1):
        d = min(decay, (1 + t) / (10 + t))
        for k in floats:
            expected[k] = d * expected[k] + (1 - d) * weights[k].double().numpy()
    moved = 0
    for k in floats:
        np.testing.assert_allclose(state["ema"]["weights"][k].numpy(), expected[k], rtol=1e-5,
                                   atol=1e-6, err_msg=k)
        moved += not torch.equal(state["ema"]["weights"][k], state["model"][k])
    assert moved > len(floats) // 2  # the average is not the live weights
    model = load_model(state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["ema"]["weights"][k]), k


def test_weight_average_resumes_exactly_and_refuses_another_decay(tmp_path):
    straight = torch.load(train(_config(tmp_path / "a", ema_decay=0.9), FakeLoader()),
                          weights_only=True)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path / "b", ema_decay=0.9), FakeLoader(stop_after=3))
    resumed = torch.load(train(_config(tmp_path / "b", ema_decay=0.9, resume=True),
                               FakeLoader()), weights_only=True)
    assert resumed["ema"]["updates"] == straight["ema"]["updates"] == 4
    for k, v in straight["ema"]["weights"].items():
        assert torch.equal(v, resumed["ema"]["weights"][k]), k
    with pytest.raises(ValueError, match="with --ema-decay 0.9, this run asks for 0.0"):
        train(_config(tmp_path / "b", resume=True), FakeLoader())
    with pytest.raises(ValueError, match=r"ema_decay=1.0 must be in \[0, 1\)"):
        _config(tmp_path, ema_decay=1.0)
