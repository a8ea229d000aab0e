"""Florence-2 region captions (CAPTIONERS["florence2"]) on a tiny random Florence-2 folder.

The reference is transformers' plain path: Florence2Processor(text=prompt, images=image) +
generate, one box at a time, which re-encodes the image for every box."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, Florence2ForConditionalGeneration

from pipelines.captioners import CAPTIONERS, CaptionerConfig
from pipelines.captioners.florence2 import location_tokens
from tests.helpers.tiny_models import save_blip, save_florence2

BOXES = np.array([[10, 10, 50, 60], [0, 0, 160, 120], [30, 40, 150, 119]], dtype=np.float64)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_florence2(tmp_path_factory.mktemp("florence2") / "tiny-florence2")


@pytest.fixture(scope="module")
def image():
    img = np.random.default_rng(3).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    img[20:70, 30:110] = (200, 200, 40)
    return img


def captioner(folder, **options):
    cfg = CaptionerConfig(
        name="florence2",
        caption_model=folder,
        device="cpu",
        caption_max_tokens=6,
        captions_per_object=3,
        **options,
    )
    return CAPTIONERS["florence2"](cfg)


def test_location_tokens_quantise_to_1000_bins():
    # floor(x / W * 1000): 10/160 -> 62.5 -> 62; 60/120 -> 500; the far edge stays in bin 999
    assert (
        location_tokens(np.array([10, 10, 50, 60]), 160, 120)
        == "<loc_62><loc_83><loc_312><loc_500>"
    )
    assert (
        location_tokens(np.array([0, 0, 160, 120]), 160, 120) == "<loc_0><loc_0><loc_999><loc_999>"
    )


def test_shared_image_features_equal_the_plain_per_box_path(folder, image):
    out = captioner(folder, caption_batch_size=2)(image, BOXES, None, [""] * 3)
    model = Florence2ForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert len(out) == 3
    for box, captions in zip(BOXES, out, strict=True):
        prompt = "<REGION_TO_DESCRIPTION>" + location_tokens(box, 160, 120)
        inputs = processor(text=[prompt], images=[image], return_tensors="pt")
        with torch.no_grad():
            ref = model.generate(
                **inputs,
                num_beams=3,
                num_return_sequences=3,
                max_new_tokens=6,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
        texts = [t.strip() for t in processor.batch_decode(ref.sequences, skip_special_tokens=True)]
        best = int(torch.argmax(ref.sequences_scores))
        assert captions[0].text == " ".join(texts[best].split())
        assert captions[0].score == pytest.approx(float(ref.sequences_scores[best].exp()), rel=1e-4)
        assert 1 <= len(captions) <= 3
        assert {c.provenance for c in captions} == {"florence2:tiny-florence2"}
        assert all(0 < c.score <= 1 for c in captions)


def test_prompt_matters_and_runs_are_deterministic(folder, image):
    cap = captioner(folder)
    a = cap(image, BOXES, None, [""] * 3)
    b = cap(image, BOXES, None, [""] * 3)
    assert [[c.text for c in x] for x in a] == [[c.text for c in x] for x in b]
    # different boxes give different prompts: the beams' scores differ
    assert a[0][0].score != a[1][0].score
    assert cap(image, np.zeros((0, 4)), None, []) == []


def test_errors(folder, tmp_path):
    blip = save_blip(tmp_path / "blip")
    with pytest.raises(
        ValueError, match="holds a 'blip' model, not Florence-2; use --captioner hf"
    ):
        captioner(blip)
    with pytest.raises(ValueError, match="holds a Florence-2 model; use --captioner florence2"):
        CAPTIONERS["hf"](CaptionerConfig(name="hf", caption_model=folder))
    with pytest.raises(ValueError, match="--captioner florence2 needs --caption-model DIR"):
        CAPTIONERS["florence2"](CaptionerConfig(name="florence2"))
