"""Mask sets: the bounded-memory masker/captioner contract agrees with dense arrays exactly."""

import numpy as np
import pytest

from pipelines.maskers.box import BoxMasker, box_masks
from pipelines.maskers.cleanup import resolve_overlaps
from pipelines.maskers.grabcut import resolve_overlaps_crops
from pipelines.masksets import CropMasks, RleMasks, region, stack, tight_crop
from schemas import masks as rle


def random_crops(rng, n, height, width):
    crops = []
    for _ in range(n):
        r0, c0 = int(rng.integers(0, height - 2)), int(rng.integers(0, width - 2))
        h, w = int(rng.integers(1, height - r0)), int(rng.integers(1, width - c0))
        crops.append((r0, c0, rng.random((h, w)) < 0.6))
    return CropMasks(height, width, crops)


@pytest.mark.parametrize("seed", range(3))
def test_crop_and_rle_sets_agree_with_the_dense_array(seed):
    rng = np.random.default_rng(seed)
    crops = random_crops(rng, 6, 30, 40)
    dense = stack(crops, list(range(6)))
    assert dense.shape == crops.shape == (6, 30, 40)
    encoded = RleMasks(30, 40, rle.encode(dense))
    np.testing.assert_array_equal(stack(encoded, list(range(6))), dense)
    for _ in range(20):
        r0, c0 = int(rng.integers(0, 29)), int(rng.integers(0, 39))
        rows = slice(r0, int(rng.integers(r0 + 1, 31)))
        cols = slice(c0, int(rng.integers(c0 + 1, 41)))
        i = int(rng.integers(0, 6))
        expected = dense[i, rows, cols]
        np.testing.assert_array_equal(region(crops, i, rows, cols), expected)
        np.testing.assert_array_equal(region(encoded, i, rows, cols), expected)
        np.testing.assert_array_equal(region(dense, i, rows, cols), expected)


def test_overlaps_resolved_on_crops_equal_the_dense_rule():
    rng = np.random.default_rng(7)
    crops = random_crops(rng, 8, 50, 60)
    dense = stack(crops, list(range(8)))
    np.testing.assert_array_equal(
        stack(resolve_overlaps_crops(crops), list(range(8))), resolve_overlaps(dense)
    )


def test_box_masker_crops_equal_box_masks():
    boxes = np.array([[0.0, 0.0, 5.0, 4.0], [2.4, 1.6, 9.5, 7.49], [8.0, 6.0, 10.0, 8.0]])
    out = BoxMasker()(np.zeros((8, 10, 3), np.uint8), boxes)
    np.testing.assert_array_equal(out.dense(), box_masks(8, 10, boxes))


def test_tight_crop_of_an_empty_mask():
    r0, c0, crop = tight_crop(np.zeros((4, 4), bool))
    assert crop.size == 0
    assert CropMasks(4, 4, [(r0, c0, crop)])[0].sum() == 0
