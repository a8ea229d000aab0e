"""The transformers image-to-text captioner (CAPTIONERS["hf"]) on tiny random BLIP and ViT-GPT2
folders. Captions of random models are gibberish: these tests check counts, scores, provenance,
batching and the crops, never the words."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from pipelines.captioners import CAPTIONERS, CaptionerConfig
from pipelines.captioners.crops import context_box, context_crops
from pipelines.captioners.hf import tidy
from tests.helpers.tiny_models import save_blip, save_vision_encoder_decoder

BOXES = np.array(
    [[10, 10, 50, 60], [0, 0, 159, 119], [30, 40, 150, 119], [70, 5, 80, 12], [5, 60, 40, 118]],
    dtype=np.float64,
)
SAVERS = {"blip": save_blip, "vit-gpt2": save_vision_encoder_decoder}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioners")
    return {name: save(root / f"tiny-{name}") for name, save in SAVERS.items()}


@pytest.fixture(scope="module")
def image():
    img = np.random.default_rng(2).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    img[20:70, 30:110] = (40, 40, 200)
    return img


def captioner(folder, **options):
    cfg = CaptionerConfig(
        name="hf", caption_model=folder, device="cpu", caption_max_tokens=6, **options
    )
    return CAPTIONERS["hf"](cfg)


@pytest.mark.parametrize("family", list(SAVERS))
def test_k_scored_unique_captions_per_object(folders, image, family):
    cap = captioner(folders[family], captions_per_object=3)
    out = cap(image, BOXES, np.zeros((5, 120, 160), bool), ["a"] * 5)
    assert len(out) == 5 and cap.uses_gpu is False
    for captions in out:
        assert 1 <= len(captions) <= 3
        texts = [c.text for c in captions]
        assert len({t.lower() for t in texts}) == len(texts)
        assert all(t == t.strip() and "  " not in t and t for t in texts)
        scores = [c.score for c in captions]
        assert all(0 < s <= 1 for s in scores) and scores == sorted(scores, reverse=True)
        assert {c.provenance for c in captions} == {f"hf:tiny-{family}"}


@pytest.mark.parametrize("family", list(SAVERS))
def test_batched_equals_one_by_one_and_deterministic(folders, image, family):
    run = {
        size: captioner(folders[family], caption_batch_size=size, captions_per_object=3)
        for size in (5, 1, 2)
    }
    batched, single, again = (run[size](image, BOXES, None, [""] * 5) for size in (5, 1, 2))
    for b, s, a in zip(batched, single, again, strict=True):
        assert [c.text for c in b] == [c.text for c in s] == [c.text for c in a]
        np.testing.assert_allclose([c.score for c in b], [c.score for c in s], rtol=1e-4)


def test_scores_are_the_models_own_sequence_probabilities(folders, image):
    """The best caption's score equals exp(mean log-prob) of its tokens, recomputed by a forward
    pass of the model on the caption's token ids."""
    folder = folders["blip"]
    out = captioner(folder, captions_per_object=2)(image, BOXES[:1], None, [""])
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    crop = context_crops(image, BOXES[:1])[0]
    pixels = processor(images=[crop], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        gen = model.generate(
            pixel_values=pixels,
            num_beams=2,
            num_return_sequences=1,
            max_new_tokens=6,
            do_sample=False,
        )
        ids = gen[0:1]
        logits = model(pixel_values=pixels, input_ids=ids).logits[0, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(1, ids[0, 1:, None])[:, 0]
    # BLIP's generate starts from [CLS] (BOS) and stops at [SEP]; the beam score averages the
    # log-probs of the generated tokens (length_penalty=1)
    expected = float(torch.exp(logp.mean()))
    assert processor.tokenizer.decode(ids[0], skip_special_tokens=True).strip() == out[0][0].text
    assert out[0][0].score == pytest.approx(expected, rel=1e-3)


def test_context_crops():
    assert context_box(np.array([10, 20, 30, 60]), 100, 100, margin=0.25) == (5, 10, 35, 70)
    assert context_box(np.array([0, 0, 100, 50]), 100, 50, margin=0.5) == (0, 0, 100, 50)
    assert context_box(np.array([99.5, 10, 100, 10.2]), 100, 50, margin=0) == (99, 10, 100, 11)
    img = np.arange(50 * 100 * 3, dtype=np.uint8).reshape(50, 100, 3)
    crop = context_crops(img, np.array([[10, 20, 30, 40]]), margin=0.1)[0]
    np.testing.assert_array_equal(crop, img[18:42, 8:32])
    with pytest.raises(ValueError, match="margin must be >= 0"):
        context_box(np.array([0, 0, 1, 1]), 10, 10, margin=-1)


def test_tidy():
    caps = tidy(
        ["  a dog ", "A  dog", "", "a cat on a mat"], [0.5, 0.9, 0.99, 0.2], "hf:x", max_chars=10
    )
    assert [(c.text, c.score) for c in caps] == [("A dog", 0.9), ("a cat on", 0.2)]


def test_errors(folders, tmp_path):
    with pytest.raises(ValueError, match="--captioner hf needs --caption-model DIR"):
        CAPTIONERS["hf"](CaptionerConfig(name="hf"))
    with pytest.raises(FileNotFoundError, match="caption model folder .*absent does not exist"):
        captioner(tmp_path / "absent")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folders["blip"] / "config.json").read_text())
    with pytest.raises(ValueError, match=r"cannot load caption model \(blip\) from .*broken"):
        captioner(broken)
