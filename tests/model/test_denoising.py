"""Mask DINO's denoising queries: no leakage into the matching queries, one-to-one DN targets,
their losses, and an exact resume with them on."""

import json

import numpy as np
import pytest
import torch

from model.build import build_mqformer
from model.criterion import SetCriterion
from model.denoising import dn_attn_mask, dn_indices
from model.text import HashedBagOfWords
from model.train import train
from tests.model.test_train import FakeLoader, _config

TEXTS = [["a photo of a cat.", "a photo of a dog."], ["sky", "a photo of a cat.", "road"]]


def _targets():
    return [
        {"texts": TEXTS[0], "labels": torch.tensor([1, 0, 1]),
         "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4],
                                [0.5, 0.7, 0.1, 0.2]]),
         "masks": torch.zeros(3, 64, 64, dtype=torch.bool), "has_masks": True,
         "is_thing": torch.ones(3, dtype=torch.bool), "task": "instance"},
        {"texts": TEXTS[1], "labels": torch.tensor([2]),
         "boxes": torch.tensor([[0.5, 0.5, 0.8, 0.6]]),
         "masks": torch.zeros(1, 64, 64, dtype=torch.bool), "has_masks": True,
         "is_thing": torch.ones(1, dtype=torch.bool), "task": "instance"},
    ]


def _model(**kw):
    torch.manual_seed(0)
    return build_mqformer("tiny", text_encoder=HashedBagOfWords(dim=24), dn_groups=2, **kw).train()


def test_attention_mask_blocks_matching_queries_from_dn_and_groups_from_each_other():
    mask = dn_attn_mask(num_matching=3, groups=2, per_group=2)
    expected = np.zeros((7, 7), bool)
    expected[:3, 3:] = True  # matching rows never see a DN column
    expected[3:5, 5:7] = True  # group 0 does not see group 1
    expected[5:7, 3:5] = True  # and back
    np.testing.assert_array_equal(mask.numpy(), expected)


def test_matching_outputs_are_the_same_with_and_without_dn_queries():
    """If any DN query leaked into a matching query (self-attention or C<->L attention), the
    matching predictions would change when DN queries are added."""
    for joint in (True, False):
        model = _model(joint_self_attn=joint)
        images = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            plain = model(images, TEXTS)
            with_dn = model(images, TEXTS, _targets())
        assert "dn_outputs" not in plain and "dn_outputs" in with_dn
        for key in ("pred_logits", "pred_masks", "pred_boxes"):
            torch.testing.assert_close(with_dn[key], plain[key], rtol=0, atol=1e-5)
            for a, b in zip(with_dn["aux_outputs"], plain["aux_outputs"], strict=True):
                torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
        # and the DN queries do depend on their targets: another box gives another prediction
        moved = _targets()
        moved[0]["boxes"][0] = torch.tensor([0.8, 0.2, 0.1, 0.1])
        with torch.no_grad():
            other = model(images, TEXTS, moved)
        assert not torch.allclose(other["dn_outputs"]["pred_boxes"],
                                  with_dn["dn_outputs"]["pred_boxes"])


def test_dn_queries_are_noised_copies_of_their_own_target_one_to_one():
    model = _model(dn_label_noise=0.0, dn_box_noise=0.0)
    targets = _targets()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64), TEXTS, targets)
    groups, m = out["dn_groups"], out["dn_per_group"]
    assert (groups, m) == (2, 3)  # per group: the batch's most targets
    first = out["aux_outputs"][0]["dn_outputs"]["pred_boxes"]  # predicted from the initial queries
    for b, (src, tgt) in enumerate(dn_indices(targets, groups, m)):
        n = len(targets[b]["labels"])
        assert sorted(tgt.tolist()) == sorted(list(range(n)) * groups)  # each target G times
        assert len(set(src.tolist())) == len(src)  # each DN query at most once
        assert src.tolist() == [g * m + j for g in range(groups) for j in range(n)]
        # without noise a DN query starts from exactly the box of the target it is paired with
        torch.testing.assert_close(first[b, src], targets[b]["boxes"][tgt], rtol=0, atol=1e-6)


def test_dn_box_loss_is_the_l1_of_the_one_to_one_pairs():
    """loss_bbox_dn against an independent numpy L1 over the (g * m + j, j) pairs."""
    targets = _targets()
    groups, m, k = 2, 3, 3
    torch.manual_seed(1)
    dn_boxes = torch.rand(2, groups * m, 4) * 0.5 + 0.25

    def stage(q):
        return {"pred_logits": torch.randn(2, q, k), "pred_boxes": torch.rand(2, q, 4) * 0.5 + 0.2,
                "pred_masks": torch.randn(2, q, 16, 16)}

    outputs = dict(stage(5), query_types=torch.zeros(5, dtype=torch.long), text_embed=None,
                   dn_groups=groups, dn_per_group=m)
    outputs["dn_outputs"] = dict(stage(groups * m), pred_boxes=dn_boxes)
    targets[1]["texts"] = TEXTS[1]
    losses, _ = SetCriterion(num_points=64)(outputs, targets)
    expected = 0.0
    for b, t in enumerate(targets):
        for g in range(groups):
            for j in range(len(t["labels"])):
                expected += np.abs(dn_boxes[b, g * m + j].numpy() - t["boxes"][j].numpy()).sum()
    expected /= groups * sum(len(t["labels"]) for t in targets)
    assert abs(float(losses["loss_bbox_dn"]) - expected) < 1e-5
    assert "loss_mask_dn" in losses and "loss_class_dn" in losses


def test_dn_loss_reaches_the_label_encoder_and_no_dn_loss_without_targets():
    model = _model()
    images = torch.randn(2, 3, 64, 64)
    losses, _ = SetCriterion(num_points=64)(model(images, TEXTS, _targets()), _targets())
    losses["loss"].backward()
    assert model.denoising.label_enc.weight.grad.abs().sum() > 0
    plain, _ = SetCriterion(num_points=64)(model(images, TEXTS), _targets())
    assert not any("_dn" in k for k in plain)
    model.eval()  # evaluation never builds DN queries, even when handed targets
    with torch.no_grad():
        assert "dn_outputs" not in model(images, TEXTS, _targets())


def test_training_with_dn_resumes_exactly(tmp_path):
    options = {"dn_groups": 2}
    straight = torch.load(train(_config(tmp_path / "a", model_options=options), FakeLoader()),
                          weights_only=True)
    assert straight["model_config"]["dn_groups"] == 2
    try:
        train(_config(tmp_path / "b", model_options=options), FakeLoader(stop_after=3))
    except KeyboardInterrupt:
        pass
    resumed = torch.load(train(_config(tmp_path / "b", resume=True, model_options=options),
                               FakeLoader()), weights_only=True)
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    rows_a = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").open()]
    rows_b = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").open()]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]


def test_resume_with_other_model_options_is_refused(tmp_path):
    train(_config(tmp_path, max_iters=2, model_options={"dn_groups": 2}), FakeLoader())
    with pytest.raises(ValueError, match="model options"):
        train(_config(tmp_path, max_iters=4, resume=True), FakeLoader())
