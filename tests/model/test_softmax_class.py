"""class_loss "softmax" (Mask2Former's closed-set classification with a no-object class): the
option, the head's no-object logit, the loss, the matcher's class cost, the proposal ranking and
the inference conversion against numpy / torch.nn.functional references, and a tiny model trained,
reloaded, evaluated and used as a masker end to end."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.build import build_mqformer, model_config
from model.criterion import SetCriterion
from model.heads import ClassHead, inference_logits, sigmoid_logits, softmax_probs
from model.matcher import HungarianMatcher
from model.queries import proposal_scores
from model.text import HashedBagOfWords
from model.train import train
from tests.helpers.runs import synthesize_demo_scenes
from tests.model.test_train import FakeLoader, _config

EOS = 0.1


def _np_softmax(x):
    """Row softmax in float64 numpy; -inf columns get 0."""
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_unknown_class_loss_is_one_line_naming_the_valid_values():
    with pytest.raises(ValueError) as info:
        model_config("tiny", class_loss="hinge")
    message = str(info.value)
    assert "\n" not in message and "'hinge'" in message and "sigmoid, softmax" in message
    with pytest.raises(ValueError, match="class_loss"):
        build_mqformer("tiny", text_encoder=HashedBagOfWords(dim=8), class_loss="Softmax")
    assert model_config("tiny")["class_loss"] == "sigmoid"


def test_no_object_logit_is_the_scaled_cosine_with_a_learned_embedding():
    torch.manual_seed(0)
    head = ClassHead(8, no_object=True)
    queries, texts = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    logits, noobj = head.scores(queries, texts, mask)
    with torch.no_grad():
        q = head.proj(queries).numpy()
    e = head.no_object.detach().numpy()
    cos = (q @ e) / (np.linalg.norm(q, axis=-1) * np.linalg.norm(e))
    scale = float(head.scale().detach())
    np.testing.assert_allclose(noobj.detach().numpy(), scale * cos, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits, head(queries, texts, mask))  # forward keeps its contract
    assert torch.isinf(logits[1, :, 2:]).all()
    # the sigmoid head has no such parameter: its checkpoints keep their keys
    assert "no_object" not in dict(ClassHead(8).named_parameters())
    assert ClassHead(8).scores(queries, texts, mask)[1] is None


def _batch():
    """Sample 0: 3 texts, queries 3 and 1 matched; sample 1: 2 texts (slot 2 padded, -inf),
    query 0 matched; the other queries are unmatched (no-object)."""
    g = torch.Generator().manual_seed(3)
    q = 4
    logits = torch.randn(2, q, 3, generator=g, dtype=torch.float64) * 2
    logits[1, :, 2] = float("-inf")
    outputs = {"pred_logits": logits,
               "pred_noobj": torch.randn(2, q, generator=g, dtype=torch.float64) * 2,
               "pred_boxes": torch.rand(2, q, 4, generator=g, dtype=torch.float64) * 0.4 + 0.2,
               "pred_masks": torch.randn(2, q, 4, 4, generator=g, dtype=torch.float64)}
    targets = [
        {"texts": ["a", "b", "c"], "labels": torch.tensor([2, 0]),
         "boxes": torch.rand(2, 4, generator=g, dtype=torch.float64) * 0.4 + 0.2,
         "masks": torch.zeros(2, 16, 16, dtype=torch.bool), "has_masks": False,
         "is_thing": torch.tensor([True, True]), "task": "instance"},
        {"texts": ["d", "e"], "labels": torch.tensor([1]),
         "boxes": torch.rand(1, 4, generator=g, dtype=torch.float64) * 0.4 + 0.2,
         "masks": torch.zeros(1, 16, 16, dtype=torch.bool), "has_masks": False,
         "is_thing": torch.tensor([True]), "task": "instance"},
    ]
    indices = [(torch.tensor([3, 1]), torch.tensor([0, 1])), (torch.tensor([0]), torch.tensor([0]))]
    return outputs, targets, indices


def test_softmax_class_loss_equals_weighted_cross_entropy():
    outputs, targets, indices = _batch()
    losses = SetCriterion(eos_coef=EOS).stage_losses(outputs, targets, indices, num_boxes=3.0,
                                                     num_masks=1.0)
    # one batched F.cross_entropy over [K_max texts, no-object], as Mask2Former computes it: the
    # padded slot is -inf, so its probability is 0 and the weight vector [1] * K + [0.1] serves
    # both samples
    k_max = 3
    scores = torch.cat([outputs["pred_logits"], outputs["pred_noobj"][..., None]], -1)
    classes = torch.full((2, 4), k_max)
    classes[0, 3], classes[0, 1], classes[1, 0] = 2, 0, 1
    weight = torch.tensor([1.0] * k_max + [EOS], dtype=torch.float64)
    expected = F.cross_entropy(scores.reshape(-1, k_max + 1), classes.reshape(-1), weight)
    assert float(losses["loss_class"]) == pytest.approx(float(expected), rel=1e-6)

    # and by hand in numpy, slot by slot (the no-object column is the sample's last)
    total = weights = 0.0
    for b, (src, tgt) in enumerate(indices):
        k = len(targets[b]["texts"])
        row = np.concatenate([outputs["pred_logits"][b, :, :k].numpy(),
                              outputs["pred_noobj"][b, :, None].numpy()], -1)
        p = _np_softmax(row)
        target = np.full(4, k)
        target[src.numpy()] = targets[b]["labels"].numpy()[tgt.numpy()]
        w = np.where(target == k, EOS, 1.0)
        total += (w * -np.log(p[np.arange(4), target])).sum()
        weights += w.sum()
    assert float(losses["loss_class"]) == pytest.approx(total / weights, rel=1e-6)

    # eos_coef is the criterion's: at weight 1 the unmatched queries weigh more
    ones = SetCriterion(eos_coef=1.0).stage_losses(outputs, targets, indices, 3.0, 1.0)
    assert float(ones["loss_class"]) != pytest.approx(float(losses["loss_class"]), rel=1e-3)


def test_softmax_class_loss_reaches_every_stage_and_the_dn_queries():
    torch.manual_seed(0)
    model = build_mqformer("tiny", text_encoder=HashedBagOfWords(dim=24), class_loss="softmax",
                           dn_groups=2).train()
    texts = [["a photo of a cat.", "a photo of a dog."], ["sky"]]
    targets = [{"texts": texts[b], "labels": torch.tensor(labels),
                "boxes": torch.tensor([[0.4, 0.4, 0.3, 0.3]] * len(labels)),
                "masks": torch.zeros(len(labels), 64, 64, dtype=torch.bool), "has_masks": True,
                "is_thing": torch.ones(len(labels), dtype=torch.bool), "task": "instance"}
               for b, labels in enumerate([[1, 0], [0]])]
    out = model(torch.randn(2, 3, 64, 64), texts, targets)
    stages = [out, *out["aux_outputs"], out["interm_outputs"], out["dn_outputs"]]
    for stage in stages:
        assert stage["pred_noobj"].shape == stage["pred_logits"].shape[:2]
    losses, counts = SetCriterion(num_points=64)(out, targets)
    criterion = SetCriterion(num_points=64)
    dn = criterion.stage_losses(out["dn_outputs"], targets,
                                [(torch.tensor([0, 1]), torch.tensor([0, 1])),
                                 (torch.tensor([0]), torch.tensor([0]))], 1.0, 1.0)
    # the DN stage's class loss is the softmax one: it does not scale with num_boxes
    again = criterion.stage_losses(out["dn_outputs"], targets,
                                   [(torch.tensor([0, 1]), torch.tensor([0, 1])),
                                    (torch.tensor([0]), torch.tensor([0]))], 7.0, 1.0)
    assert dn["loss_class"].item() == pytest.approx(again["loss_class"].item())
    assert {"loss_class_interm", "loss_class_dn", "loss_class_0"} <= set(losses)
    losses["loss"].backward()
    assert model.heads.cls.no_object.grad.abs().sum() > 0
    assert counts["class/total"] >= 2  # the class diagnostics still count matched queries


def test_matcher_class_cost_is_minus_the_softmax_probability():
    outputs, targets, _ = _batch()
    matcher = HungarianMatcher(cost_class=1.0, cost_bbox=0.0, cost_giou=0.0)
    target = targets[0]
    cost = matcher.cost_matrix(outputs["pred_logits"][0], outputs["pred_boxes"][0], None, target,
                               noobj=outputs["pred_noobj"][0])
    row = np.concatenate([outputs["pred_logits"][0].numpy(),
                          outputs["pred_noobj"][0, :, None].numpy()], -1)
    expected = -_np_softmax(row)[:, target["labels"].numpy()]
    np.testing.assert_allclose(cost.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_matcher_with_no_object_prefers_the_query_that_is_not_background():
    """Two queries with the same box: query 0 has the higher text logit but an even higher
    no-object logit, query 1 a lower text logit and a low no-object logit. The focal cost (text
    logit alone) picks query 0, the softmax cost query 1."""
    logits = torch.tensor([[[6.0, -2.0], [3.0, -2.0]]])
    box = [0.5, 0.5, 0.2, 0.2]
    outputs = {"pred_logits": logits, "pred_boxes": torch.tensor([[box, box]]),
               "pred_masks": torch.zeros(1, 2, 4, 4)}
    target = {"texts": ["a", "b"], "labels": torch.tensor([0]), "boxes": torch.tensor([box]),
              "masks": torch.zeros(1, 16, 16, dtype=torch.bool), "has_masks": False,
              "is_thing": torch.tensor([True])}
    (rows, _), = HungarianMatcher()(outputs, [target])
    assert rows.tolist() == [0]
    (rows, _), = HungarianMatcher()(dict(outputs, pred_noobj=torch.tensor([[9.0, -3.0]])),
                                    [target])
    assert rows.tolist() == [1]


def test_sigmoid_of_the_converted_logits_is_the_softmax_probability():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 4, generator=g) * 4
    logits[0, 0, 0] = 30.0  # a confident query: 1 - p rounds to 0 in float32
    logits[1, :, 3] = float("-inf")  # a padded text slot
    noobj = torch.randn(2, 5, generator=g) * 4
    converted = sigmoid_logits(logits, noobj)
    expected = _np_softmax(np.concatenate([logits.numpy(), noobj[..., None].numpy()], -1))
    np.testing.assert_allclose(converted.sigmoid().numpy(), expected[..., :-1], atol=2e-6)
    np.testing.assert_allclose(softmax_probs(logits, noobj).numpy(), expected[..., :-1],
                               atol=1e-6)
    assert torch.isneginf(converted[1, :, 3]).all()
    # tiny probabilities keep their order (log p from log_softmax, not log of a clamped p)
    small = sigmoid_logits(torch.tensor([[-40.0, -45.0]]), torch.tensor([0.0]))
    assert small[0, 0] > small[0, 1] and torch.isfinite(small).all()
    # the outputs dict: converted with pred_noobj, left alone without it
    assert torch.equal(inference_logits({"pred_logits": logits, "pred_noobj": noobj}), converted)
    assert inference_logits({"pred_logits": logits}) is logits


def test_batch_postprocess_reads_the_converted_logits():
    from model.postprocess import postprocess, referring_inference

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 4, 2, generator=g) * 3
    noobj = torch.tensor([[5.0, -5.0, 0.0, 0.0]])
    masks, boxes = torch.randn(1, 4, 2, 2, generator=g), torch.rand(1, 4, 4, generator=g)
    outputs = {"pred_logits": logits, "pred_noobj": noobj, "pred_masks": masks,
               "pred_boxes": boxes, "text_mask": torch.ones(1, 2, dtype=torch.bool)}
    result, = postprocess(outputs, ["referring"], (8, 8))
    expected = referring_inference(sigmoid_logits(logits, noobj)[0], masks[0], boxes[0], (8, 8))
    raw = referring_inference(logits[0], masks[0], boxes[0], (8, 8))
    np.testing.assert_allclose(np.asarray(result["scores"]), np.asarray(expected["scores"]))
    assert not np.allclose(np.asarray(result["scores"]), np.asarray(raw["scores"]))


def test_proposals_rank_by_the_softmax_probability_of_their_best_text():
    """Token 0 has the highest text logit but is mostly no-object; token 1 wins on probability."""
    logits = torch.tensor([[[5.0, 0.0], [3.0, 0.0], [-1.0, -1.0]]])
    noobj = torch.tensor([[8.0, 0.0, 0.0]])
    assert proposal_scores(logits, None).argmax(-1).item() == 0
    scores = proposal_scores(logits, noobj)
    assert scores.argmax(-1).item() == 1
    expected = _np_softmax(np.concatenate([logits[0].numpy(), noobj[0, :, None].numpy()], -1))
    np.testing.assert_allclose(scores[0].numpy(), expected[:, :-1].max(-1), rtol=1e-6)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return synthesize_demo_scenes(tmp_path_factory.mktemp("scenes") / "gt", limit=3)


def test_softmax_model_trains_reloads_evaluates_and_masks(tmp_path, scenes):
    from model.inference import EvalConfig, evaluate_checkpoint, load_trained, run_model
    from model.predict import predict_sample
    from pipelines.maskers.mqformer import build_mqformer_masker

    options = {"class_loss": "softmax"}
    path = train(_config(tmp_path, max_iters=3, model_options=options), FakeLoader())
    state, model = load_trained(path)
    assert state["model_config"]["class_loss"] == "softmax"
    assert model.class_loss == "softmax"
    assert torch.equal(model.heads.cls.no_object, state["model"]["heads.cls.no_object"])

    # run_model hands on logits whose sigmoid is the softmax probability, and no pred_noobj
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    texts = ["a photo of a box.", "a photo of a bar."]
    sample = predict_sample(pixels, texts, 64)
    _, output = next(run_model(model, [sample], "cpu", 1))
    assert "pred_noobj" not in output
    with torch.no_grad():
        raw = model(sample["image"][None], [texts])
    np.testing.assert_allclose(output["pred_logits"].sigmoid().numpy(),
                               softmax_probs(raw["pred_logits"], raw["pred_noobj"])[0].numpy(),
                               atol=1e-6)

    result = evaluate_checkpoint(EvalConfig(path, scenes, "instance", image_size=64,
                                            device="cpu"))
    assert result["images"] > 0 and 0.0 <= result["metrics"]["mask_AP"] <= 1.0

    masker = build_mqformer_masker(path, device="cpu")
    masks = masker(pixels, np.array([[10.0, 10.0, 50.0, 40.0]]))
    assert len(masks.pred_iou) == 1

    # resuming it as a sigmoid model is refused by the model-options check
    with pytest.raises(ValueError, match="model options"):
        train(_config(tmp_path, max_iters=4, resume=True), FakeLoader())
