"""The full MQ-Former: output shapes, the query-type switch, text handling, backbone weights."""

import pytest
import timm
import torch

from model.backbone import Backbone
from model.build import MODEL_SIZES, build_mqformer, model_config
from model.mqformer import query_counts
from model.queries import QUERY_TYPES
from model.text import HashedBagOfWords

TEXTS = [["a photo of a cat.", "a photo of a dog."], ["the red car on the left"],
         ["sky", "a photo of a cat.", "road"]]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_mqformer("tiny", text_encoder=HashedBagOfWords(dim=24)).eval()


def _check_stage(stage, batch, n_queries, k_max, size):
    assert stage["pred_logits"].shape == (batch, n_queries, k_max)
    assert stage["pred_masks"].shape == (batch, n_queries, size // 4, size // 4)
    assert stage["pred_boxes"].shape == (batch, n_queries, 4)
    assert ((stage["pred_boxes"] >= 0) & (stage["pred_boxes"] <= 1)).all()


@pytest.mark.parametrize("batch", [1, 3])
def test_every_head_has_the_documented_shape(tiny, batch):
    images = torch.randn(batch, 3, 96, 128)
    texts = TEXTS[:batch]
    with torch.no_grad():
        out = tiny(images, texts)
    k_max = max(len(t) for t in texts)
    n_queries = tiny.num_conditional + tiny.num_learnable
    assert out["pred_masks"].shape == (batch, n_queries, 24, 32)
    assert out["pred_logits"].shape == (batch, n_queries, k_max)
    assert out["pred_boxes"].shape == (batch, n_queries, 4)
    assert len(out["aux_outputs"]) == model_config("tiny")["dec_layers"]  # initial + L-1 layers
    for stage in out["aux_outputs"]:
        assert stage["pred_logits"].shape == (batch, n_queries, k_max)
        assert stage["pred_masks"].shape == (batch, n_queries, 24, 32)
    interm = out["interm_outputs"]
    assert interm["pred_logits"].shape == (batch, tiny.num_conditional, k_max)
    assert interm["pred_masks"].shape == (batch, tiny.num_conditional, 24, 32)
    # padded text slots are -inf and flagged in text_mask; real ones are finite
    for b, sample in enumerate(texts):
        assert out["text_mask"][b].tolist() == [i < len(sample) for i in range(k_max)]
        assert torch.isfinite(out["pred_logits"][b, :, :len(sample)]).all()
        assert torch.isneginf(out["pred_logits"][b, :, len(sample):]).all()
    types = out["query_types"].tolist()
    assert types == [0] * tiny.num_conditional + [1] * tiny.num_learnable
    assert QUERY_TYPES[0] == "conditional"


def test_logits_depend_only_on_own_texts(tiny):
    """A sample's logits for a text do not change when other samples bring other texts."""
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        alone = tiny(images[:1], [["a photo of a cat."]])["pred_logits"]
        together = tiny(images, [["a photo of a cat."], ["road", "sky", "tree"]])["pred_logits"]
    torch.testing.assert_close(alone[0, :, 0], together[0, :, 0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["mixed", "learnable", "conditional"])
def test_query_switch_keeps_the_total(mode):
    cfg = model_config("tiny")
    model = build_mqformer("tiny", text_encoder=HashedBagOfWords(dim=16), queries=mode)
    total = cfg["num_learnable"] + cfg["num_conditional"]
    assert model.num_learnable + model.num_conditional == total
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64), [["a"], ["b", "c"]])
    assert out["pred_logits"].shape[1] == total
    n_cond = int((out["query_types"] == 0).sum())
    expected = {"mixed": cfg["num_conditional"], "learnable": 0, "conditional": total}[mode]
    assert n_cond == expected
    assert ("interm_outputs" in out) == (expected > 0)
    assert (model.learnable is None) == (mode == "conditional")


def test_query_counts_and_bad_mode():
    assert query_counts("mixed", 100, 300) == (100, 300)
    assert query_counts("learnable", 100, 300) == (400, 0)
    assert query_counts("conditional", 100, 300) == (0, 400)
    with pytest.raises(ValueError, match="choose one of: mixed, learnable, conditional"):
        query_counts("both", 1, 1)


def test_training_step_reaches_every_trainable_part(tiny):
    model = build_mqformer("tiny", text_encoder=HashedBagOfWords(dim=16))
    out = model(torch.randn(2, 3, 64, 64), [["a", "b"], ["c"]])
    loss = out["pred_masks"].mean() + out["pred_logits"][out["text_mask"][:, None].expand_as(
        out["pred_logits"])].mean() + out["pred_boxes"].mean()
    loss = loss + sum(v[torch.isfinite(v)].mean() for v in out["interm_outputs"].values())
    loss.backward()
    for name in ("backbone", "pixel_encoder", "text_proj", "heads", "conditional", "learnable"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name
    # the text encoder is frozen and outside the module graph
    assert not any("text_encoder" in n for n, _ in model.named_parameters())


def test_bad_inputs_raise(tiny):
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny(torch.randn(1, 3, 65, 64), [["a"]])
    with pytest.raises(ValueError, match="2 images but 1 text lists"):
        tiny(torch.randn(2, 3, 64, 64), [["a"]])
    with pytest.raises(ValueError, match="sample 0 has no texts"):
        tiny(torch.randn(1, 3, 64, 64), [[]])
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        build_mqformer("huge", text_encoder=HashedBagOfWords())
    assert set(MODEL_SIZES) == {"tiny", "small", "r50", "swin-t", "swin-l"}


def test_small_has_a_few_million_parameters_and_live_layer_scales():
    torch.manual_seed(0)
    model = build_mqformer("small", text_encoder=HashedBagOfWords(dim=24)).eval()
    n = sum(p.numel() for p in model.parameters())
    assert 2e6 < n < 6e6, n
    gammas = [p for name, p in model.backbone.named_parameters() if name.endswith("gamma")]
    # not timm's 1e-6 (issue 11)
    assert gammas and all(float(g.detach().min()) >= 0.1 for g in gammas)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 128, 128), TEXTS[:2])
    assert out["pred_masks"].shape == (2, 30, 32, 32)


def test_backbone_checkpoint_loads_real_weights(tmp_path):
    torch.manual_seed(1)
    classifier = timm.create_model("test_convnext", pretrained=False)
    path = tmp_path / "weights.pth"
    torch.save(classifier.state_dict(), path)
    backbone = Backbone("test_convnext", (0, 1, 2, 3), checkpoint=path)
    # timm's feature wrapper renames top-level modules (stem.0 -> stem_0): compare on "_" names
    loaded = {k.replace(".", "_"): v for k, v in backbone.body.state_dict().items()}
    source = {k.replace(".", "_"): v for k, v in classifier.state_dict().items()}
    matched = [k for k in loaded if k in source]
    assert len(matched) == len(loaded) > 10
    for k in matched:
        torch.testing.assert_close(loaded[k], source[k])
    random = Backbone("test_convnext", (0, 1, 2, 3))
    assert not torch.equal(random.body.state_dict()["stem_0.weight"],
                           classifier.state_dict()["stem.0.weight"])
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        Backbone("test_convnext", (0, 1, 2, 3), checkpoint=tmp_path / "missing.pth")


def test_centred_texts_ignore_what_all_of_a_samples_texts_share():
    """With center_texts a vector added to every text of a sample (a shared prompt template)
    leaves the class logits unchanged; without it the logits move."""
    from model.heads import ClassHead

    torch.manual_seed(0)
    queries, texts = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    shared = torch.randn(2, 1, 16) * 3
    centred, plain = ClassHead(16, center_texts=True), ClassHead(16)
    plain.load_state_dict(centred.state_dict())
    a, b = centred(queries, texts, mask), centred(queries, texts + shared, mask)
    torch.testing.assert_close(a[mask[:, None].expand_as(a)], b[mask[:, None].expand_as(b)])
    assert not torch.allclose(plain(queries, texts, mask)[:, :, :2],
                              plain(queries, texts + shared, mask)[:, :, :2])
    # a lone text (referring, foreground) is left as it is: centring would zero it
    one = torch.tensor([[True, False, False]] * 2)
    assert torch.isfinite(centred(queries, texts, one)[:, :, 0]).all()
    torch.testing.assert_close(centred(queries, texts, one)[:, :, 0],
                               plain(queries, texts, one)[:, :, 0])


def _added_class_input_starts_plain_and_spares_the_masks(option: str, last, first) -> None:
    """A class-head input added by `option` (a zero-initialised last layer `last(heads)`): an
    untrained model with it equals the plain model; once that layer is non-zero, the class loss
    reaches its first layer `first(heads)` but not the mask logits through it."""
    from model.heads import PredictionHeads

    torch.manual_seed(1)
    plain = build_mqformer("tiny", text_encoder=HashedBagOfWords(dim=24)).eval()
    torch.manual_seed(1)
    added = build_mqformer("tiny", text_encoder=HashedBagOfWords(dim=24), **{option: True}).eval()
    added.load_state_dict(plain.state_dict(), strict=False)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = plain(images, TEXTS[:2]), added(images, TEXTS[:2])
    for key in ("pred_logits", "pred_masks", "pred_boxes"):
        torch.testing.assert_close(a[key], b[key])

    heads = PredictionHeads(8, 6, **{option: True})
    torch.nn.init.normal_(last(heads).weight)
    queries = torch.randn(1, 3, 8, requires_grad=True)
    cls, masks = heads(queries, torch.randn(1, 2, 8), torch.ones(1, 2, dtype=torch.bool),
                       torch.randn(1, 6, 4, 5))
    masks.retain_grad()
    cls.sum().backward()
    assert first(heads).weight.grad.abs().sum() > 0
    assert masks.grad is None or masks.grad.abs().sum() == 0


def test_mask_pooling_averages_features_over_the_soft_mask_and_starts_as_the_plain_head():
    """pool_masks: the class head adds the features averaged over each query's sigmoid mask
    (numpy reference); the added Linear starts at zero, so an untrained model's outputs equal the
    plain model's; the class loss reaches the pooling Linear but not the mask logits through it."""
    import numpy as np

    from model.heads import mask_pool

    torch.manual_seed(0)
    logits, feats = torch.randn(2, 3, 4, 5), torch.randn(2, 6, 4, 5)
    w = 1 / (1 + np.exp(-logits.numpy()))
    ref = np.einsum("bqhw,bchw->bqc", w, feats.numpy()) / w.sum((2, 3))[..., None]
    np.testing.assert_allclose(mask_pool(logits, feats).numpy(), ref, rtol=1e-5, atol=1e-6)

    _added_class_input_starts_plain_and_spares_the_masks(
        "pool_masks", last=lambda heads: heads.pool, first=lambda heads: heads.pool)


def test_shape_features_crop_each_mask_to_its_extent_and_start_as_the_plain_head():
    """shape_masks: each query's sigmoid mask, cropped to the extent of its binary mask and
    resampled to 16 x 16, equals scipy's bilinear resampling of the same region, with the
    extent's log width and height; an empty mask uses the whole map. The added MLP starts at
    zero (an untrained model equals the plain one) and the class loss does not reach the masks
    through it."""
    import numpy as np
    from scipy.ndimage import map_coordinates

    from model.heads import SHAPE_GRID, shape_features

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 12, 20) * 3 - 4  # mostly background
    logits[0, 0, 2:9, 5:17] += 9.0
    logits[1, 1, 0:12, 0:4] += 9.0
    logits[1, 2] = -1.0  # empty
    got = shape_features(logits).numpy()
    assert got.shape == (2, 3, SHAPE_GRID * SHAPE_GRID + 2)
    for b in range(2):
        for q in range(3):
            binary = logits[b, q].numpy() > 0
            rows, cols = np.nonzero(binary.any(1))[0], np.nonzero(binary.any(0))[0]
            y0, y1 = (rows[0], rows[-1] + 1) if len(rows) else (0, 12)
            x0, x1 = (cols[0], cols[-1] + 1) if len(cols) else (0, 20)
            centres = (np.arange(SHAPE_GRID) + 0.5) / SHAPE_GRID
            ys, xs = np.meshgrid(y0 + centres * (y1 - y0) - 0.5, x0 + centres * (x1 - x0) - 0.5,
                                 indexing="ij")
            prob = 1 / (1 + np.exp(-logits[b, q].double().numpy()))
            ref = map_coordinates(prob, [ys, xs], order=1, mode="grid-constant", cval=0.0)
            np.testing.assert_allclose(got[b, q, :-2], ref.ravel(), atol=1e-5)
            np.testing.assert_allclose(got[b, q, -2:], np.log([(x1 - x0) / 20, (y1 - y0) / 12]),
                                       atol=1e-6)

    _added_class_input_starts_plain_and_spares_the_masks(
        "shape_masks", last=lambda heads: heads.shape.layers[-1],
        first=lambda heads: heads.shape.layers[0])
