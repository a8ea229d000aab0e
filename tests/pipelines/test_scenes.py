"""Generated scenes: exact disjoint visible masks, tight boxes, determinism, agreeing COCO files."""

import json

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipelines.scenes import MIN_VISIBLE_PIXELS, SHAPES, make_scene, scene_rng, write_scenes
from pipelines.sources.demo import DEMO_DIR, scenes_gt_file


def _rles(masks: np.ndarray) -> list[dict]:
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def test_scene_masks_are_disjoint_visible_pixels_with_tight_boxes():
    for i in range(6):
        scene = make_scene(scene_rng(3, i), width=160, height=120)
        n = len(scene.masks)
        assert scene.image.shape == (120, 160, 3) and scene.image.dtype == np.uint8
        assert n >= 1 and scene.masks.shape == (n, 120, 160) and len(scene.categories) == n
        assert set(scene.categories) <= set(SHAPES)
        # Visible masks never share a pixel.
        assert scene.masks.sum(0).max() <= 1
        assert (scene.masks.reshape(n, -1).sum(1) >= MIN_VISIBLE_PIXELS).all()
        # Boxes are the tight boxes of the masks, as pycocotools computes them (xywh -> xyxy).
        xywh = mask_utils.toBbox(_rles(scene.masks))
        expected = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        np.testing.assert_array_equal(scene.boxes, expected)


def test_make_scene_is_deterministic_and_seed_dependent():
    a = make_scene(scene_rng(11, 2))
    b = make_scene(scene_rng(11, 2))
    c = make_scene(scene_rng(12, 2))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert a.categories == b.categories
    assert not np.array_equal(a.image, c.image)


def test_plain_scenes_have_flat_fills_and_keep_the_mask_contract():
    """The plain style (training miniatures): a texture background and flat shaded fills, so the
    inside of an object varies far less than a photo-filled one; masks and boxes as for photo."""
    for i in range(4):
        scene = make_scene(scene_rng(5, i), width=160, height=160, style="plain")
        n = len(scene.masks)
        assert n >= 1 and scene.masks.sum(0).max() <= 1
        xywh = mask_utils.toBbox(_rles(scene.masks))
        np.testing.assert_array_equal(scene.boxes[:, :2], xywh[:, :2])
        for mask in scene.masks:  # the fill's noise is sd 8 plus a gentle ramp; edges excluded
            inner = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            if inner.sum() > 50:
                assert scene.image[inner].astype(float).std(0).max() < 30
    a = make_scene(scene_rng(5, 0), width=160, height=160, style="plain")
    np.testing.assert_array_equal(a.image, make_scene(scene_rng(5, 0), width=160, height=160,
                                                      style="plain").image)
    with pytest.raises(ValueError, match="unknown scene style 'fancy'; choose one of: photo"):
        make_scene(scene_rng(5, 0), style="fancy")


def test_too_small_scene_is_rejected():
    with pytest.raises(ValueError, match="too small"):
        make_scene(scene_rng(0, 0), width=20, height=20)


def test_write_scenes_round_trips_through_coco_files(tmp_path):
    boxes_file, gt_file = write_scenes(tmp_path, 3, seed=5, width=200, height=150, first_image_id=7)
    boxes_only, gt = json.loads(boxes_file.read_text()), COCO(str(gt_file))
    assert [im["id"] for im in boxes_only["images"]] == [7, 8, 9]
    assert all("segmentation" not in a for a in boxes_only["annotations"])
    assert [a["bbox"] for a in boxes_only["annotations"]] == [
        gt.anns[a["id"]]["bbox"] for a in boxes_only["annotations"]
    ]
    for i, image in enumerate(boxes_only["images"]):
        scene = make_scene(scene_rng(5, i), width=200, height=150)
        # PNG is lossless: the pixels read back are the generated ones.
        png = cv2.cvtColor(cv2.imread(str(tmp_path / image["file_name"])), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(png, scene.image)
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[image["id"]]))
        decoded = np.stack([gt.annToMask(a) for a in anns]).astype(bool)
        np.testing.assert_array_equal(decoded, scene.masks)
        # Each COCO bbox is the tight box of its RLE mask, and area is the mask's pixel count.
        rles = [a["segmentation"] for a in anns]
        np.testing.assert_array_equal(mask_utils.toBbox(rles), [a["bbox"] for a in anns])
        assert [a["area"] for a in anns] == list(scene.masks.reshape(len(anns), -1).sum(1))


def test_a_larger_set_starts_with_the_same_scenes(tmp_path):
    small, _ = write_scenes(tmp_path / "a", 2, seed=1)
    large, _ = write_scenes(tmp_path / "b", 4, seed=1)
    small_anns = json.loads(small.read_text())["annotations"]
    large_anns = json.loads(large.read_text())["annotations"]
    assert large_anns[: len(small_anns)] == small_anns


def test_shipped_scenes_gt_masks_agree_with_their_boxes():
    boxes = json.loads((DEMO_DIR / "scenes.json").read_text())
    gt = COCO(str(scenes_gt_file()))
    assert len(boxes["images"]) == len(gt.imgs) == 12
    for ann in boxes["annotations"]:
        gt_ann = gt.anns[ann["id"]]
        assert gt_ann["image_id"] == ann["image_id"] and gt_ann["bbox"] == ann["bbox"]
        mask = gt.annToMask(gt_ann).astype(bool)
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        x, y, w, h = ann["bbox"]
        assert (cols[0], rows[0], cols[-1] + 1 - cols[0], rows[-1] + 1 - rows[0]) == (x, y, w, h)
    # Each image's masks are disjoint (visible pixels) and its PNG has the stated size.
    for image in gt.imgs.values():
        masks = np.stack([gt.annToMask(a) for a in gt.loadAnns(gt.getAnnIds(imgIds=[image["id"]]))])
        assert masks.sum(0).max() <= 1
        png = cv2.imread(str(DEMO_DIR / image["file_name"]))
        assert png.shape == (image["height"], image["width"], 3)


def test_shipped_scenes_are_reproduced_by_the_generator(tmp_path):
    write_scenes(tmp_path, 12, seed=0, first_image_id=1001)
    regenerated = json.loads((tmp_path / "scenes_gt.json").read_text())
    shipped = json.loads(scenes_gt_file().read_text())
    assert regenerated["annotations"] == shipped["annotations"]
    png = cv2.imread(str(tmp_path / "scenes" / "scene_0003.png"))
    np.testing.assert_array_equal(png, cv2.imread(str(DEMO_DIR / "scenes" / "scene_0003.png")))
