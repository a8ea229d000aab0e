"""`engine train` and `engine eval` end to end: shards written by `engine synthesize` (demo photos
with box masks, demo scenes with their ground-truth masks) -> a two-dataset mixture -> train ->
eval, checked against DuckDB counts of the same shards; exact --resume; user errors exit 2."""

import json
import math
import re
from pathlib import Path

import duckdb
import pytest
import torch

from engine.cli import main
from pipelines.sources.demo import DEMO_DIR, scenes_gt_file

TRAIN_FLAGS = ["--model", "tiny", "--text-encoder", "hashed", "--image-size", "128",
               "--batch-size", "2", "--steps", "6", "--log-interval", "1", "--ckpt-interval",
               "3", "--num-points", "256", "--lr", "1e-3", "--grad-clip", "1", "--device", "cpu",
               "--no-tensorboard"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shard folders and a mix.yaml over both."""
    tmp = tmp_path_factory.mktemp("shards")
    photos, scenes = tmp / "photos", tmp / "scenes"
    common = ["--executor", "local", "--unit-size", "4", "--masker", "box"]
    assert main(["synthesize", "--source", "demo", "--split", "photos", "--out", str(photos),
                 *common]) == 0
    assert main(["synthesize", "--source", "coco", "--root", str(DEMO_DIR), "--annotations",
                 str(scenes_gt_file()), "--out", str(scenes), *common]) == 0
    mix = tmp / "mix.yaml"
    mix.write_text(f"""datasets:
  - path: {photos}
    weight: 1.0
    tasks: [instance, referring]
    masks: [synthesized]
  - path: {scenes}
    weight: 1.0
    tasks: [instance, semantic]
    masks: [gt]
""")
    return {"photos": photos, "scenes": scenes, "mix": mix}


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory):
    """A 6-step uninterrupted training run."""
    out = tmp_path_factory.mktemp("run") / "a"
    assert main(["train", "--mixture", str(shards["mix"]), "--out", str(out), *TRAIN_FLAGS]) == 0
    return out


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _sql(sql: str):
    return duckdb.connect().execute(sql).fetchone()


def test_train_writes_checkpoint_and_metrics(run, shards):
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 and r["images_per_s"] > 0
               for r in rows)
    # every step matched some targets of the batch to queries (counts logged per query type)
    assert all(sum(v for k, v in r.items() if k.startswith("matched/")) > 0 for r in rows)
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["step"] == 6
    assert state["config"]["data"]["image_size"] == 128
    assert state["config"]["data"]["mixture"] == str(shards["mix"].resolve())
    assert state["config"]["model_size"] == "tiny" and state["config"]["text_encoder"] == "hashed"
    # the loader state covers both datasets of the mixture
    assert state["data"][0]["datasets"] == [str(shards["photos"].resolve()),
                                            str(shards["scenes"].resolve())]


def test_eval_instance_on_scenes(run, shards, capsys):
    scenes = shards["scenes"]
    out = run / "instance.json"
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--data", str(scenes), "--task",
                 "instance", "--out", str(out), "--device", "cpu"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    result = json.loads(out.read_text())
    n_images, = _sql(f"SELECT count(*) FROM read_parquet('{scenes}/images/*.parquet') "
                     "WHERE status = 'ok'")
    n_objects, = _sql(f"SELECT count(*) FROM read_parquet('{scenes}/objects/*.parquet') "
                      "WHERE keep AND NOT iscrowd")
    assert (result["images"], result["targets"]) == (n_images, n_objects) == (12, 29)
    metrics = result["metrics"]
    assert set(metrics) == {"box_AP", "box_AP50", "mask_AP", "mask_AP50"}
    for v in metrics.values():
        assert 0.0 <= v <= 1.0
    shown = re.search(r"mask_AP │ ([-+.e\d]+)", printed)
    assert shown and float(shown.group(1)) == pytest.approx(metrics["mask_AP"], rel=1e-3, abs=1e-4)
    split = result["query_split"]
    # 30 queries >= objects per image: every target is matched to exactly one query
    assert split["conditional/thing"] + split["learnable/thing"] == n_objects
    assert split["conditional/stuff"] == split["learnable/stuff"] == 0
    assert result["step"] == 6 and result["image_size"] == 128


@pytest.mark.parametrize("task", ["instance", "detection", "semantic", "panoptic",
                                  "foreground"])
def test_eval_metrics_equal_the_full_map_reference(run, shards, tmp_path, task):
    """`engine eval`'s JSON == the metrics computed the way eval did before it streamed (every
    full-resolution prediction kept; AP straight from pycocotools) on the same model outputs."""
    from model.eval_data import iter_eval_samples
    from model.inference import load_model, run_model
    from model.shards import ShardSet
    from tests.helpers.eval_reference import reference_metrics

    scenes, out = shards["scenes"], tmp_path / f"{task}.json"
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--data", str(scenes), "--task",
                 task, "--out", str(out), "--device", "cpu"]) == 0
    model = load_model(torch.load(run / "last.pt", weights_only=True))
    vocab, is_thing = ShardSet(scenes).categories(keep_only=True)
    pairs = list(run_model(model, iter_eval_samples(scenes, task, 128), "cpu", 4))
    assert json.loads(out.read_text())["metrics"] == reference_metrics(task, pairs, vocab,
                                                                       is_thing)


def test_eval_referring_on_photos_default_output(run, shards):
    photos = shards["photos"]
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--data", str(photos), "--task",
                 "referring", "--device", "cpu"]) == 0
    result = json.loads((run / "eval-referring-photos.json").read_text())
    objects = f"read_parquet('{photos}/objects/*.parquet')"
    n_expr, n_images = _sql(
        f"SELECT sum(len(captions)), count(DISTINCT image_id) FROM {objects} "
        "WHERE keep AND NOT iscrowd AND mask IS NOT NULL AND len(captions) > 0")
    assert (result["targets"], result["images"]) == (n_expr, n_images)
    assert n_expr > n_images > 0
    assert 0.0 <= result["metrics"]["cIoU"] <= 1.0 and 0.0 <= result["metrics"]["mIoU"] <= 1.0


def test_resume_reproduces_the_loss_trajectory(run, shards, tmp_path, capsys):
    out = tmp_path / "b"
    argv = ["train", "--mixture", str(shards["mix"]), "--out", str(out), *TRAIN_FLAGS]
    assert main([*argv, "--stop-after", "3"]) == 0
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 3
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]
    # a second run without --resume must not clobber the first
    assert main(argv) == 2
    assert "pass --resume" in " ".join(capsys.readouterr().err.split())
    # nor resume with other data options (the batches would differ)
    changed = [*argv, "--resume"]
    changed[changed.index("--image-size") + 1] = "160"
    assert main(changed) == 2
    assert "--image-size 128" in " ".join(capsys.readouterr().err.split())
    # nor as another model (checked once, where the checkpoint is loaded)
    assert main([*argv, "--resume", "--queries", "learnable"]) == 2
    assert "--queries mixed, this run asks for learnable" in " ".join(
        capsys.readouterr().err.split())
    assert main([*argv, "--resume"]) == 0
    straight, resumed = _rows(run), _rows(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, resumed, strict=True):
        for key in ("loss", "loss_class", "loss_mask", "loss_dice", "loss_bbox", "loss_giou",
                    "lr"):
            assert b[key] == pytest.approx(a[key], rel=0, abs=1e-6), (a["step"], key)
    final_a = torch.load(run / "last.pt", weights_only=True)["model"]
    final_b = torch.load(out / "last.pt", weights_only=True)["model"]
    for k, v in final_a.items():
        torch.testing.assert_close(final_b[k], v, rtol=0, atol=1e-6)


BAD_MIXES = [
    ("weight: -1", "datasets[0].weight must be > 0"),
    ("wieght: 2", "datasets[0] has unknown key(s) ['wieght']"),
    ("tasks: [depth]", "datasets[0].tasks has unknown value(s) ['depth']"),
]


@pytest.mark.parametrize("line, message", BAD_MIXES)
def test_bad_mix_yaml_exits_2_naming_the_key(shards, tmp_path, capsys, line, message):
    key = line.split(":")[0]
    entry = {"weight": "1.0", "tasks": "[instance]"}
    entry[key] = line.split(": ", 1)[1]
    body = "".join(f"    {k}: {v}\n" for k, v in entry.items())
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"datasets:\n  - path: {shards['photos']}\n{body}")
    assert main(["train", "--mixture", str(mix), "--out", str(tmp_path / "o"), *TRAIN_FLAGS]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) <= 2  # one message (rich may wrap a long line)
    assert f"mix.yaml: {message}" in " ".join(err.split())
    assert not (tmp_path / "o" / "last.pt").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--image-size", "100", "--image-size must be a multiple of 32"),
    ("--queries", "both", "--queries 'both' is not valid; choose one of: mixed, learnable"),
    ("--steps", "0", "--steps must be >= 1"),
    ("--model", "huge", "--model 'huge' is not valid; choose one of: tiny, r50"),
    ("--text-encoder", "bert", "--text-encoder 'bert' is not valid"),
    ("--stop-after", "7", "--stop-after must be in [1, --steps=6]"),
    ("--model-option", "dec_layer=4", "--model-option 'dec_layer' is not valid; choose one of:"),
    ("--model-option", "dec_layers", "--model-option 'dec_layers': expected KEY=VALUE"),
    ("--model-option", "dec_layers=four", "dec_layers='four': expected type int, like 2"),
    ("--model-option", "class_loss=soft", "--model-option: unknown class_loss 'soft'; choose one"),
    ("--loss-weight", "loss_klass=16", "--loss-weight 'loss_klass' is not valid; choose one of"),
    ("--loss-weight", "loss_class=-1", "--loss-weight loss_class must be >= 0"),
    ("--ema-decay", "1", "--ema-decay must be in [0, 1), got 1.0"),
])
def test_bad_train_flags_exit_2_naming_the_flag(shards, tmp_path, capsys, flag, value, message):
    argv = ["train", "--mixture", str(shards["mix"]), "--out", str(tmp_path / "o"), *TRAIN_FLAGS]
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    assert main(argv) == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_model_options_and_loss_weights_reach_the_checkpoint(shards, tmp_path, capsys):
    """--model-option / --loss-weight / --ema-decay: the softmax classifier with another class
    weight and a weight average trains, is kept in the checkpoint, evaluates from it, and a resume
    asking for other weights is refused naming the flag."""
    out = tmp_path / "sm"
    argv = ["train", "--mixture", str(shards["mix"]), "--out", str(out), *TRAIN_FLAGS,
            "--model-option", "class_loss=softmax", "--model-option", "dec_layers=3",
            "--model-option", "shape_masks=true", "--ema-decay", "0.99",
            "--loss-weight", "loss_class=16"]
    assert main([*argv, "--stop-after", "3"]) == 0
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["config"]["ema_decay"] == 0.99 and state["ema"]["updates"] == 3
    assert state["config"]["model_options"] == {"class_loss": "softmax", "dec_layers": 3,
                                                "shape_masks": True}
    assert any(k.startswith("heads.shape.") for k in state["model"])
    assert state["config"]["loss_weights"] == {"loss_class": 16.0}
    assert state["model_config"]["class_loss"] == "softmax"
    assert any(k.endswith("cls.no_object") for k in state["model"])
    other = [*argv[:-1], "loss_class=8", "--resume"]
    assert main(other) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "loss weights (--loss-weight) {'loss_class': 16.0}, this run asks for" in err, err
    assert main([*argv, "--resume"]) == 0
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == state["ema"]["updates"] == 6
    assert main(["eval", "--checkpoint", str(out / "last.pt"), "--data", str(shards["scenes"]),
                 "--task", "instance", "--device", "cpu"]) == 0


def test_bad_eval_flags_exit_2(run, shards, tmp_path, capsys):
    ckpt = str(run / "last.pt")
    assert main(["eval", "--checkpoint", ckpt, "--data", str(shards["scenes"]),
                 "--task", "depth"]) == 2
    assert "--task 'depth' is not valid" in " ".join(capsys.readouterr().err.split())
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt"), "--data",
                 str(shards["scenes"]), "--task", "instance"]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", ckpt, "--data", str(tmp_path), "--task",
                 "instance"]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) <= 2 and lines[0].startswith("error:"), err  # rich may wrap a long line
    return " ".join(err.split())


def _one_dataset_mix(tmp_path, run_dir, extra: str = "") -> Path:
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"datasets:\n  - path: {run_dir}\n    tasks: [instance]\n    masks: [gt]\n"
                   f"{extra}")
    return mix


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_train_refuses_another_major_schema_version(shards, tmp_path, capsys):
    run_dir = _copy_run(shards["scenes"], tmp_path / "scenes")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["schema_version"] = "9.9.9"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    argv = ["train", "--mixture", str(_one_dataset_mix(tmp_path, run_dir)), "--out",
            str(tmp_path / "o"), *TRAIN_FLAGS]
    assert main(argv) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"{run_dir}: written with schema version '9.9.9'" in err
    assert not (tmp_path / "o" / "last.pt").exists()


def test_train_reads_only_the_parts_the_manifest_lists(shards, tmp_path):
    from model.data import MixtureLoader

    run_dir = _copy_run(shards["scenes"], tmp_path / "scenes")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for table in ("images", "objects"):  # stale copies, as a smaller rerun leaves them
        for part in sorted((run_dir / table).glob("part-*.parquet")):
            (run_dir / table / part.name.replace("part-0", "part-9")).write_bytes(
                part.read_bytes())
    globbed, = _sql(f"SELECT count(*) FROM read_parquet('{run_dir}/objects/*.parquet')")
    assert globbed == 2 * manifest["totals"]["objects"]
    loader = MixtureLoader(_one_dataset_mix(tmp_path, run_dir), image_size=64)
    (shard_set,) = loader.shards
    objects = sum(len(rows) for p in shard_set.parts for rows in shard_set.objects(p).values())
    assert len(shard_set) == manifest["totals"]["images_ok"]
    assert objects == manifest["totals"]["objects"]


def test_root_flag_and_key_override_the_manifest_root(shards, tmp_path, capsys):
    import shutil

    run_dir = _copy_run(shards["scenes"], tmp_path / "scenes")
    images = tmp_path / "moved"
    shutil.copytree(DEMO_DIR, images)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["source"]["root"] = str(tmp_path / "gone")  # the data moved
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    flags = [*TRAIN_FLAGS]
    flags[flags.index("--steps") + 1] = "1"
    mix = _one_dataset_mix(tmp_path, run_dir)
    assert main(["train", "--mixture", str(mix), "--out", str(tmp_path / "a"), *flags]) == 2
    assert str(tmp_path / "gone") in _one_line(capsys.readouterr().err)
    assert main(["train", "--mixture", str(mix), "--out", str(tmp_path / "b"), *flags,
                 "--root", str(images)]) == 0
    keyed = _one_dataset_mix(tmp_path, run_dir, f"    root: {images}\n")
    assert main(["train", "--mixture", str(keyed), "--out", str(tmp_path / "c"), *flags]) == 0
    assert main(["eval", "--checkpoint", str(tmp_path / "c" / "last.pt"), "--data",
                 str(run_dir), "--task", "instance", "--device", "cpu", "--limit", "2",
                 "--root", str(images)]) == 0
    capsys.readouterr()
    # with two datasets a single --root is ambiguous
    assert main(["train", "--mixture", str(shards["mix"]), "--out", str(tmp_path / "d"), *flags,
                 "--root", str(images)]) == 2
    assert "give each its own `root:` key" in _one_line(capsys.readouterr().err)


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero bytes":
        path.write_bytes(b"")
    elif how == "random bytes":
        path.write_bytes(bytes(range(256)) * (len(data) // 256 + 1))
    elif how == "malicious pickle":
        import os
        import pickle

        class Shell:
            def __reduce__(self):
                return (os.system, (f"touch {path.parent / 'pwned'}",))

        path.write_bytes(pickle.dumps({"model": Shell(), "config": {}}))
        (path.parent / "last.pt.sha256").unlink()  # no checksum to hide behind either


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the probe
@pytest.mark.parametrize("how", ["truncated", "zero bytes", "random bytes", "malicious pickle"])
def test_damaged_checkpoint_is_one_line_for_resume_and_eval(run, shards, tmp_path, capsys, how):
    out = _copy_run(run, tmp_path / "run")
    ckpt = out / "last.pt"
    _damage(ckpt, how)
    assert main(["train", "--mixture", str(shards["mix"]), "--out", str(out), *TRAIN_FLAGS,
                 "--resume"]) == 2
    assert f"error: {ckpt}:" in _one_line(capsys.readouterr().err)
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(shards["scenes"]), "--task",
                 "instance", "--device", "cpu"]) == 2
    assert f"error: {ckpt}:" in _one_line(capsys.readouterr().err)
    assert not (out / "pwned").exists()


def test_weights_that_overflow_name_the_key(shards, tmp_path, capsys):
    mix = tmp_path / "mix.yaml"
    mix.write_text("datasets:\n" + "".join(
        f"  - {{path: {shards[k]}, weight: 1.0e+308, tasks: [instance]}}\n"
        for k in ("photos", "scenes")))
    assert main(["train", "--mixture", str(mix), "--out", str(tmp_path / "o"), *TRAIN_FLAGS]) == 2
    assert "mix.yaml: datasets[1].weight 1e+308 makes the sum of the weights overflow" in \
        _one_line(capsys.readouterr().err)
