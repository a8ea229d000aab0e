"""Metrics against hand-worked cases and brute-force numpy."""

from __future__ import annotations

import numpy as np
import pytest

from model.evaluate import (
    foreground_mse,
    instance_ap,
    panoptic_quality,
    referring_iou,
    semantic_miou,
)
from schemas import masks as mask_codec


def rect(h, w, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def obj(category, mask, iscrowd=False):
    ys, xs = np.nonzero(mask)
    box = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
    return {
        "category": category,
        "mask": mask_codec.encode(mask[None])[0],
        "box": box,
        "iscrowd": iscrowd,
    }


def gt_image():
    cat1, cat2 = rect(40, 60, 2, 20, 2, 20), rect(40, 60, 5, 30, 30, 55)
    dog, crowd = rect(40, 60, 25, 38, 2, 20), rect(40, 60, 32, 40, 30, 58)
    return {
        "image_id": "i1",
        "height": 40,
        "width": 60,
        "objects": [
            obj("cat", cat1),
            obj("cat", cat2),
            obj("dog", dog),
            obj("person", crowd, iscrowd=True),
        ],
    }


def as_predictions(image, scores):
    return [
        {**o, "image_id": image["image_id"], "score": s}
        for o, s in zip(image["objects"], scores, strict=False)
        if not o["iscrowd"]
    ]


def test_perfect_instance_predictions_score_one():
    image = gt_image()
    preds = as_predictions(image, [0.9, 0.8, 0.7])
    # a detection on the crowd region is ignored, not a false positive
    preds.append({**image["objects"][3], "image_id": "i1", "score": 0.95, "category": "person"})
    out = instance_ap([image], preds)
    assert out["mask_AP"] == pytest.approx(1.0) and out["box_AP"] == pytest.approx(1.0)


def test_instance_ap_hand_computed():
    image = {**gt_image(), "objects": gt_image()["objects"][:2]}  # two cats
    preds = as_predictions(image, [0.9])
    # a higher-scored false positive: ranked list = FP, TP; recall 0.5 at precision 0.5.
    # COCO interpolates precision at 101 recall points: the 51 points r <= 0.5 get 0.5, the rest 0,
    # at every IoU threshold (the TP is exact), so AP = 0.5 * 51 / 101.
    preds.append(
        {
            "image_id": "i1",
            "category": "cat",
            "score": 0.95,
            **{
                k: v
                for k, v in obj("x", rect(40, 60, 34, 40, 0, 6)).items()
                if k in ("mask", "box")
            },
        }
    )
    out = instance_ap([image], preds)
    assert out["mask_AP"] == pytest.approx(0.5 * 51 / 101, abs=1e-9)
    assert out["box_AP"] == pytest.approx(0.5 * 51 / 101, abs=1e-9)


def test_detection_only_gives_box_ap():
    image = gt_image()
    preds = [
        {k: v for k, v in p.items() if k != "mask"} for p in as_predictions(image, [0.9, 0.8, 0.7])
    ]
    out = instance_ap([image], preds)
    assert out["box_AP"] == pytest.approx(1.0) and out["mask_AP"] is None


def test_panoptic_quality_hand_computed():
    # 4x4 image. GT: cat A = rows 0-1 cols 0-1 (4 px), cat B = rows 0-1 cols 2-3 (4 px),
    # sky = rows 2-3 (8 px).
    # Pred: cat P1 = A + pixel (2, 0): I 4, U 5, IoU 0.8 > 0.5 -> TP.
    #       cat P2 = row 0 cols 2-3: I 2, U 4, IoU 0.5, not > 0.5 -> P2 is an FP and B an FN.
    #       sky = rows 2-3 minus (2, 0): I 7, U 8, IoU 0.875 -> TP.
    # cat: PQ = 0.8 / (1 + 0.5 + 0.5) = 0.4, SQ 0.8, RQ 0.5; sky: PQ = SQ = 0.875, RQ 1.
    # all: PQ (0.4 + 0.875) / 2 = 0.6375, SQ 0.8375, RQ 0.75; things 0.4; stuff 0.875.
    a, b, sky = rect(4, 4, 0, 2, 0, 2), rect(4, 4, 0, 2, 2, 4), rect(4, 4, 2, 4, 0, 4)
    p1 = a.copy()
    p1[2, 0] = True
    p2 = rect(4, 4, 0, 1, 2, 4)
    psky = sky & ~p1
    gt = [
        [
            {"category": "cat", "mask": a},
            {"category": "cat", "mask": b},
            {"category": "sky", "mask": mask_codec.encode(sky[None])[0]},
        ]
    ]
    pred = [
        [
            {"category": "cat", "mask": p1},
            {"category": "cat", "mask": p2},
            {"category": "sky", "mask": psky},
        ]
    ]
    out = panoptic_quality(gt, pred, {"cat": True, "sky": False})
    assert out["all"]["PQ"] == pytest.approx(0.6375)
    assert out["all"]["SQ"] == pytest.approx(0.8375) and out["all"]["RQ"] == pytest.approx(0.75)
    assert out["things"]["PQ"] == pytest.approx(0.4) and out["stuff"]["PQ"] == pytest.approx(0.875)
    assert out["per_class"] == pytest.approx({"cat": 0.4, "sky": 0.875})


def test_panoptic_void_and_crowd():
    # 4x4 image. GT: dog = rows 0-1 cols 0-1; crowd person = rows 2-3 cols 0-1; the rest is void.
    # Pred dog = rows 0-1 (8 px): I 4, U 8, minus 4 px on void -> IoU 1, a TP.
    # Pred cow on rows 2-3 cols 2-3: all void -> ignored. Pred person on the crowd -> ignored.
    # So only dog counts: PQ = SQ = RQ = 1.
    dog, crowd = rect(4, 4, 0, 2, 0, 2), rect(4, 4, 2, 4, 0, 2)
    gt = [
        [{"category": "dog", "mask": dog}, {"category": "person", "mask": crowd, "iscrowd": True}]
    ]
    pred = [
        [
            {"category": "dog", "mask": rect(4, 4, 0, 2, 0, 4)},
            {"category": "cow", "mask": rect(4, 4, 2, 4, 2, 4)},
            {"category": "person", "mask": crowd},
        ]
    ]
    out = panoptic_quality(gt, pred, {"dog": True, "person": True, "cow": True})
    assert out["all"] == pytest.approx({"PQ": 1.0, "SQ": 1.0, "RQ": 1.0, "n": 1})
    perfect = panoptic_quality(gt, [[gt[0][0]]], {"dog": True, "person": True})
    assert perfect["all"]["PQ"] == 1.0


def test_semantic_miou_matches_brute_force():
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 5, (12, 9)) for _ in range(3)]
    preds = [np.where(rng.random(g.shape) < 0.7, g, rng.integers(0, 5, g.shape)) for g in gts]
    gts[0][0, :] = 255  # ignored row
    out = semantic_miou(gts, preds, num_classes=6)  # class 5 never appears: left out
    g, p = np.concatenate([x.ravel() for x in gts]), np.concatenate([x.ravel() for x in preds])
    keep = g != 255
    ious = [
        ((g == c) & (p == c) & keep).sum() / (((g == c) | (p == c)) & keep).sum() for c in range(5)
    ]
    assert out["mIoU"] == pytest.approx(np.mean(ious))
    assert np.isnan(out["iou"][5])
    assert out["pixel_acc"] == pytest.approx(((g == p) & keep).sum() / keep.sum())
    assert semantic_miou(gts, gts, num_classes=6)["mIoU"] == 1.0


def test_referring_iou_matches_brute_force():
    rng = np.random.default_rng(1)
    gts = [rng.random((10, 10)) < 0.3 for _ in range(4)]
    preds = [rng.random((10, 10)) < 0.3 for _ in range(4)]
    out = referring_iou(gts, [mask_codec.encode(p[None])[0] for p in preds])
    inter = [(g & p).sum() for g, p in zip(gts, preds, strict=True)]
    union = [(g | p).sum() for g, p in zip(gts, preds, strict=True)]
    assert out["cIoU"] == pytest.approx(sum(inter) / sum(union))
    assert out["mIoU"] == pytest.approx(np.mean(np.array(inter) / np.array(union)))
    assert referring_iou(gts, gts) == {"cIoU": 1.0, "mIoU": 1.0}


def test_foreground_mse():
    rng = np.random.default_rng(2)
    gts = [rng.random((6, 7)) < 0.5, rng.random((3, 4)) < 0.5]
    preds = [rng.random((6, 7)), rng.random((3, 4))]
    expected = np.mean([((p - g) ** 2).mean() for g, p in zip(gts, preds, strict=True)])
    assert foreground_mse(gts, preds) == pytest.approx(expected)
    assert foreground_mse(gts, [g.astype(float) for g in gts]) == 0.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        foreground_mse(gts, [p * 255 for p in preds])
