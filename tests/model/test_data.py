"""model/data.py against shards written here: real PNGs with coloured rectangles whose masks,
boxes and captions are known, so every target can be recomputed independently with numpy."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from model import transforms as T
from model.data import MixtureLoader, iter_eval_samples
from model.mixture import parse_mixture
from schemas import SCHEMA_VERSION, table_from_rows
from schemas import masks as mask_codec

H, W = 48, 64
# name -> (category, x0, y0, x1, y1, RGB colour, isthing, iscrowd, keep, mask kind, captions)
# fmt: off
OBJECTS = {
    "a": ("cat", 4, 6, 20, 30, (255, 0, 0), True, False, True, "gt",
          [("a red cat", "gt"), ("the left cat", "gt"), ("cat on the left", "template")]),
    "b": ("cat", 24, 6, 40, 30, (0, 255, 0), True, False, True, "sam:vit_b",
          [("a green cat", "gt")]),
    "c": ("sky", 0, 36, 64, 48, (0, 0, 255), False, False, True, "gt", []),
    "d": ("dog", 44, 6, 60, 30, (255, 255, 0), True, True, True, "gt", []),
    "e": ("dog", 44, 0, 60, 4, (255, 0, 255), True, False, False, "gt", [("hidden dog", "gt")]),
}
# fmt: on


def rect(x0, y0, x1, y1) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def write_shards(
    out: Path,
    root: Path,
    n_images: int = 6,
    per_part: int = 3,
    prefix: str = "img",
    image_files: dict[str, Path] | None = None,
) -> Path:
    """An `engine synthesize`-like folder: manifest + images/objects parts; returns `out`."""
    (out / "images").mkdir(parents=True)
    (out / "objects").mkdir()
    root.mkdir(parents=True, exist_ok=True)
    units = {}
    for part in range(0, n_images, per_part):
        image_rows, object_rows = [], []
        for k in range(part, min(part + per_part, n_images)):
            image_id = f"{prefix}{k:03d}"
            path = root / f"{image_id}.png"
            if not path.exists():
                pixels = np.full((H, W, 3), 128, dtype=np.uint8)
                for _, (_, x0, y0, x1, y1, colour, *_rest) in OBJECTS.items():
                    pixels[y0:y1, x0:x1] = colour
                pixels[H - 1, 0] = k  # makes every image's bytes (and sha256) distinct
                cv2.imwrite(str(path), cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            image_rows.append(
                {
                    "image_id": image_id,
                    "source": "test",
                    "split": "train",
                    "source_image_id": str(k),
                    "file_path": path.name,
                    "width": W,
                    "height": H,
                    "sha256": digest,
                    "status": "ok",
                    "num_objects": 5,
                    "run_id": "r",
                }
            )
            object_rows += [_object_row(image_id, name) for name in sorted(OBJECTS)]
        name = f"part-{part // per_part:05d}.parquet"
        pq.write_table(table_from_rows("images", image_rows), out / "images" / name)
        pq.write_table(table_from_rows("objects", object_rows), out / "objects" / name)
        units[f"{part // per_part:05d}"] = {
            "images_file": f"images/{name}",
            "objects_file": f"objects/{name}",
            "counts": {"images": len(image_rows), "objects": len(object_rows)},
        }
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "source": {"name": "test", "root": str(root)},
        "units": units,
        "totals": {k: sum(u["counts"][k] for u in units.values()) for k in ("images", "objects")},
        "extra": {"ignored": True},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _object_row(image_id: str, name: str) -> dict:
    cat, x0, y0, x1, y1, _, isthing, iscrowd, keep, kind, captions = OBJECTS[name]
    value = mask_codec.encode(rect(x0, y0, x1, y1)[None])[0]
    return {
        "object_id": f"{image_id}:{name}",
        "image_id": image_id,
        "source_ann_id": name,
        "category": cat,
        "box": [x0, y0, x1 - x0, y1 - y0],
        "iscrowd": iscrowd,
        "attributes": json.dumps({"isthing": isthing}),
        "mask": value,
        "mask_origin": kind,
        "gt_mask": value if kind == "gt" else None,
        "status": "kept" if keep else "filtered",
        "keep": keep,
        "run_id": "r",
        "captions": [{"text": t, "provenance": p, "score": None} for t, p in captions],
    }


@pytest.fixture()
def shards(tmp_path) -> Path:
    return write_shards(tmp_path / "shards", tmp_path / "images")


def mixture(*entries, exclude=None):
    doc = {"datasets": [dict(e) for e in entries]}
    if exclude:
        doc["exclude"] = [str(p) for p in exclude]
    return parse_mixture(doc)


def loader_for(path, tasks, size=64, **kw):
    spec = {"path": str(path), "weight": 1.0, "tasks": tasks}
    spec.update({k: kw.pop(k) for k in ("masks", "captions", "keep_only") if k in kw})
    return MixtureLoader(mixture(spec), image_size=size, **kw)


def eval_one(path, task, size=64, **kw) -> dict:
    return next(iter_eval_samples(path, task, size, **kw))


def expected_box(name, size, scale=1.0):
    _, x0, y0, x1, y1, *_ = OBJECTS[name]
    x0, y0, x1, y1 = (v * scale for v in (x0, y0, x1, y1))
    return [(x0 + x1) / 2 / size, (y0 + y1) / 2 / size, (x1 - x0) / size, (y1 - y0) / size]


def test_instance_eval_sample_matches_numpy(shards):
    s = eval_one(shards, "instance")
    t = s["target"]
    # vocabulary: kept categories (the filtered 'e' still has a kept 'dog' sibling: the crowd)
    assert t["texts"] == ["a photo of a cat.", "a photo of a dog.", "a photo of a sky."]
    # things that are neither crowd nor filtered: a and b, both 'cat'
    assert t["labels"].tolist() == [0, 0]
    assert t["has_masks"] and t["is_thing"].tolist() == [True, True]
    expected = torch.tensor([expected_box("a", 64), expected_box("b", 64)])
    assert torch.allclose(t["boxes"], expected.float(), atol=1e-6)
    for k, name in enumerate("ab"):
        mask = np.zeros((64, 64), dtype=bool)
        mask[:H, :W] = rect(*OBJECTS[name][1:5])
        assert np.array_equal(t["masks"][k].numpy(), mask)
    # image: normalised pixels where object a is red, zero padding below the 48 image rows
    img = s["image"]
    red = (np.array([1.0, 0.0, 0.0]) - T.IMAGENET_MEAN) / T.IMAGENET_STD
    assert torch.allclose(img[:, 10, 10], torch.tensor(red, dtype=torch.float32), atol=1e-5)
    assert torch.count_nonzero(img[:, H:, :]) == 0
    # original-size GT keeps the crowd as an ignore region
    gt = s["gt"]
    assert [(o["category"], o["iscrowd"]) for o in gt["objects"]] == [
        ("cat", False),
        ("cat", False),
        ("dog", True),
    ]
    assert np.array_equal(mask_codec.decode([gt["objects"][0]["mask"]])[0], rect(4, 6, 20, 30))


def test_resize_scales_boxes_and_masks(shards):
    t = eval_one(shards, "instance", size=32)["target"]  # scale 0.5: 64x48 -> 32x24
    expected = torch.tensor([expected_box("a", 32, 0.5), expected_box("b", 32, 0.5)]).float()
    assert torch.allclose(t["boxes"], expected, atol=1e-6)
    assert t["masks"].shape == (2, 32, 32)
    assert int(t["masks"][0].sum()) == (20 - 4) // 2 * (30 - 6) // 2


def test_semantic_merges_a_class_and_panoptic_keeps_instances(shards):
    sem = eval_one(shards, "semantic")["target"]
    texts = [sem["texts"][i] for i in sem["labels"]]
    assert texts == ["a photo of a cat.", "a photo of a sky."]
    union = rect(4, 6, 20, 30) | rect(24, 6, 40, 30)
    assert np.array_equal(sem["masks"][0, :H, :W].numpy(), union)
    assert sem["is_thing"].tolist() == [True, False]
    pan = eval_one(shards, "panoptic")["target"]
    assert pan["labels"].tolist() == [0, 0, 2] and pan["is_thing"].tolist() == [True, True, False]
    assert torch.allclose(pan["boxes"][2], torch.tensor(expected_box("c", 64)).float())


def test_referring_foreground_detection_targets(shards):
    ref = eval_one(shards, "referring", captions=["gt"])["target"]
    # one target per (object, expression); the template caption and the filtered object are out
    assert ref["texts"] == ["a red cat", "the left cat", "a green cat"]
    assert ref["labels"].tolist() == [0, 1, 2]
    assert torch.equal(ref["masks"][0], ref["masks"][1])
    fg = eval_one(shards, "foreground")["target"]
    assert fg["texts"] == ["foreground object"] and fg["labels"].tolist() == [0]
    union = rect(4, 6, 20, 30) | rect(24, 6, 40, 30) | rect(0, 36, 64, 48)
    assert np.array_equal(fg["masks"][0, :H, :W].numpy(), union)
    det = eval_one(shards, "detection")["target"]
    assert not det["has_masks"] and det["masks"].shape == (2, 64, 64)
    assert not det["masks"].any() and det["labels"].tolist() == [0, 0]


def test_mask_provenance_filter(shards):
    gt_only = eval_one(shards, "instance", masks=("gt",))["target"]
    assert not gt_only["has_masks"]  # b has only a synthesized mask: boxes only, no false negative
    synth = eval_one(shards, "panoptic", masks=("synthesized",))["target"]
    assert synth["labels"].tolist() == [0]  # only b's mask is synthesized
    assert np.array_equal(synth["masks"][0, :H, :W].numpy(), rect(24, 6, 40, 30))


def test_training_samples_are_consistent_under_flip(shards):
    loader = loader_for(shards, ["instance", "referring"], batch_size=4, seed=3)
    flipped = unflipped = 0
    it = iter(loader)
    for _ in range(8):
        batch = next(it)
        assert batch["images"].shape == (4, 3, 64, 64)
        for image, t in zip(batch["images"], batch["targets"], strict=True):
            for box, mask in zip(t["boxes"], t["masks"], strict=True):
                ys, xs = np.nonzero(mask.numpy())
                tight = [
                    (xs.min() + xs.max() + 1) / 128,
                    (ys.min() + ys.max() + 1) / 128,
                    (xs.max() + 1 - xs.min()) / 64,
                    (ys.max() + 1 - ys.min()) / 64,
                ]
                assert np.allclose(box.numpy(), tight, atol=1e-6)
                # the pixels under the mask are one object's colour, whatever the flip did
                colours = image[:, ys, xs].std(dim=1)
                assert float(colours.max()) < 1e-4
            left = bool(t["masks"][0, 10, 10]) if t["task"] == "instance" else None
            flipped += left is False
            unflipped += left is True
    assert flipped and unflipped  # both flips happened


def test_referring_draws_a_caption_at_random(shards):
    loader = loader_for(shards, ["referring"], batch_size=8, seed=0)
    seen = set()
    it = iter(loader)
    for _ in range(6):
        for t in next(it)["targets"]:
            seen.update(t["texts"])
    assert seen == {"a red cat", "the left cat", "cat on the left", "a green cat"}


def test_resume_gives_the_same_future_batches(shards):
    def batches(loader, n):
        it = iter(loader)
        return [next(it) for _ in range(n)]

    full = batches(loader_for(shards, ["instance", "referring"], seed=7), 6)
    first = loader_for(shards, ["instance", "referring"], seed=7)
    batches(first, 2)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = loader_for(shards, ["instance", "referring"], seed=7)
    resumed.load_state_dict(state)
    rest = batches(resumed, 4)
    for a, b in zip(full[2:], rest, strict=True):
        assert torch.equal(a["images"], b["images"])
        for ta, tb in zip(a["targets"], b["targets"], strict=True):
            assert ta["texts"] == tb["texts"] and ta["image_id"] == tb["image_id"]
            assert torch.equal(ta["masks"], tb["masks"]) and torch.equal(ta["boxes"], tb["boxes"])
    other = batches(loader_for(shards, ["instance", "referring"], seed=8), 6)
    assert [t["image_id"] for b in other for t in b["targets"]] != [
        t["image_id"] for b in full for t in b["targets"]
    ]


def test_an_epoch_visits_every_image_once(shards):
    loader = loader_for(shards, ["instance"], batch_size=6)
    ids = [t["image_id"] for t in next(iter(loader))["targets"]]
    assert sorted(ids) == [f"img{k:03d}" for k in range(6)]


def test_eval_set_images_are_excluded_by_hash(tmp_path, shards):
    # the eval set points at two of the same files (same bytes) under other ids
    images = tmp_path / "images"
    eval_dir = write_shards(tmp_path / "eval", images, n_images=2, prefix="img")
    loader = MixtureLoader(
        mixture({"path": str(shards), "tasks": ["instance"]}, exclude=[eval_dir]),
        image_size=64,
        batch_size=8,
    )
    assert loader.excluded == {"shards": 2}
    ids = {t["image_id"] for _ in range(3) for t in loader.next_batch()["targets"]}
    assert ids == {f"img{k:03d}" for k in range(2, 6)}


def test_weights_set_dataset_frequency(tmp_path):
    a = write_shards(tmp_path / "a", tmp_path / "ia", prefix="a")
    b = write_shards(tmp_path / "b", tmp_path / "ib", prefix="b")
    mix = mixture(
        {"path": str(a), "weight": 3, "tasks": ["detection"]},
        {"path": str(b), "weight": 1, "tasks": ["detection"]},
    )
    loader = MixtureLoader(mix, image_size=32, batch_size=50, seed=1)
    ids = [t["image_id"] for _ in range(8) for t in loader.next_batch()["targets"]]
    share = sum(i.startswith("a") for i in ids) / len(ids)
    # 400 draws at p = 0.75: the standard deviation is 0.022, so +-0.08 is > 3.5 sigma
    assert abs(share - 0.75) < 0.08


def test_non_train_pass_is_finite_and_ordered(shards):
    loader = loader_for(shards, ["instance", "semantic"], batch_size=4, train=False)
    batches = list(loader)
    tasks_ids = [(t["task"], t["image_id"]) for b in batches for t in b["targets"]]
    assert tasks_ids == [
        (task, f"img{k:03d}") for task in ("instance", "semantic") for k in range(6)
    ]


def test_missing_image_names_the_file(tmp_path, shards):
    (tmp_path / "images" / "img000.png").unlink()
    with pytest.raises(FileNotFoundError, match="img000.png"):
        list(iter_eval_samples(shards, "instance", 64))


def test_unpad_resize_inverts_the_geometry(shards):
    s = eval_one(shards, "instance", size=32)
    back = T.unpad_resize(s["target"]["masks"].numpy(), s["geometry"])
    original = rect(4, 6, 20, 30)
    inter, union = (back[0] & original).sum(), (back[0] | original).sum()
    assert back.shape == (2, H, W) and inter / union > 0.95


def _object_rows(shards_set) -> int:
    return sum(len(rows) for part in shards_set.parts for rows in shards_set.objects(part).values())


def test_stale_part_files_outside_the_manifest_are_not_read(tmp_path):
    from model.data import ShardSet

    run = write_shards(tmp_path / "run", tmp_path / "images", n_images=6, per_part=3)
    # a part left by an older, larger run: in the folder, not in the manifest
    old = write_shards(tmp_path / "old", tmp_path / "images", n_images=9, per_part=3, prefix="x")
    for table in ("images", "objects"):
        (old / table / "part-00002.parquet").rename(run / table / "part-00002.parquet")
    totals = json.loads((run / "manifest.json").read_text())["totals"]
    shards = ShardSet(run)
    assert len(shards) == totals["images"] == 6
    assert _object_rows(shards) == totals["objects"] == 30
    assert {e.image_id for p in shards.parts for e in shards.images[p]} == {
        f"img{k:03d}" for k in range(6)}
    loader = loader_for(run, ["instance"], batch_size=12)
    assert {t["image_id"] for t in next(iter(loader))["targets"]} <= {
        f"img{k:03d}" for k in range(6)}
    assert shards.vocabulary(keep_only=False) == ["cat", "dog", "sky"]


def test_unreadable_runs_are_refused_naming_the_folder(tmp_path):
    from model.data import ShardSet
    from schemas.runs import RunError

    run = write_shards(tmp_path / "run", tmp_path / "images")
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "schema_version": "9.9.9"}))
    with pytest.raises(RunError, match=rf"{run}: written with schema version '9.9.9'"):
        ShardSet(run)
    with pytest.raises(RunError, match="9.9.9"):
        list(iter_eval_samples(run, "instance", 64))
    (run / "manifest.json").write_text(json.dumps(manifest))
    (run / "objects" / "part-00001.parquet").unlink()
    with pytest.raises(RunError, match=r"unit 00001 lists objects file .*missing"):
        loader_for(run, ["instance"])
    (run / "manifest.json").unlink()
    with pytest.raises(RunError, match="no manifest.json"):
        ShardSet(run)


def test_root_overrides_the_manifest_image_root(tmp_path):
    run = write_shards(tmp_path / "run", tmp_path / "images")
    moved = tmp_path / "mnt" / "images"
    moved.parent.mkdir()
    (tmp_path / "images").rename(moved)
    with pytest.raises(FileNotFoundError, match=rf"{run}: image root .*images is not a folder"):
        loader_for(run, ["instance"])
    batch = next(iter(MixtureLoader(
        mixture({"path": str(run), "tasks": ["instance"], "root": str(moved)}), image_size=64)))
    assert batch["images"].shape == (2, 3, 64, 64)
    sample = next(iter_eval_samples(run, "instance", 64, root=moved))
    assert sample["gt"]["image_id"] == "img000"


def test_loader_vocabulary_is_the_union_of_the_vocabulary_datasets(tmp_path):
    """The vocabulary a checkpoint stores: names of kept objects of every dataset with a class
    task, isthing from the objects' attributes; checked against DuckDB over the same parts."""
    import duckdb

    from model.shards import ShardSet

    first = write_shards(tmp_path / "a", tmp_path / "images")
    second = write_shards(tmp_path / "b", tmp_path / "images2", prefix="other")
    loader = MixtureLoader(mixture({"path": str(first), "weight": 1.0, "tasks": ["instance"]},
                                   {"path": str(second), "weight": 1.0,
                                    "tasks": ["referring"]}),
                           image_size=64)
    files = ", ".join(f"'{f}'" for f in ShardSet(first).run.files("objects"))
    rows = duckdb.sql(f"SELECT category, bool_or(json_extract(attributes, '$.isthing')::BOOLEAN)"
                      f" FROM read_parquet([{files}]) WHERE keep GROUP BY category "
                      "ORDER BY category").fetchall()
    assert loader.vocabulary() == {"names": [r[0] for r in rows], "isthing": [r[1] for r in rows]}
    assert loader.vocabulary() == {"names": ["cat", "dog", "sky"],
                                   "isthing": [True, True, False]}
    referring_only = loader_for(second, ["referring"])
    assert referring_only.vocabulary() == {"names": [], "isthing": []}
