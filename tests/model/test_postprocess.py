"""Per-task inference on hand-built logits and masks (masks at output size: no resampling)."""

import numpy as np
import pytest
import torch

from model.postprocess import (
    detection_inference,
    foreground_inference,
    instance_inference,
    panoptic_inference,
    postprocess,
    referring_inference,
    semantic_inference,
)


def _sig(x):
    return 1 / (1 + np.exp(-x))


def _masks(*regions, size=4):
    """Mask logits (Q, size, size): +5 inside each region (a tuple of slices), -5 outside."""
    out = torch.full((len(regions), size, size), -5.0)
    for q, region in enumerate(regions):
        out[q][region] = 5.0
    return out


def test_instance_scores_are_class_times_mask_score():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0], [-2.0, -3.0]])
    masks = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5]] * 3)
    out = instance_inference(logits, masks, boxes, (4, 4), top_k=3)
    # expected top-3 pairs by class prob: (q1, t1) 3.0, (q0, t0) 2.0, (q1, t0) 0.5
    assert out["labels"].tolist() == [1, 0, 0]
    for i, (q, k) in enumerate([(1, 1), (0, 0), (1, 0)]):
        m = masks[q].numpy()
        binary = m > 0
        mask_score = (_sig(m) * binary).sum() / (binary.sum() + 1e-6)
        assert out["scores"][i].item() == pytest.approx(_sig(logits[q, k].item()) * mask_score,
                                                        rel=1e-5)
        assert torch.equal(out["masks"][i], masks[q] > 0)
    assert out["boxes"][0].tolist() == [1.0, 1.0, 3.0, 3.0]


def test_instance_and_detection_leave_stuff_texts_out():
    # text 1 is stuff: its pairs, the strongest, are not instances; labels keep the text index
    logits = torch.tensor([[2.0, 5.0, -1.0], [0.5, 6.0, 3.0]])
    masks, boxes = torch.ones(2, 4, 4), torch.tensor([[0.5, 0.5, 0.5, 0.5]] * 2)
    for infer in (instance_inference, detection_inference):
        out = infer(logits, masks, boxes, (4, 4), top_k=3, is_thing=[True, False, True])
        assert out["labels"].tolist() == [2, 0, 0]
        assert [round(x, 4) for x in (out["scores"] / (out["scores"][0] / _sig(3.0))).tolist()] \
            == [round(_sig(v), 4) for v in (3.0, 2.0, 0.5)]
        everything = infer(logits, masks, boxes, (4, 4), top_k=3)
        assert everything["labels"].tolist() == [1, 1, 2]
        assert infer(logits, masks, boxes, (4, 4), is_thing=[False] * 3)["labels"].numel() == 0


def test_detection_boxes_in_pixels():
    logits = torch.tensor([[1.0], [4.0]])
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.25, 0.5, 0.5, 1.0]])
    out = detection_inference(logits, torch.zeros(2, 1, 1), boxes, (4, 8), top_k=1)
    assert out["labels"].tolist() == [0]
    assert out["scores"].item() == pytest.approx(_sig(4.0))
    assert out["boxes"].tolist() == [[0.0, 0.0, 4.0, 4.0]]  # x in [0, 4] of 8, y in [0, 4] of 4


def test_semantic_matches_numpy_formula():
    g = torch.Generator().manual_seed(1)
    logits, masks = torch.randn(5, 3, generator=g), torch.randn(5, 4, 4, generator=g)
    out = semantic_inference(logits, masks, None, (4, 4), temperature=0.06)
    cls = _sig(logits.numpy()) / 0.06
    cls = np.exp(cls - cls.max(1, keepdims=True))
    cls /= cls.sum(1, keepdims=True)
    expected = np.einsum("qk,qhw->khw", cls, _sig(masks.numpy()))
    np.testing.assert_allclose(out["scores"].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out["labels"], torch.from_numpy(expected.argmax(0)))


def test_panoptic_merge():
    all_rows = slice(None)
    masks = _masks(
        (all_rows, slice(0, 2)),         # q0 thing (text 0), left half
        (slice(0, 2), slice(3, 4)),      # q1 stuff (text 1), top of the last column
        (slice(2, 4), slice(3, 4)),      # q2 stuff (text 1), bottom of it: merged with q1
        (all_rows, all_rows),            # q3 text 0, everywhere but weaker: owns nothing
        (all_rows, all_rows),            # q4 below the object threshold
        (all_rows, slice(1, 3)),         # q5 text 0: owns column 2 only, half its mask
    )
    logits = torch.tensor([[3.0, -9], [-9, 2.0], [-9, 2.0], [1.0, -9], [-3.0, -9], [2.5, -9]])
    out = panoptic_inference(logits, masks, None, (4, 4), is_thing=[True, False])
    expected = np.array([[1, 1, 0, 2]] * 4)
    np.testing.assert_array_equal(out["segments"].numpy(), expected)
    assert [(s["id"], s["label"], s["is_thing"]) for s in out["info"]] == [
        (1, 0, True), (2, 1, False)]
    assert out["info"][0]["score"] == pytest.approx(_sig(3.0))
    # a lower overlap threshold keeps q5 in column 2
    kept = panoptic_inference(logits, masks, None, (4, 4), is_thing=[True, False],
                              overlap_threshold=0.4)
    assert kept["segments"][:, 2].tolist() == [3, 3, 3, 3]


def test_referring_and_foreground_take_the_best_query():
    every_col = slice(None)
    masks = _masks((slice(0, 1), every_col), (slice(1, 2), every_col), (slice(3, 4), slice(0, 1)))
    logits = torch.tensor([[0.0, 5.0], [3.0, 1.0], [1.0, 2.0]])
    out = referring_inference(logits, masks, torch.rand(3, 4), (4, 4))
    assert out["query"].tolist() == [1, 0]
    assert torch.equal(out["masks"][0], masks[1] > 0) and torch.equal(out["masks"][1], masks[0] > 0)
    fg = foreground_inference(logits[:, :1], masks, torch.rand(3, 4), (4, 4))
    torch.testing.assert_close(fg["prob"], masks[1].sigmoid())


def test_postprocess_slices_each_sample_texts_and_rejects_unknown_tasks():
    logits = torch.tensor([[[0.0, 5.0], [3.0, 1.0]], [[2.0, float("-inf")], [1.0, float("-inf")]]])
    outputs = {"pred_logits": logits, "pred_masks": torch.randn(2, 2, 2, 2),
               "pred_boxes": torch.rand(2, 2, 4),
               "text_mask": torch.tensor([[1, 1], [1, 0]]).bool()}
    results = postprocess(outputs, ["referring", "referring"], (8, 8))
    assert results[0]["masks"].shape == (2, 8, 8) and results[1]["masks"].shape == (1, 8, 8)
    assert results[1]["query"].tolist() == [0]
    with pytest.raises(ValueError, match="unknown task 'depth' for sample 1"):
        postprocess(outputs, ["semantic", "depth"], (8, 8))
