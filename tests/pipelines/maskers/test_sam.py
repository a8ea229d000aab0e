"""The segment-anything masker, loaded through MASKERS["sam"] from a tiny random checkpoint.

Reference results come from segment-anything's own SamPredictor.predict, one box at a time.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from segment_anything import SamPredictor, sam_model_registry

from pipelines.maskers import MASKERS, MaskerConfig
from pipelines.maskers.sam import SAM_VARIANTS, build_sam, load_sam, variant_of
from tests.helpers.tiny_models import save_sam_checkpoint

BOXES = np.array(
    [[10, 10, 50, 60], [0, 0, 100, 100], [30, 40, 150, 119], [70, 5, 159, 50], [5, 60, 40, 118]],
    dtype=np.float64,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_sam_checkpoint(tmp_path_factory.mktemp("sam") / "sam_tiny.pth")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 60, (120, 160, 3), dtype=np.uint8)
    img[20:70, 30:110] = (200, 40, 40)  # a red block gives the encoder some structure
    return img


def masker(checkpoint, **options):
    return MASKERS["sam"](
        MaskerConfig(
            name="sam", sam_checkpoint=checkpoint, sam_model="tiny", device="cpu", **options
        )
    )


def reference(checkpoint, image, boxes, multimask=True):
    """segment-anything's SamPredictor.predict box by box: masks, IoU, stability (numpy)."""
    predictor = SamPredictor(load_sam(checkpoint, "tiny"))
    predictor.set_image(image)
    masks, ious, stabs = [], [], []
    for box in boxes:
        logits, scores, _ = predictor.predict(
            box=box, multimask_output=multimask, return_logits=True
        )
        best = int(np.argmax(scores))
        masks.append(logits[best] > 0)
        ious.append(scores[best])
        stabs.append((logits[best] > 1).sum() / (logits[best] > -1).sum())
    return np.stack(masks), np.array(ious), np.array(stabs)


@pytest.mark.parametrize("multimask", [True, False])
def test_batched_equals_per_box_predict(checkpoint, image, multimask):
    out = masker(checkpoint, multimask=multimask)(image, BOXES)
    masks, ious, stabs = reference(checkpoint, image, BOXES, multimask)
    assert out.dense().shape == (5, 120, 160) and out.dense().dtype == bool
    # batched matmuls may round differently: allow a handful of pixels right at the threshold
    assert (out.dense() != masks).sum() <= 5
    np.testing.assert_allclose(out.pred_iou, ious, atol=1e-4)
    np.testing.assert_allclose(out.stability, stabs, atol=1e-3)
    assert out.pred_iou.dtype == np.float32 and out.stability.dtype == np.float32
    assert np.all((out.stability >= 0) & (out.stability <= 1))
    assert out.dense().any(axis=(1, 2)).all()


def test_chunking_equals_no_chunking_and_is_deterministic(checkpoint, image):
    whole = masker(checkpoint, box_chunk=64)(image, BOXES)
    chunked = masker(checkpoint, box_chunk=2)(image, BOXES)
    again = masker(checkpoint, box_chunk=2)(image, BOXES)
    assert (whole.dense() != chunked.dense()).sum() <= 5
    np.testing.assert_allclose(whole.pred_iou, chunked.pred_iou, atol=1e-5)
    np.testing.assert_array_equal(chunked.dense(), again.dense())
    np.testing.assert_array_equal(chunked.pred_iou, again.pred_iou)


def test_boxes_are_clipped_and_empty_input_is_fine(checkpoint, image):
    m = masker(checkpoint)
    outside = m(image, np.array([[-40.0, -10.0, 60.0, 300.0]]))
    clipped = m(image, np.array([[0.0, 0.0, 60.0, 120.0]]))
    np.testing.assert_array_equal(outside.dense(), clipped.dense())
    empty = m(image, np.zeros((0, 4)))
    assert empty.dense().shape == (0, 120, 160) and empty.pred_iou.shape == (0,)
    assert m.origin == "sam:tiny" and m.uses_gpu is False


def test_min_region_area_removes_small_islands_and_holes(checkpoint, image):
    raw = masker(checkpoint)(image, BOXES).dense()
    area = 200
    clean = masker(checkpoint, min_region_area=area)(image, BOXES).dense()
    eight = np.ones((3, 3), bool)
    assert (raw != clean).any()  # the random model's masks are speckled: something was removed
    for mask in clean:
        islands, n = ndi.label(mask, structure=eight)
        sizes = np.bincount(islands.ravel())[1:]
        assert n == 1 or sizes.min() >= area
        holes, _ = ndi.label(~mask, structure=eight)
        assert np.bincount(holes.ravel())[1:].min(initial=area) >= area


def test_variant_table_matches_segment_anything_builders():
    with torch.device("meta"):
        for name in ("vit_b", "vit_l", "vit_h"):
            theirs = sam_model_registry[name]().state_dict()
            ours = build_sam(SAM_VARIANTS[name]).state_dict()
            assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
            assert variant_of(theirs) == name


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth does not exist"):
        masker(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="needs --sam-checkpoint"):
        MASKERS["sam"](MaskerConfig(name="sam", sam_model="tiny"))


def test_wrong_variant(checkpoint):
    cfg = MaskerConfig(name="sam", sam_checkpoint=checkpoint, sam_model="vit_h", device="cpu")
    with pytest.raises(
        ValueError,
        match=r"sam_tiny.pth holds tiny-shaped weights "
        r"\(image_encoder.blocks: 1, embed dim 64\), not vit_h; "
        r"pass --sam-model tiny",
    ):
        MASKERS["sam"](cfg)
    with pytest.raises(ValueError, match="unknown SAM model 'vit_x'; choose one of: vit_b"):
        MASKERS["sam"](MaskerConfig(name="sam", sam_checkpoint=checkpoint, sam_model="vit_x"))


def test_corrupt_truncated_and_foreign_checkpoints(checkpoint, tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(checkpoint.read_bytes()[:100_000])
    for path in (garbage, truncated):
        with pytest.raises(ValueError, match=f"{path.name} is not a readable PyTorch checkpoint"):
            masker(path)
    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, foreign)
    with pytest.raises(ValueError, match="resnet.pth does not hold segment-anything weights"):
        masker(foreign)
    pickled = tmp_path / "pickled.pth"  # arbitrary objects are refused by weights_only=True
    torch.save({"model": object()}, pickled)
    with pytest.raises(ValueError, match="pickled.pth is not a readable PyTorch checkpoint"):
        masker(pickled)
