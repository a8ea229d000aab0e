"""Hungarian matcher against a brute-force search with costs computed independently in numpy."""

import itertools

import numpy as np
import pytest
import torch

from model.box_ops import giou_cxcywh
from model.matcher import HungarianMatcher, TargetBatch
from tests.helpers.model_reference import giou as _giou
from tests.helpers.model_reference import pixel_centres as _centres
from tests.helpers.model_reference import sigmoid as _sigmoid


def _numpy_cost(logits, boxes, masks, tgt_labels, tgt_boxes, tgt_masks, with_masks):
    """Mask DINO cost by hand. masks (Q, h, w) logits; tgt_masks (M, h, w) in {0, 1} at the same
    grid (the test samples at pixel centres of blocks where the target is constant)."""
    q, m = logits.shape[0], len(tgt_labels)
    cost = np.zeros((q, m))
    alpha, gamma = 0.25, 2.0
    for i in range(q):
        for j in range(m):
            p = _sigmoid(logits[i, tgt_labels[j]])
            pos = alpha * (1 - p) ** gamma * -np.log(p)
            neg = (1 - alpha) * p**gamma * -np.log(1 - p)
            c = 4 * (pos - neg)
            c += 5 * np.abs(boxes[i] - tgt_boxes[j]).sum() - 2 * _giou(boxes[i], tgt_boxes[j])
            if with_masks:
                x, t = masks[i].ravel(), tgt_masks[j].ravel()
                bce = np.mean(np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x))))
                s = _sigmoid(x)
                dice = 1 - (2 * (s * t).sum() + 1) / (s.sum() + t.sum() + 1)
                c += 5 * bce + 5 * dice
            cost[i, j] = c
    return cost


def _brute_force(cost):
    """Minimum-cost injective assignment of targets (columns) to queries (rows)."""
    q, m = cost.shape
    best, best_rows = np.inf, None
    for rows in itertools.permutations(range(q), m):
        total = sum(cost[r, c] for c, r in enumerate(rows))
        if total < best:
            best, best_rows = total, rows
    return best, best_rows


def _case(seed, q=5, m=3, k=4, h=4, w=4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(q, k, generator=g) * 2
    boxes = torch.rand(q, 4, generator=g) * 0.4 + 0.2
    masks = torch.randn(q, h, w, generator=g) * 3
    labels = torch.randint(0, k, (m,), generator=g)
    tgt_boxes = torch.rand(m, 4, generator=g) * 0.4 + 0.2
    small = torch.rand(m, h, w, generator=g) > 0.5
    # targets at 4x the prediction resolution, constant on 4x4 blocks
    tgt_masks = small.repeat_interleave(4, 1).repeat_interleave(4, 2)
    target = {"texts": [f"t{i}" for i in range(k)], "labels": labels, "boxes": tgt_boxes,
              "masks": tgt_masks, "has_masks": True, "is_thing": torch.ones(m, dtype=torch.bool)}
    return logits, boxes, masks, target, small


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_masks", [True, False])
def test_cost_matrix_and_assignment_match_brute_force(seed, with_masks):
    logits, boxes, masks, target, small = _case(seed)
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(logits.double(), boxes.double(),
                               masks.double() if with_masks else None, target,
                               points=_centres(4, 4))
    expected = _numpy_cost(logits.double().numpy(), boxes.double().numpy(),
                           masks.double().numpy(), target["labels"].numpy(),
                           target["boxes"].double().numpy(), small.double().numpy(), with_masks)
    np.testing.assert_allclose(cost.numpy(), expected, rtol=1e-5, atol=1e-5)

    # forward draws random points; with the same seed the same points give the cost it solved
    target["has_masks"] = with_masks
    outputs = {"pred_logits": logits[None], "pred_boxes": boxes[None], "pred_masks": masks[None]}
    torch.manual_seed(seed)
    (rows, cols), = matcher(outputs, [target])
    torch.manual_seed(seed)
    points = torch.rand(matcher.num_points, 2)
    sampled_cost = matcher.cost_matrix(logits, boxes, masks if with_masks else None, target,
                                       points=points).double().numpy()
    best, best_rows = _brute_force(sampled_cost)
    assigned = dict(zip(cols.tolist(), rows.tolist(), strict=True))
    assert tuple(assigned[c] for c in range(len(target["labels"]))) == best_rows


def test_exact_assignment_without_masks_and_more_queries():
    logits, boxes, masks, target, _ = _case(7, q=6, m=4)
    target["has_masks"] = False
    expected = _numpy_cost(logits.double().numpy(), boxes.double().numpy(), None,
                           target["labels"].numpy(), target["boxes"].double().numpy(), None, False)
    outputs = {"pred_logits": logits[None], "pred_boxes": boxes[None], "pred_masks": masks[None]}
    (rows, cols), = HungarianMatcher()(outputs, [target])
    _, best_rows = _brute_force(expected)
    assigned = dict(zip(cols.tolist(), rows.tolist(), strict=True))
    assert tuple(assigned[c] for c in range(4)) == best_rows


def test_empty_targets_and_padded_texts():
    logits, boxes, masks, target, _ = _case(3)
    empty = dict(target, labels=torch.zeros(0, dtype=torch.long), boxes=torch.zeros(0, 4),
                 masks=torch.zeros(0, 16, 16, dtype=torch.bool),
                 is_thing=torch.zeros(0, dtype=torch.bool), texts=["x"])
    padded = torch.cat([logits, torch.full((5, 2), float("-inf"))], 1)  # 2 padded text slots
    outputs = {"pred_logits": torch.stack([padded, padded]),
               "pred_boxes": torch.stack([boxes, boxes]), "pred_masks": torch.stack([masks, masks])}
    result = HungarianMatcher(num_points=256)(outputs, [target, empty])
    assert len(result[0][0]) == 3 and len(result[1][0]) == 0


def _stacked_case(softmax: bool):
    """Two stages of three samples stacked as six items: sample 0 with 3 masked targets, sample 1
    box-only with 2 targets and fewer texts (padded slots -inf), sample 2 without targets."""
    g = torch.Generator().manual_seed(11)
    q, k = 5, 4
    cases = [_case(s, q=q, m=m, k=k) for s, m in ((1, 3), (2, 2), (3, 1))]
    targets = [case[3] for case in cases]
    targets[1] = dict(targets[1], has_masks=False, texts=targets[1]["texts"][:3],
                      labels=targets[1]["labels"].clamp(max=2))
    targets[2] = dict(targets[2], labels=torch.zeros(0, dtype=torch.long),
                      boxes=torch.zeros(0, 4), masks=torch.zeros(0, 16, 16, dtype=torch.bool),
                      is_thing=torch.zeros(0, dtype=torch.bool))
    logits = torch.stack([case[0] for case in cases] * 2) + torch.randn(6, q, k, generator=g)
    logits[[1, 4], :, 3] = float("-inf")
    outputs = {"pred_logits": logits,
               "pred_boxes": torch.stack([case[1] for case in cases] * 2),
               "pred_masks": torch.randn(6, q, 4, 4, generator=g) * 3}
    if softmax:
        outputs["pred_noobj"] = torch.randn(6, q, generator=g)
    return outputs, targets


@pytest.mark.parametrize("softmax", [False, True])
def test_batched_cost_of_stacked_items_is_each_items_cost(softmax):
    outputs, targets = _stacked_case(softmax)
    matcher = HungarianMatcher()
    batch = TargetBatch.from_targets(targets, torch.device("cpu"))
    sample_of = torch.tensor([0, 1, 2, 0, 1, 2])
    points = torch.rand(3, 64, 2, generator=torch.Generator().manual_seed(5))
    cost = matcher.batched_cost(outputs, batch, sample_of, points)
    assert cost.shape == (6, 5, 3)
    for n, b in enumerate(sample_of.tolist()):
        k, m, target = len(targets[b]["texts"]), len(targets[b]["labels"]), targets[b]
        noobj = outputs["pred_noobj"][n] if softmax else None
        masks = outputs["pred_masks"][n] if target["has_masks"] else None
        expected = matcher.cost_matrix(outputs["pred_logits"][n, :, :k], outputs["pred_boxes"][n],
                                       masks, target, points=points[b], noobj=noobj)
        torch.testing.assert_close(cost[n, :, :m], expected, rtol=1e-5, atol=1e-5)
    indices = matcher.match(outputs, batch, sample_of)
    assert [len(rows) for rows, _ in indices] == [3, 2, 0, 3, 2, 0]


def test_giou_of_a_batch_is_torchvisions_per_item():
    from torchvision.ops import box_convert, generalized_box_iou

    g = torch.Generator().manual_seed(2)
    a = torch.rand(3, 5, 4, generator=g, dtype=torch.float64) * 0.5 + 0.1
    b = torch.rand(3, 2, 4, generator=g, dtype=torch.float64) * 0.5 + 0.1
    got = giou_cxcywh(a, b)
    for n in range(3):
        expected = generalized_box_iou(box_convert(a[n], "cxcywh", "xyxy"),
                                       box_convert(b[n], "cxcywh", "xyxy"))
        torch.testing.assert_close(got[n], expected)
