"""Colour naming: solid patches get the colour a person would name, mixed patches get none."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest

from pipelines.captioners.colors import (
    COLOR_NAMES,
    MAX_PIXELS,
    UNNAMED,
    color_histogram,
    dominant_color,
    pixel_color_names,
    subsample,
)


def patch(rgb: tuple[int, int, int], n: int = 400) -> np.ndarray:
    return np.tile(np.array(rgb, dtype=np.uint8), (n, 1))


# Well-known colours (CSS names where they exist) and the word a person would use.
SOLID = [
    ((255, 0, 0), "red"),
    ((139, 0, 0), "red"),  # dark red stays red: fully saturated
    ((220, 20, 60), "red"),  # crimson
    ((255, 165, 0), "orange"),
    ((255, 140, 0), "orange"),
    ((255, 255, 0), "yellow"),
    ((255, 215, 0), "yellow"),  # gold
    ((0, 128, 0), "green"),
    ((0, 255, 0), "green"),
    ((34, 139, 34), "green"),  # forest green
    ((0, 0, 255), "blue"),
    ((0, 0, 128), "blue"),  # navy: dark but clearly blue
    ((135, 206, 235), "blue"),  # sky blue
    ((128, 0, 128), "purple"),
    ((75, 0, 130), "purple"),  # indigo
    ((255, 192, 203), "pink"),
    ((255, 105, 180), "pink"),  # hot pink
    ((139, 69, 19), "brown"),  # saddle brown
    ((160, 82, 45), "brown"),  # sienna
    ((111, 78, 55), "brown"),  # coffee
    ((210, 180, 140), "brown"),  # tan: light but dull orange
    ((255, 255, 255), "white"),
    ((245, 245, 220), "white"),  # beige is too pale for a hue
    ((128, 128, 128), "gray"),
    ((192, 192, 192), "gray"),  # silver
    ((0, 0, 0), "black"),
    ((30, 10, 40), "black"),  # very dark: hue is noise
]


@pytest.mark.parametrize(("rgb", "name"), SOLID)
def test_solid_patch_is_named(rgb, name):
    assert dominant_color(patch(rgb)) == (name, 1.0)


def test_brown_and_orange_differ_by_lightness_at_the_same_hue():
    hue = 25 / 360  # the same orange hue, bright and dark
    bright = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.9, 0.95))
    dark = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.9, 0.45))
    assert dominant_color(patch(bright))[0] == "orange"
    assert dominant_color(patch(dark))[0] == "brown"


def test_olive_gets_no_name():
    assert pixel_color_names(patch((128, 128, 0), 1)).tolist() == [UNNAMED]
    assert dominant_color(patch((128, 128, 0))) == (None, 0.0)


@pytest.mark.parametrize(
    "parts",
    [
        [(255, 0, 0), (0, 0, 255)],  # half red, half blue
        [(255, 0, 0), (0, 128, 0), (0, 0, 255)],  # three equal thirds
        [(255, 255, 255), (0, 0, 0)],  # a checkerboard is not gray
    ],
)
def test_mixed_patch_claims_no_colour(parts):
    pixels = np.concatenate([patch(c, 300) for c in parts])
    name, fraction = dominant_color(pixels)
    assert name is None
    assert fraction == pytest.approx(1 / len(parts))


def test_random_noise_claims_no_colour():
    pixels = np.random.default_rng(0).integers(0, 256, (5000, 3), dtype=np.uint8)
    assert dominant_color(pixels)[0] is None


def test_majority_colour_is_claimed_with_its_fraction():
    pixels = np.concatenate([patch((0, 0, 255), 700), patch((255, 255, 0), 300)])
    assert dominant_color(pixels) == ("blue", pytest.approx(0.7))
    # 55 / 45 is too close to call: 55% is below 1.5 x 45%.
    close = np.concatenate([patch((0, 0, 255), 550), patch((255, 255, 0), 450)])
    assert dominant_color(close) == (None, pytest.approx(0.55))


def test_too_few_pixels_claim_no_colour():
    assert dominant_color(patch((255, 0, 0), 19)) == (None, 0.0)
    assert dominant_color(patch((255, 0, 0), 20)) == ("red", 1.0)
    assert dominant_color(np.zeros((0, 3), np.uint8)) == (None, 0.0)


def test_histogram_counts_match_numpy_and_unnamed_pixels_stay_in_the_denominator():
    pixels = np.concatenate(
        [patch((255, 0, 0), 50), patch((128, 128, 0), 30), patch((0, 0, 0), 20)]
    )
    hist = color_histogram(pixels)
    assert hist.shape == (len(COLOR_NAMES),)
    assert hist[COLOR_NAMES.index("red")] == pytest.approx(0.5)
    assert hist[COLOR_NAMES.index("black")] == pytest.approx(0.2)
    assert hist.sum() == pytest.approx(0.7)  # 30% olive has no name


def test_subsample_is_deterministic_and_keeps_fractions():
    pixels = np.concatenate([patch((255, 0, 0), 150_000), patch((0, 0, 255), 50_000)])
    rng = np.random.default_rng(1)
    pixels = pixels[rng.permutation(len(pixels))]
    small = subsample(pixels)
    assert len(small) <= MAX_PIXELS
    assert np.array_equal(small, subsample(pixels))
    true_red = np.mean(pixels[:, 0] == 255)
    assert color_histogram(pixels)[COLOR_NAMES.index("red")] == pytest.approx(true_red, abs=0.01)


def _reference_name(rgb: np.ndarray) -> int:
    """The documented rules of colors.py, one pixel at a time with the standard library's HSV."""
    r, g, b = (float(c) / 255 for c in rgb)
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    hue = h * 360
    chroma = max(r, g, b) - min(r, g, b)
    if v < 0.2:
        return COLOR_NAMES.index("black")
    if chroma < 0.1 or s < 0.15:
        return COLOR_NAMES.index("black" if v < 0.3 else "gray" if v < 0.85 else "white")
    edges = [(15, "red"), (45, "orange"), (70, "yellow"), (165, "green"), (260, "blue")]
    edges += [(290, "purple"), (345, "pink"), (361, "red")]
    name = next(n for edge, n in edges if hue < edge)
    if name == "pink" and v < 0.6:
        name = "purple"
    elif name == "orange" and (v < 0.65 or (s < 0.45 and v < 0.85)):
        name = "brown"
    elif name == "red" and v < 0.5 and s < 0.75:
        name = "brown"
    elif name == "red" and v >= 0.7 and s < 0.5:
        name = "pink"
    elif name == "yellow" and v < 0.55:
        return UNNAMED
    return COLOR_NAMES.index(name)


def test_vectorised_naming_matches_the_documented_rules_pixel_by_pixel():
    pixels = np.random.default_rng(2).integers(0, 256, (3000, 3), dtype=np.uint8)
    ours = pixel_color_names(pixels)
    reference = np.array([_reference_name(p) for p in pixels])
    # cv2 computes HSV in float32, colorsys in float64: pixels within rounding of a threshold may
    # differ; allow a handful, no more.
    assert np.mean(ours != reference) < 0.005
    assert len(set(ours.tolist())) == len(COLOR_NAMES) + 1  # every name and "unnamed" occur


def test_pixel_names_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"\(K, 3\)"):
        pixel_color_names(np.zeros((4, 4, 3), np.uint8))
