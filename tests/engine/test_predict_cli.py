"""`engine predict` end to end: a tiny MQ-Former trained for a few steps on the demo scenes, run on
a folder of images (one of them EXIF-rotated); COCO results read back by pycocotools, label maps and
alphas checked against the images, predictions checked equal to `engine eval`'s for the same image,
and every user error one line with exit code 2."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from engine.cli import main
from model.data import ShardSet, iter_eval_samples
from model.inference import Evaluator, dataset_categories, load_model, run_model
from pipelines.matting import make_trimap
from pipelines.sources.demo import DEMO_DIR, scenes_gt_file
from pipelines.sources.matting import write_soft_scenes

TRAIN_FLAGS = ["--model", "tiny", "--text-encoder", "hashed", "--image-size", "128",
               "--batch-size", "2", "--steps", "3", "--log-interval", "1", "--ckpt-interval",
               "3", "--num-points", "256", "--lr", "1e-3", "--grad-clip", "1", "--device", "cpu",
               "--no-tensorboard"]
CLASSES = "ellipse,horse,polygon,star"  # the scenes' vocabulary, sorted as ShardSet gives it
ROTATED = "rotated"  # a photo stored landscape with EXIF orientation 6 (shown portrait)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Shards of the demo scenes (GT masks) and a 3-step training run on them."""
    tmp = tmp_path_factory.mktemp("predict")
    scenes = tmp / "scenes"
    assert main(["synthesize", "--source", "coco", "--root", str(DEMO_DIR), "--annotations",
                 str(scenes_gt_file()), "--out", str(scenes), "--executor", "local",
                 "--unit-size", "4", "--masker", "box"]) == 0
    mix = tmp / "mix.yaml"
    mix.write_text(f"datasets:\n  - path: {scenes}\n    weight: 1.0\n"
                   "    tasks: [instance, semantic]\n    masks: [gt]\n")
    out = tmp / "run"
    assert main(["train", "--mixture", str(mix), "--out", str(out), *TRAIN_FLAGS]) == 0
    return {"checkpoint": out / "last.pt", "scenes": scenes, "tmp": tmp}


@pytest.fixture(scope="module")
def images(run):
    """Two demo scenes (PNG) and one photo JPEG whose EXIF says 'rotate 90' (orientation 6)."""
    folder = run["tmp"] / "images"
    folder.mkdir()
    for name in ("scene_0000.png", "scene_0001.png"):
        shutil.copy(DEMO_DIR / "scenes" / name, folder / name)
    photo = Image.open(DEMO_DIR / "photos" / "chelsea.jpg").convert("RGB").resize((120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(folder / f"{ROTATED}.jpg", exif=exif)
    return folder


def _shown_size(path):
    """(height, width) as a viewer shows the file: EXIF orientation applied (PIL, independent)."""
    from PIL import ImageOps

    with Image.open(path) as img:
        w, h = ImageOps.exif_transpose(img).size
    return h, w


def _predict(run, images, out, *flags):
    return main(["predict", "--checkpoint", str(run["checkpoint"]), "--images", str(images),
                 "--out", str(out), "--device", "cpu", "--batch-size", "2", *flags])


def test_instance_results_read_back_by_pycocotools(run, images, tmp_path):
    out = tmp_path / "instance"
    assert _predict(run, images, out, "--task", "instance", "--classes", CLASSES,
                    "--top-k", "7") == 0
    gt = COCO(str(out / "images.json"))
    dt = gt.loadRes(str(out / "results.json"))
    files = sorted(p.name for p in images.iterdir())
    assert [gt.imgs[i]["file_name"] for i in sorted(gt.imgs)] == files
    assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == CLASSES.split(",")
    for image_id, info in gt.imgs.items():
        assert (info["height"], info["width"]) == _shown_size(images / info["file_name"])
        anns = dt.loadAnns(dt.getAnnIds(imgIds=[image_id]))
        assert len(anns) == 7  # top-k (query, class) pairs per image
        for ann in anns:
            assert 0.0 <= ann["score"] <= 1.0 and 1 <= ann["category_id"] <= 4
            mask = mask_utils.decode(ann["segmentation"])
            assert mask.shape == (info["height"], info["width"])
            x, y, w, h = ann["bbox"]
            assert 0 <= x <= x + w <= info["width"] + 1e-6
            assert 0 <= y <= y + h <= info["height"] + 1e-6
    # the rotated photo is 80 wide and 120 high as shown (stored 120 x 80)
    assert _shown_size(images / f"{ROTATED}.jpg") == (120, 80)
    for name in files:
        overlay = np.asarray(Image.open(out / "overlay" / f"{name.rsplit('.', 1)[0]}.png"))
        assert overlay.shape == (*_shown_size(images / name), 3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 3 and summary["failed"] == [] and summary["images_per_s"] > 0


def test_predictions_equal_engine_eval_for_the_same_image(run, tmp_path):
    """One path: the Evaluator's predictions for a shard image == predict's for its file."""
    state = torch.load(run["checkpoint"], weights_only=True)
    model = load_model(state)
    vocab, is_thing = dataset_categories(ShardSet(run["scenes"]), keep_only=True)
    assert ",".join(vocab) == CLASSES
    sample = next(iter_eval_samples(run["scenes"], "instance", 128))
    evaluator = Evaluator("instance", vocab, is_thing, num_points=256)
    for s, output in run_model(model, [sample], "cpu"):
        evaluator.add(s, output)
    folder = tmp_path / "one"
    folder.mkdir()
    shards = ShardSet(run["scenes"])
    entry = next(e for part in shards.parts for e in shards.images[part]
                 if e.image_id == sample["gt"]["image_id"])
    shutil.copy(DEMO_DIR / entry.file_path, folder)
    out = tmp_path / "out"
    assert _predict(run, folder, out, "--task", "instance", "--classes", CLASSES) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results) == len(evaluator.pred) == 100
    for mine, theirs in zip(results, evaluator.pred, strict=True):
        assert mine["score"] == pytest.approx(theirs["score"], abs=1e-6)
        assert vocab[mine["category_id"] - 1] == theirs["category"]
        assert mine["bbox"] == pytest.approx(theirs["box"], abs=0.01)
        assert mine["segmentation"]["counts"] == theirs["mask"]["counts"]


def test_detection_and_referring_results(run, images, tmp_path):
    out = tmp_path / "det"
    assert _predict(run, images, out, "--task", "detection", "--classes", CLASSES,
                    "--top-k", "5") == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 15 and all("segmentation" not in r for r in results)
    dt = COCO(str(out / "images.json")).loadRes(results)  # a bbox result set
    assert sorted(len(dt.getAnnIds(imgIds=[i])) for i in (1, 2, 3)) == [5, 5, 5]
    out = tmp_path / "ref"
    assert _predict(run, images, out, "--task", "referring", "--prompt", "a red star",
                    "--prompt", "the horse on the left") == 0
    gt = COCO(str(out / "images.json"))
    assert [c["name"] for c in gt.dataset["categories"]] == ["a red star", "the horse on the left"]
    dt = gt.loadRes(str(out / "results.json"))
    for image_id in gt.imgs:  # one mask per prompt per image
        anns = dt.loadAnns(dt.getAnnIds(imgIds=[image_id]))
        assert sorted(a["category_id"] for a in anns) == [1, 2]
        assert all(0 <= a["score"] <= 1 for a in anns)


def test_semantic_and_panoptic_maps_have_the_image_size(run, images, tmp_path):
    out = tmp_path / "sem"
    assert _predict(run, images, out, "--task", "semantic", "--classes", CLASSES) == 0
    for path in images.iterdir():
        labels = np.asarray(Image.open(out / "semantic" / f"{path.stem}.png"))
        assert labels.dtype == np.uint8 and labels.shape == _shown_size(path)
        assert labels.max() < 4
    out = tmp_path / "pan"
    assert _predict(run, images, out, "--task", "panoptic", "--classes", CLASSES,
                    "--stuff", "polygon") == 0
    pan = json.loads((out / "panoptic.json").read_text())
    assert [c["isthing"] for c in pan["categories"]] == [1, 1, 0, 1]
    for ann in pan["annotations"]:
        rgb = np.asarray(Image.open(out / "panoptic" / ann["file_name"])).astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        image = next(i for i in pan["images"] if i["id"] == ann["image_id"])
        assert ids.shape == (image["height"], image["width"])
        assert set(np.unique(ids)) - {0} == {s["id"] for s in ann["segments_info"]}
        for s in ann["segments_info"]:
            assert s["area"] == int((ids == s["id"]).sum())


def test_foreground_and_matting_alphas(run, images, tmp_path):
    out = tmp_path / "fg"
    assert _predict(run, images, out, "--task", "foreground") == 0
    for path in images.iterdir():
        assert np.asarray(Image.open(out / "alpha" / f"{path.stem}.png")).shape == \
            _shown_size(path)
    out = tmp_path / "mat"
    assert _predict(run, images, out, "--task", "matting", "--prompt", "the star") == 0
    records = json.loads((out / "matting.json").read_text())
    assert [r["file"] for r in records] == sorted(p.name for p in images.iterdir())
    for r in records:
        stem = r["file"].rsplit(".", 1)[0]
        mask = np.asarray(Image.open(out / "mask" / f"{stem}.png")) > 0
        alpha = np.asarray(Image.open(out / "alpha" / f"{stem}.png"))
        assert alpha.shape == mask.shape == _shown_size(images / r["file"])
        assert r["prompt"] == "the star" and r["method"] in ("cf", "mask")
        if r["method"] == "cf" and mask.any():
            # the matte keeps the trimap's known pixels: 255 deep inside, 0 far outside
            trimap = make_trimap(mask, r["band"])
            assert np.all(alpha[trimap == 1.0] == 255) and np.all(alpha[trimap == 0.0] == 0)
        elif not mask.any():
            assert alpha.max() == 0


def test_matting_scored_against_ground_truth_alphas(run, tmp_path):
    """--alpha: the matte's and the mask's MSE / SAD against exact GT alphas (soft scenes)."""
    data = write_soft_scenes(tmp_path / "soft", 3, seed=2, width=96, height=64)
    out = tmp_path / "mat"
    assert _predict(run, data / "image", out, "--task", "matting", "--alpha",
                    str(data / "alpha")) == 0
    report = json.loads((out / "alpha_eval.json").read_text())
    assert [r["file"] for r in report["images"]] == [f"scene_{i:04d}.png" for i in range(3)]
    for r in report["images"]:
        stem = r["file"][:-4]
        gt = np.asarray(Image.open(data / "alpha" / r["file"]), np.float64) / 255
        mask = np.asarray(Image.open(out / "mask" / f"{stem}.png")) > 0
        alpha = np.asarray(Image.open(out / "alpha" / f"{stem}.png"), np.float64) / 255
        assert r["mask_mse"] == pytest.approx(np.mean((mask - gt) ** 2), rel=1e-6)
        assert r["mask_sad"] == pytest.approx(np.abs(mask - gt).sum() / 1000, rel=1e-6)
        # the PNG holds the matte rounded to 8 bits: within half a grey level of the scored one
        assert r["alpha_mse"] == pytest.approx(np.mean((alpha - gt) ** 2), abs=2e-3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["alpha_eval"]["mask_mse"] == pytest.approx(
        np.mean([r["mask_mse"] for r in report["images"]]))


def test_an_unreadable_image_is_reported_not_dropped(run, images, tmp_path):
    folder = tmp_path / "some-bad"
    shutil.copytree(images, folder)
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert _predict(run, folder, out, "--task", "foreground") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 3
    assert [f["file"] for f in summary["failed"]] == [str(folder / "broken.png")]
    assert "cannot decode" in summary["failed"][0]["reason"]


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("flags, needle", [
    (["--task", "instance", "--classes", "a", "--checkpoint", "nope.pt"],
     "--checkpoint nope.pt does not exist"),
    (["--task", "segment"], "unknown task 'segment'; choose one of: instance"),
    (["--task", "referring"], "--task referring needs --prompt TEXT"),
    (["--task", "semantic", "--classes", "a,b,a"], "--classes lists a name twice"),
    (["--task", "panoptic", "--classes", "a,b", "--stuff", "c"], "--stuff 'c' is not one of"),
    (["--task", "instance", "--classes", "a", "--prompt", "x"], "--prompt applies to --task"),
    (["--task", "matting", "--prompt", "a", "--prompt", "b"], "takes one --prompt, got 2"),
    (["--task", "matting", "--matting-method", "fancy"], "--matting-method 'fancy' is not valid"),
    (["--task", "foreground", "--batch-size", "0"], "--batch-size and --top-k must be >= 1"),
    (["--task", "foreground", "--image-size", "100"], "--image-size must be a multiple of 32"),
])
def test_user_errors_are_one_line(run, images, tmp_path, flags, needle, capsys):
    argv = ["predict", "--checkpoint", str(run["checkpoint"]), "--images", str(images),
            "--out", str(tmp_path / "o"), "--device", "cpu"]
    if "--checkpoint" in flags:  # the flag given last wins in click: drop the default one
        argv = argv[:1] + argv[3:]
    assert main(argv + flags) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("error: ") and needle in line, line
    assert not (tmp_path / "o").exists()  # nothing written before the inputs are checked


def test_input_file_errors_are_one_line(run, images, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    cases = [(empty, f"--images {empty} holds no images"),
             (tmp_path / "missing", "does not exist"),
             (empty / "notes.txt", "is not an image file")]
    twins = tmp_path / "twins"
    twins.mkdir()
    for name in ("a.png", "a.jpg"):
        Image.new("RGB", (40, 30)).save(twins / name)
    cases.append((twins, "a.jpg and a.png would write the same output files"))
    for path, needle in cases:
        assert main(["predict", "--checkpoint", str(run["checkpoint"]), "--images", str(path),
                     "--task", "foreground", "--out", str(tmp_path / "o")]) == 2
        line = _one_line(capsys.readouterr().err)
        assert needle in line, line
    for flags, needle in (
            (["--task", "instance", "--classes", "a", "--alpha", str(images)],
             "--alpha applies to --task matting or foreground"),
            (["--task", "matting", "--alpha", str(tmp_path / "nope")], "is not a folder"),
            (["--task", "matting", "--alpha", str(empty)],
             f"{images / 'rotated.jpg'} has no alpha {empty / 'rotated.png'} (3 missing)")):
        assert main(["predict", "--checkpoint", str(run["checkpoint"]), "--images", str(images),
                     "--out", str(tmp_path / "o"), *flags]) == 2
        line = _one_line(capsys.readouterr().err)
        assert needle in line, line
    bad_ckpt = tmp_path / "bad.pt"
    bad_ckpt.write_bytes(b"garbage")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    for ckpt, needle in ((bad_ckpt, "cannot be read"), (foreign, "not an `engine train`")):
        assert main(["predict", "--checkpoint", str(ckpt), "--images", str(images),
                     "--task", "foreground", "--out", str(tmp_path / "o")]) == 2
        line = _one_line(capsys.readouterr().err)
        assert f"--checkpoint {ckpt}" in line and needle in line, line
    unreadable = tmp_path / "all-bad"
    unreadable.mkdir()
    (unreadable / "x.png").write_bytes(b"junk")
    assert main(["predict", "--checkpoint", str(run["checkpoint"]), "--images", str(unreadable),
                 "--task", "foreground", "--out", str(tmp_path / "o2"), "--device", "cpu"]) == 2
    assert "no image could be decoded" in _one_line(capsys.readouterr().err)


def test_classes_default_to_the_vocabulary_the_checkpoint_trained_on(run, images, tmp_path):
    """No --classes: the names and isthing `engine train` stored (the scenes' kept categories, read
    here by DuckDB); the results equal those of --classes with the same names."""
    import duckdb

    state = torch.load(run["checkpoint"], weights_only=True)
    files = ", ".join(f"'{f}'" for f in sorted((run["scenes"] / "objects").glob("*.parquet")))
    names = [r[0] for r in duckdb.sql(f"SELECT DISTINCT category FROM read_parquet([{files}]) "
                                      "WHERE keep ORDER BY category").fetchall()]
    assert state["config"]["data"]["vocabulary"] == {"names": names,
                                                     "isthing": [True] * len(names)}
    assert _predict(run, images, tmp_path / "default", "--task", "instance") == 0
    assert _predict(run, images, tmp_path / "given", "--task", "instance", "--classes",
                    ",".join(names)) == 0
    for name in ("results.json", "images.json"):
        assert (json.loads((tmp_path / "default" / name).read_text())
                == json.loads((tmp_path / "given" / name).read_text()))
    categories = json.loads((tmp_path / "default" / "images.json").read_text())["categories"]
    assert [c["name"] for c in categories] == names
    default = json.loads((tmp_path / "default" / "summary.json").read_text())
    given = json.loads((tmp_path / "given" / "summary.json").read_text())
    assert (default["classes_from"], given["classes_from"]) == ("checkpoint", "--classes")
    assert default["classes"] == given["classes"] == names


def test_a_checkpoint_without_vocabulary_asks_for_classes(run, images, tmp_path, capsys):
    """A checkpoint written before checkpoints kept the vocabulary: one line asking for
    --classes; with --classes it still works."""
    from model.checkpoint import save_checkpoint

    state = torch.load(run["checkpoint"], weights_only=True)
    del state["config"]["data"]["vocabulary"]
    old = tmp_path / "old.pt"
    save_checkpoint(old, state)
    argv = ["predict", "--checkpoint", str(old), "--images", str(images), "--device", "cpu"]
    for task in ("instance", "panoptic"):
        assert main([*argv, "--out", str(tmp_path / "o"), "--task", task]) == 2
        line = _one_line(capsys.readouterr().err)
        assert f"--task {task} needs --classes a,b,c" in line and str(old) in line, line
        assert "stores no training vocabulary" in line, line
    assert not (tmp_path / "o").exists()
    assert main([*argv, "--out", str(tmp_path / "ok"), "--task", "semantic",
                 "--classes", CLASSES]) == 0


def _stuffy_checkpoint(run, tmp_path) -> tuple:
    """The run's checkpoint with `star` stored as stuff -> (path, vocabulary names)."""
    from model.checkpoint import save_checkpoint

    state = torch.load(run["checkpoint"], weights_only=True)
    names = state["config"]["data"]["vocabulary"]["names"]
    state["config"]["data"]["vocabulary"]["isthing"] = [n != "star" for n in names]
    ckpt = tmp_path / "stuffy.pt"
    save_checkpoint(ckpt, state)
    return ckpt, names


def test_panoptic_takes_isthing_from_the_checkpoint_unless_stuff_is_given(run, images, tmp_path):
    """The stored isthing decides which classes panoptic merges; --stuff overrides it."""
    ckpt, names = _stuffy_checkpoint(run, tmp_path)
    argv = ["predict", "--checkpoint", str(ckpt), "--images", str(images), "--device", "cpu",
            "--task", "panoptic"]
    for out, flags, stuff in ((tmp_path / "stored", [], {"star"}),
                              (tmp_path / "flag", ["--stuff", "horse"], {"horse"})):
        assert main([*argv, "--out", str(out), *flags]) == 0
        categories = json.loads((out / "panoptic.json").read_text())["categories"]
        assert [c["name"] for c in categories] == names
        assert {c["name"] for c in categories if not c["isthing"]} == stuff


def test_instance_leaves_the_checkpoints_stuff_classes_out(run, images, tmp_path):
    """A stuff class of the stored vocabulary is not an instance: no result carries it, and the
    results are those of --classes given the other names' texts scored as before."""
    ckpt, names = _stuffy_checkpoint(run, tmp_path)
    argv = ["predict", "--checkpoint", str(ckpt), "--images", str(images), "--device", "cpu",
            "--task", "instance", "--top-k", "500"]
    assert main([*argv, "--out", str(tmp_path / "stuffy")]) == 0
    assert main([*argv, "--out", str(tmp_path / "all"), "--classes", ",".join(names)]) == 0
    star = names.index("star") + 1  # category ids are 1..K in vocabulary order
    stuffy = json.loads((tmp_path / "stuffy" / "results.json").read_text())
    every = json.loads((tmp_path / "all" / "results.json").read_text())
    assert stuffy and all(r["category_id"] != star for r in stuffy)
    assert any(r["category_id"] == star for r in every)
    # the sigmoid scores do not depend on the other texts: the rest is unchanged
    assert sorted(r["score"] for r in stuffy) == pytest.approx(
        sorted(r["score"] for r in every if r["category_id"] != star), rel=1e-5)
