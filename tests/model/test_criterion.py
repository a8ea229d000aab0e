"""SetCriterion against losses computed by hand in numpy."""

import numpy as np
import pytest
import torch

from model.criterion import DEFAULT_WEIGHTS, SetCriterion, count_matches_by_type
from model.matcher import HungarianMatcher
from tests.helpers.model_reference import giou as _giou
from tests.helpers.model_reference import pixel_centres as _centres
from tests.helpers.model_reference import sigmoid as _sigmoid


def _focal(x, t, alpha=0.25, gamma=2.0):
    p = _sigmoid(x)
    ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    return (ce * (1 - p_t) ** gamma * (alpha * t + (1 - alpha) * (1 - t))).sum()


def _batch(seed=0, q=4, h=4, w=4):
    """Sample 0: 3 texts, 2 masked targets. Sample 1: 2 texts (1 padded slot), 1 box-only target."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, q, 3, generator=g, dtype=torch.float64)
    logits[1, :, 2] = float("-inf")
    outputs = {"pred_logits": logits,
               "pred_boxes": torch.rand(2, q, 4, generator=g, dtype=torch.float64) * 0.4 + 0.2,
               "pred_masks": torch.randn(2, q, h, w, generator=g, dtype=torch.float64) * 2,
               "text_mask": torch.tensor([[True, True, True], [True, True, False]]),
               "query_types": torch.tensor([0, 0, 1, 1])}
    small = torch.rand(2, h, w, generator=g) > 0.5
    big = small.repeat_interleave(4, 1).repeat_interleave(4, 2)
    targets = [
        {"texts": ["a", "b", "c"], "labels": torch.tensor([2, 0]),
         "boxes": torch.rand(2, 4, generator=g, dtype=torch.float64) * 0.4 + 0.2, "masks": big,
         "has_masks": True, "is_thing": torch.tensor([True, False]), "task": "panoptic"},
        {"texts": ["d", "e"], "labels": torch.tensor([1]),
         "boxes": torch.rand(1, 4, generator=g, dtype=torch.float64) * 0.4 + 0.2,
         "masks": torch.zeros(1, 4 * h, 4 * w, dtype=torch.bool), "has_masks": False,
         "is_thing": torch.tensor([True]), "task": "detection"},
    ]
    return outputs, targets, small


def test_stage_losses_match_numpy():
    outputs, targets, small = _batch()
    indices = [(torch.tensor([3, 1]), torch.tensor([0, 1])), (torch.tensor([2]), torch.tensor([0]))]
    points = [_centres(4, 4)[None].expand(2, -1, -1), None]
    losses = SetCriterion().stage_losses(outputs, targets, indices, num_boxes=3.0, num_masks=2.0,
                                         points=points)

    lg = outputs["pred_logits"].numpy()
    bx, mk = outputs["pred_boxes"].numpy(), outputs["pred_masks"].numpy()
    cls = 0.0
    for b, (src, tgt) in enumerate(indices):
        k = len(targets[b]["texts"])
        onehot = np.zeros((4, k))
        onehot[src.numpy(), targets[b]["labels"].numpy()[tgt.numpy()]] = 1
        cls += _focal(lg[b, :, :k], onehot)
    l1 = giou = 0.0
    for b, (src, tgt) in enumerate(indices):
        for s, t in zip(src.tolist(), tgt.tolist(), strict=True):
            tb = targets[b]["boxes"].numpy()[t]
            l1 += np.abs(bx[b, s] - tb).sum()
            giou += 1 - _giou(bx[b, s], tb)
    bce = dice = 0.0
    for s, t in zip([3, 1], [0, 1], strict=True):  # only sample 0 has masks
        x, y = mk[0, s].ravel(), small[t].numpy().ravel().astype(float)
        bce += np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x))))
        p = _sigmoid(x)
        dice += 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
    expected = {"loss_class": cls / 3, "loss_bbox": l1 / 3, "loss_giou": giou / 3,
                "loss_mask": bce / 2, "loss_dice": dice / 2}
    for key, value in expected.items():
        assert losses[key].item() == pytest.approx(value, rel=1e-6), key


def test_forward_total_is_weighted_sum_over_stages():
    outputs, targets, _ = _batch(1)
    outputs["aux_outputs"] = [{k: outputs[k].clone() for k in
                               ("pred_logits", "pred_boxes", "pred_masks")}]
    outputs["interm_outputs"] = {k: outputs[k][:, :2].clone() for k in
                                 ("pred_logits", "pred_boxes", "pred_masks")}
    crit = SetCriterion(HungarianMatcher(num_points=64), num_points=64)
    losses, counts = crit(outputs, targets)
    for suffix in ("", "_0", "_interm"):
        assert {k + suffix for k in DEFAULT_WEIGHTS} <= set(losses)
    total = sum(DEFAULT_WEIGHTS[k.removesuffix("_0").removesuffix("_interm")] * v
                for k, v in losses.items() if k != "loss")
    assert losses["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    matched = sum(v for k, v in counts.items() if not k.startswith("class/"))
    assert matched == 3  # every target is matched once on the final stage
    assert counts["conditional/stuff"] + counts["learnable/stuff"] == 1


def test_box_only_samples_have_no_mask_loss_or_gradient():
    outputs, targets, _ = _batch(2)
    # keep only sample 1, the box-only one
    outputs = {k: (v[1:] if k.startswith("pred_") else v) for k, v in outputs.items()}
    masks = outputs["pred_masks"].requires_grad_(True)
    losses, _ = SetCriterion(num_points=64)(outputs, [targets[1]])
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    assert losses["loss_bbox"].item() > 0 and losses["loss_class"].item() > 0
    losses["loss"].backward()
    assert masks.grad is not None and masks.grad.abs().sum() == 0


def test_count_matches_by_type():
    query_types = torch.tensor([0, 0, 1, 1, 1])
    indices = [(torch.tensor([0, 3, 4]), torch.tensor([2, 0, 1])),
               (torch.tensor([1]), torch.tensor([0]))]
    targets = [{"is_thing": torch.tensor([True, False, True])},
               {"is_thing": torch.tensor([False])}]
    # sample 0: query 0 (cond) -> thing, query 3 (learn) -> thing, query 4 (learn) -> stuff
    assert count_matches_by_type(indices, query_types, targets) == {
        "conditional/thing": 1, "conditional/stuff": 1, "learnable/thing": 1,
        "learnable/stuff": 1}


def test_bad_targets_raise():
    outputs, targets, _ = _batch()
    targets[0]["labels"] = torch.tensor([2, 3])  # 3 texts only
    with pytest.raises(ValueError, match="target 0: labels must index its 3 texts"):
        SetCriterion(num_points=16)(outputs, targets)
    outputs, targets, _ = _batch()
    del targets[1]["is_thing"]
    with pytest.raises(ValueError, match="target 1 lacks"):
        SetCriterion(num_points=16)(outputs, targets)


def test_class_diagnostics_match_numpy():
    from model.criterion import class_diagnostics

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 4, generator=g)
    logits[1, :, 3] = float("-inf")  # sample 1 has 3 texts, the 4th slot is padding
    emb = torch.randn(3, 4, 8, generator=g)
    targets = [{"texts": list("abcd"), "labels": torch.tensor([3, 0, 1])},
               {"texts": list("abc"), "labels": torch.tensor([2])},
               {"texts": ["foreground object"], "labels": torch.tensor([0])}]  # one text: skipped
    indices = [(torch.tensor([4, 0, 2]), torch.tensor([0, 2, 1])),
               (torch.tensor([1]), torch.tensor([0])), (torch.tensor([0]), torch.tensor([0]))]
    got = class_diagnostics({"pred_logits": logits, "text_embed": emb}, targets, indices)
    correct = total = 0
    cos_sum, pairs = 0.0, 0
    for b in (0, 1):
        k = len(targets[b]["texts"])
        src, tgt = (i.numpy() for i in indices[b])
        predicted = logits[b].numpy()[src, :k].argmax(1)
        correct += int((predicted == targets[b]["labels"].numpy()[tgt]).sum())
        total += len(src)
        e = emb[b, :k].numpy().astype(np.float64)
        for i in range(k):
            for j in range(k):
                if i != j:
                    cos_sum += e[i] @ e[j] / np.linalg.norm(e[i]) / np.linalg.norm(e[j])
                    pairs += 1
    assert (got["class/correct"], got["class/total"], got["class/cosine_n"]) == (
        correct, total, pairs) == (got["class/correct"], 4, 18)
    assert got["class/cosine_sum"] == pytest.approx(cos_sum, abs=1e-4)


def test_full_mask_loss_counts_every_pixel_like_numpy():
    """full_mask=True: BCE and dice over every stride-4 pixel (no sampling), against numpy."""
    outputs, targets, small = _batch(2)
    indices = [(torch.tensor([0, 2]), torch.tensor([1, 0])), (torch.tensor([1]), torch.tensor([0]))]
    losses = SetCriterion(num_points=3, full_mask=True).stage_losses(
        outputs, targets, indices, num_boxes=3.0, num_masks=2.0)
    mk = outputs["pred_masks"].numpy()
    bce = dice = 0.0
    for s, t in zip([0, 2], [1, 0], strict=True):
        x, y = mk[0, s].ravel(), small[t].numpy().ravel().astype(float)
        bce += np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x))))
        p = _sigmoid(x)
        dice += 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
    assert losses["loss_mask"].item() == pytest.approx(bce / 2, rel=1e-6)
    assert losses["loss_dice"].item() == pytest.approx(dice / 2, rel=1e-6)
    # the default samples num_points points: with 3 of 16 pixels it is another (noisy) figure
    sampled = SetCriterion(num_points=3).stage_losses(outputs, targets, indices, 3.0, 2.0)
    assert sampled["loss_mask"].item() != pytest.approx(bce / 2, rel=1e-3)


@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("stack_limit", [None, 1])
def test_stacked_stages_score_as_each_stage_alone(softmax, stack_limit, monkeypatch):
    """forward scores the decoder stages stacked as one batch and the encoder proposals (fewer
    queries) apart, or (masks over the stacking limit) every stage apart; every stage's terms
    must equal that stage's own stage_losses. The matching and the points are deterministic here
    (no mask cost, full-mask loss), so both paths see the same matches."""
    import model.criterion

    if stack_limit is not None:
        monkeypatch.setattr(model.criterion, "STACK_ELEMENTS", stack_limit)
    outputs, targets, _ = _batch(4)
    g = torch.Generator().manual_seed(4)
    keys = ["pred_logits", "pred_boxes", "pred_masks"]
    if softmax:
        outputs["pred_noobj"] = torch.randn(2, 4, generator=g, dtype=torch.float64)
        keys.append("pred_noobj")
    noisy = [{k: outputs[k] + torch.rand(outputs[k].shape, generator=g, dtype=torch.float64) * 0.1
              for k in keys} for _ in range(2)]
    outputs["aux_outputs"] = noisy
    outputs["interm_outputs"] = {k: outputs[k][:, :3].clone() for k in keys}
    matcher = HungarianMatcher(cost_mask=0.0, cost_dice=0.0)
    crit = SetCriterion(matcher, full_mask=True)
    losses, _ = crit(outputs, targets)
    stages = [("", outputs), ("_0", noisy[0]), ("_1", noisy[1]),
              ("_interm", outputs["interm_outputs"])]
    groups = model.criterion._stackable(stages)
    assert [len(g) for g in groups] == ([3, 1] if stack_limit is None else [1, 1, 1, 1])
    for suffix, stage in stages:
        alone = crit.stage_losses(stage, targets, matcher(stage, targets), num_boxes=3.0,
                                  num_masks=2.0)
        for k, v in alone.items():
            assert losses[k + suffix].item() == pytest.approx(v.item(), rel=1e-6), k + suffix


def test_sample_matched_reads_each_match_at_its_own_points():
    """Matches of several samples, some targets matched three times (deep supervision stacks
    stages), in no order: each row is its target read at its points, as point_sample of that one
    mask would read it."""
    from model.points import point_sample, sample_matched

    g = torch.Generator().manual_seed(8)
    masks = [torch.rand(3, 12, 12, generator=g) > 0.5, torch.rand(2, 12, 12, generator=g) > 0.3]
    sample = torch.tensor([1, 0, 0, 1, 0, 0, 1])
    target = torch.tensor([1, 2, 0, 1, 2, 2, 0])
    points = torch.rand(7, 20, 2, generator=g)
    got = sample_matched(masks, sample, target, points)
    for i in range(7):
        mask = masks[int(sample[i])][int(target[i])][None]
        torch.testing.assert_close(got[i], point_sample(mask, points[i][None])[0])
