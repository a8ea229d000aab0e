"""The grabcut masker: better than the box on scenes with exact masks, never outside the box,
deterministic; and its clean-up steps checked on hand-made cases."""

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipelines.maskers import MaskerConfig, build_masker
from pipelines.maskers.box import box_masks
from pipelines.maskers.cleanup import (
    guard_collapse,
    inscribed_ellipse,
    refine_edges,
    resolve_overlaps,
)
from pipelines.maskers.grabcut import GrabCutMasker, grabcut_masks
from pipelines.scenes import make_scene, scene_rng


def _ious(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Per-object IoU by pycocotools (pred[i] against gt[i])."""

    def enc(m):
        return mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0).astype(np.uint8)))

    return np.diag(mask_utils.iou(enc(pred), enc(gt), [0] * len(gt)))


@pytest.fixture(scope="module")
def scenes():
    # A seed of its own: neither the shipped set (0), nor the tuning (7) or benchmark seeds.
    return [make_scene(scene_rng(4242, i), width=240, height=180) for i in range(8)]


def test_grabcut_beats_the_box_on_generated_scenes(scenes):
    masker = build_masker(MaskerConfig(name="grabcut"))
    assert masker.origin == "grabcut"
    ious = {"box": [], "plain": [], "grabcut": []}
    for s in scenes:
        ious["box"] += list(_ious(box_masks(*s.image.shape[:2], s.boxes), s.masks))
        ious["plain"] += list(_ious(grabcut_masks(s.image, s.boxes, clean=False), s.masks))
        out = masker(s.image, s.boxes)
        assert out.dense().shape == s.masks.shape and out.dense().dtype == bool
        assert np.isnan(out.pred_iou).all() and np.isnan(out.stability).all()
        ious["grabcut"] += list(_ious(out.dense(), s.masks))
    mean = {k: float(np.mean(v)) for k, v in ious.items()}
    # The filled box scores ~0.5 on these shapes; GrabCut ~0.85. Margins are wide on purpose.
    assert mean["grabcut"] > mean["box"] + 0.2, mean
    assert mean["plain"] > mean["box"] + 0.15, mean
    assert mean["grabcut"] > 0.75, mean


def test_masks_never_leave_their_box():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    cv2.circle(image, (60, 45), 25, (250, 20, 20), -1)
    boxes = np.array(
        [
            [30, 15, 90, 75],  # around the disc
            [0, 0, 120, 90],  # the whole image: no margin to learn the background from
            [100.4, 70.6, 120, 90],  # fractional corners, touching the bottom-right edge
            [5, 5, 7, 6],  # 2 x 1 pixels
            [10, 50, 11, 51],  # 1 pixel
        ],
        dtype=np.float64,
    )
    for clean in (False, True):
        masks = grabcut_masks(image, boxes, clean=clean)
        inside = box_masks(90, 120, boxes)
        assert masks.shape == (5, 90, 120)
        assert not (masks & ~inside).any()
    # The disc is found: most of it is foreground, the box corners are not.
    disc = grabcut_masks(image, boxes[:1])[0]
    truth = np.zeros((90, 120), np.uint8)
    cv2.circle(truth, (60, 45), 25, 1, -1)
    assert _ious(disc[None], truth[None].astype(bool))[0] > 0.85


def test_grabcut_is_deterministic(scenes):
    s = scenes[0]
    first = GrabCutMasker(iterations=3)(s.image, s.boxes).dense()
    cv2.setRNGSeed(12345)  # disturb OpenCV's global RNG between the calls
    cv2.randu(np.zeros((50, 50), np.uint8), 0, 255)
    second = GrabCutMasker(iterations=3)(s.image, s.boxes).dense()
    np.testing.assert_array_equal(first, second)


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        grabcut_masks(np.zeros((10, 10), np.uint8), np.array([[0, 0, 5, 5]]))
    with pytest.raises(ValueError, match="iterations"):
        GrabCutMasker(iterations=0)


def test_guard_replaces_collapsed_masks_by_the_inscribed_ellipse():
    ellipse = inscribed_ellipse(40, 60)
    # The ellipse's area is pi * a * b (up to pixelisation) and it touches each side's middle.
    assert abs(ellipse.sum() - np.pi * 20 * 30) < 0.02 * np.pi * 20 * 30
    assert ellipse[0, 30] and ellipse[20, 0] and not ellipse[0, 0]
    np.testing.assert_array_equal(guard_collapse(np.zeros((40, 60), bool)), ellipse)
    np.testing.assert_array_equal(guard_collapse(np.ones((40, 60), bool)), ellipse)
    plausible = np.zeros((40, 60), bool)
    plausible[5:30, 10:50] = True
    np.testing.assert_array_equal(guard_collapse(plausible), plausible)
    # A few specks fill little and span little: collapsed. A thin diagonal object (a pencil) fills
    # as little but spans its whole box: kept.
    specks = np.zeros((40, 60), bool)
    specks[18:22, 28:33] = True
    specks[2, 2] = specks[37, 57] = True
    np.testing.assert_array_equal(guard_collapse(specks), ellipse)
    pencil = np.zeros((40, 60), np.uint8)
    cv2.line(pencil, (0, 0), (59, 39), 1, 3)
    assert pencil.mean() < 0.15
    np.testing.assert_array_equal(guard_collapse(pencil.astype(bool)), pencil.astype(bool))


def test_refine_edges_moves_a_shifted_boundary_back_onto_the_colour_edge():
    crop = np.full((40, 40, 3), 30, np.uint8)
    crop[:, 20:] = 220  # object: the right half
    truth = np.zeros((40, 40), bool)
    truth[:, 20:] = True
    too_wide = np.zeros((40, 40), bool)
    too_wide[:, 19:] = True  # one column of background swallowed
    np.testing.assert_array_equal(refine_edges(too_wide, crop), truth)
    # Where object and background look alike there is no evidence: the mask is left alone.
    flat = np.full((40, 40, 3), 128, np.uint8)
    np.testing.assert_array_equal(refine_edges(too_wide, flat), too_wide)


def test_resolve_overlaps_gives_contested_pixels_to_the_smaller_mask():
    big = np.zeros((20, 20), bool)
    big[2:18, 2:18] = True
    small = np.zeros((20, 20), bool)
    small[8:12, 8:12] = True
    out = resolve_overlaps(np.stack([big, small]))
    assert out.sum(0).max() == 1
    np.testing.assert_array_equal(out[1], small)
    np.testing.assert_array_equal(out[0], big & ~small)


def test_substitutes_are_named_never_passed_off_as_grabcut():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(80, 80, 3), dtype=np.uint8)
    image[20:60, 20:60] = (200, 30, 30)  # a clear square: GrabCut's own output
    flat = np.full((80, 80, 3), 128, np.uint8)  # nothing to separate: GrabCut collapses
    boxes = np.array([[18.0, 18.0, 62.0, 62.0], [5.0, 5.0, 7.0, 7.0]])  # the 2nd is 2x2 px
    out = GrabCutMasker()(image, boxes)
    assert out.origins == ["grabcut", "grabcut+box-fallback"]
    assert out.dense()[1][5:7, 5:7].all()  # the box itself, and labelled so
    collapsed = GrabCutMasker()(flat, boxes[:1])
    assert collapsed.origins == ["grabcut+ellipse-fallback"]
    ellipse = inscribed_ellipse(44, 44)
    np.testing.assert_array_equal(collapsed.dense()[0][18:62, 18:62], ellipse)


def test_a_substituted_mask_is_filtered_unless_fallbacks_are_kept(tmp_path):
    from pipelines.process import UnitContext, process_unit
    from pipelines.quality import QualityConfig
    from pipelines.records import ImageRecord, SourceObject

    cv2.imwrite(str(tmp_path / "flat.png"), np.full((80, 80, 3), 128, np.uint8))
    record = ImageRecord("1", "flat.png", 80, 80, [SourceObject("1", "cat", [18, 18, 44, 44])])
    for keep_fallback, status in ((False, "filtered"), (True, "kept")):
        quality = QualityConfig(keep_fallback=keep_fallback)
        ctx = UnitContext("coco", "val", tmp_path, "r", quality)
        _, objects = process_unit(ctx, [record], GrabCutMasker(), lambda *a: [[]])
        (row,) = objects
        assert row["mask_origin"] == "grabcut+ellipse-fallback"
        assert row["status"] == status
        assert row["reject_code"] == (None if keep_fallback else "mask_fallback")
