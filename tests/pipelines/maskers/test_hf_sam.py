"""SAM and SAM 2 through transformers (MASKERS["hf-sam"], MASKERS["sam2"]) from tiny saved folders.

The reference runs the saved model with transformers alone, one box per forward pass (encoder
included), and scores it with numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoProcessor

from pipelines.maskers import MASKERS, MaskerConfig
from tests.helpers.tiny_models import save_hf_sam, save_sam2

BOXES = np.array(
    [[10, 10, 50, 60], [0, 0, 100, 100], [30, 40, 150, 119], [70, 5, 159, 50], [5, 60, 40, 118]],
    dtype=np.float64,
)
SAVERS = {"hf-sam": save_hf_sam, "sam2": save_sam2}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_sam")
    return {name: save(root / f"tiny-{name}") for name, save in SAVERS.items()}


@pytest.fixture(scope="module")
def image():
    img = np.random.default_rng(1).integers(0, 60, (120, 160, 3), dtype=np.uint8)
    img[20:70, 30:110] = (40, 200, 40)
    return img


def masker(name, folder, **options):
    return MASKERS[name](MaskerConfig(name=name, mask_model=folder, device="cpu", **options))


def reference(name, folder, image, boxes):
    """One full forward per box with transformers alone; best of 3 by IoU; numpy stability."""
    model, processor = (
        AutoModel.from_pretrained(folder).eval(),
        AutoProcessor.from_pretrained(folder),
    )
    masks, ious, stabs = [], [], []
    for box in boxes:
        inputs = processor(images=image, input_boxes=[[box.tolist()]], return_tensors="pt")
        with torch.no_grad():
            out = model(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"])
        sizes = [inputs["original_sizes"]]
        if name == "hf-sam":
            sizes.append(inputs["reshaped_input_sizes"])
        logits = processor.post_process_masks(out.pred_masks, *sizes, binarize=False)[0][0].numpy()
        scores = out.iou_scores[0, 0].numpy()
        best = int(np.argmax(scores))
        masks.append(logits[best] > 0)
        ious.append(scores[best])
        stabs.append((logits[best] > 1).sum() / max((logits[best] > -1).sum(), 1))
    return np.stack(masks), np.array(ious), np.array(stabs)


@pytest.mark.parametrize("name", ["hf-sam", "sam2"])
def test_batched_chunked_equals_per_box_forward(folders, image, name):
    m = masker(name, folders[name], box_chunk=2)
    out = m(image, BOXES)
    masks, ious, stabs = reference(name, folders[name], image, BOXES)
    assert out.dense().shape == (5, 120, 160) and out.dense().dtype == bool
    assert (out.dense() != masks).sum() <= 5  # rounding of batched matmuls at the threshold only
    np.testing.assert_allclose(out.pred_iou, ious, atol=1e-4)
    np.testing.assert_allclose(out.stability, stabs, atol=1e-3)
    assert 0 < out.stability.max() <= 1  # the tiny models' logits are spread enough to score
    whole = masker(name, folders[name], box_chunk=64)(image, BOXES)
    assert (whole.dense() != out.dense()).sum() <= 5
    np.testing.assert_allclose(whole.pred_iou, out.pred_iou, atol=1e-5)
    assert m.origin == f"{name}:tiny-{name}" and m.uses_gpu is False


@pytest.mark.parametrize("name", ["hf-sam", "sam2"])
def test_clipping_empty_and_determinism(folders, image, name):
    m = masker(name, folders[name])
    outside = m(image, np.array([[-40.0, -10.0, 60.0, 300.0]]))
    clipped = m(image, np.array([[0.0, 0.0, 60.0, 120.0]]))
    np.testing.assert_array_equal(outside.dense(), clipped.dense())
    np.testing.assert_array_equal(
        outside.pred_iou, m(image, np.array([[0.0, 0, 60, 120]])).pred_iou
    )
    empty = m(image, np.zeros((0, 4)))
    assert empty.dense().shape == (0, 120, 160) and empty.stability.shape == (0,)


def test_single_mask_output_has_scores(folders, image):
    out = masker("sam2", folders["sam2"], multimask=False)(image, BOXES)
    assert out.dense().shape == (5, 120, 160)
    assert np.isfinite(out.pred_iou).all()


def test_wrong_family_missing_and_corrupt_folders(folders, tmp_path):
    with pytest.raises(
        ValueError, match="tiny-sam2 holds a 'sam2' model, not 'sam'; use --masker sam2"
    ):
        masker("hf-sam", folders["sam2"])
    with pytest.raises(ValueError, match="holds a 'sam' model, not 'sam2'; use --masker hf-sam"):
        masker("sam2", folders["hf-sam"])
    with pytest.raises(FileNotFoundError, match="mask model folder .*nowhere does not exist"):
        masker("sam2", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="--masker sam2 needs --mask-model DIR"):
        MASKERS["sam2"](MaskerConfig(name="sam2"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty is not a transformers model folder"):
        masker("hf-sam", tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folders["sam2"] / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="cannot load sam2 model from .*broken"):
        masker("sam2", broken)
