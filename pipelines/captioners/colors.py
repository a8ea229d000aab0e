"""Pixels -> a named colour, or no colour when none dominates.

Each pixel gets one name of a small palette from its HSV value (OpenCV's float conversion: hue in
degrees [0, 360), saturation and value in [0, 1]); the object's colour is the name with the most
pixels, stated only when it clearly dominates. Naming pixels one by one and counting (a histogram
over names) rather than averaging matters: the mean of a red and blue patch is purple, which neither
half is.

Rules, in the order they apply (later rules override earlier ones):
  1. hue bins: red [345, 15), orange [15, 45), yellow [45, 70), green [70, 165), blue [165, 260),
     purple [260, 290), pink [290, 345) (purple there when value < 0.6: dark magenta reads purple).
  2. lightness splits within a hue: orange that is dark (value < 0.65) or dull (saturation < 0.45
     and value < 0.85) is brown; red that is dark and not fully saturated (value < 0.5, saturation
     < 0.75) is brown, red that is light and pale (value >= 0.7, saturation < 0.5) is pink; dark
     yellow (value < 0.55, olive) gets no name, since people split it between yellow, green, brown.
  3. low-saturation pixels (chroma = max - min < 0.1, or saturation < 0.15) have no reliable hue:
     black, gray or white by value (< 0.3, < 0.85, else).
  4. very dark pixels (value < 0.2) are black whatever their hue (JPEG noise gives them any hue).
Value is first multiplied by the image's exposure gain (exposure_gain), so a dim photo's colours are
named as its viewer would see them.
"""

from __future__ import annotations

import cv2
import numpy as np

COLOR_NAMES: tuple[str, ...] = (
    "black", "white", "gray", "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown",
)  # fmt: skip
UNNAMED = -1
_IDX = {name: i for i, name in enumerate(COLOR_NAMES)}

# Hue bin upper edges (degrees) and their names; red wraps around 0.
_HUE_EDGES = np.array([15.0, 45.0, 70.0, 165.0, 260.0, 290.0, 345.0, 360.0])
_HUE_NAMES = np.array(
    [_IDX[n] for n in ("red", "orange", "yellow", "green", "blue", "purple", "pink", "red")],
    dtype=np.int8,
)
# Cap on pixels named per object: a deterministic stride subsample keeps big masks cheap (naming
# costs ~0.3 us a pixel); a fraction measured on 16k pixels is within about 1% of the full one.
MAX_PIXELS = 16_384
MAX_GAIN = 1.5


def exposure_gain(image: np.ndarray, max_gain: float = MAX_GAIN) -> float:
    """(H, W, 3) uint8 image -> the factor that brings its bright end (99th percentile of value,
    i.e. of max(R, G, B)) to 1, between 1 and `max_gain`.

    A "white patch" exposure correction: people name colours relative to the brightest things in
    view, so the orange in a dim photo is orange, not brown. The cap keeps a night scene dark.
    """
    value = subsample(image.reshape(-1, 3)).max(axis=1)
    bright = float(np.percentile(value, 99)) / 255.0 if len(value) else 1.0
    return float(np.clip(1.0 / max(bright, 1e-6), 1.0, max_gain))


def pixel_color_names(rgb: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """(K, 3) uint8 RGB pixels -> (K,) int8 indices into COLOR_NAMES, UNNAMED (-1) for no name.

    gain: exposure correction multiplying the value (brightness) before naming (exposure_gain).
    """
    if rgb.ndim != 2 or rgb.shape[1] != 3:
        raise ValueError(f"pixels must have shape (K, 3), got {rgb.shape}")
    if len(rgb) == 0:
        return np.zeros(0, dtype=np.int8)
    rgb01 = rgb.reshape(-1, 1, 3).astype(np.float32) / 255.0
    hsv = cv2.cvtColor(rgb01, cv2.COLOR_RGB2HSV).reshape(-1, 3)
    hue, sat, val = hsv[:, 0], hsv[:, 1], np.minimum(hsv[:, 2] * gain, 1.0)
    chroma = sat * val  # = max - min of R, G, B

    names = _HUE_NAMES[np.searchsorted(_HUE_EDGES, np.mod(hue, 360.0), side="right")].copy()
    is_ = {n: names == _IDX[n] for n in ("red", "orange", "yellow", "pink")}
    names[is_["pink"] & (val < 0.6)] = _IDX["purple"]
    names[is_["orange"] & ((val < 0.65) | ((sat < 0.45) & (val < 0.85)))] = _IDX["brown"]
    names[is_["red"] & (val < 0.5) & (sat < 0.75)] = _IDX["brown"]
    names[is_["red"] & (val >= 0.7) & (sat < 0.5)] = _IDX["pink"]
    names[is_["yellow"] & (val < 0.55)] = UNNAMED

    achromatic = (chroma < 0.1) | (sat < 0.15)
    gray_level = np.where(
        val < 0.3, _IDX["black"], np.where(val < 0.85, _IDX["gray"], _IDX["white"])
    )
    names[achromatic] = gray_level[achromatic]
    names[val < 0.2] = _IDX["black"]
    return names


def subsample(pixels: np.ndarray, limit: int = MAX_PIXELS) -> np.ndarray:
    """Every k-th row of (K, C) `pixels` so that at most `limit` remain (deterministic)."""
    if len(pixels) <= limit:
        return pixels
    step = -(-len(pixels) // limit)  # ceil division
    return pixels[::step]


def color_histogram(rgb: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """(K, 3) uint8 pixels -> (len(COLOR_NAMES),) float64 fraction of pixels per name.

    Unnamed pixels count in the denominator, so the fractions sum to at most 1.
    """
    names = pixel_color_names(subsample(rgb), gain)
    if len(names) == 0:
        return np.zeros(len(COLOR_NAMES))
    counts = np.bincount(names[names >= 0], minlength=len(COLOR_NAMES))
    return counts / len(names)


def dominant_color(
    rgb: np.ndarray,
    gain: float = 1.0,
    min_fraction: float = 0.4,
    min_ratio: float = 1.5,
    min_pixels: int = 20,
) -> tuple[str | None, float]:
    """(K, 3) uint8 pixels -> (colour name or None, fraction of pixels with that name).

    A colour is stated only when it covers at least `min_fraction` of the pixels AND at least
    `min_ratio` times the runner-up: a half red, half blue patch has no colour, rather than
    whichever half happened to be counted first. Fewer than `min_pixels` pixels give no colour.
    The fraction is returned even when no colour is stated (0.0 when there are no pixels).
    gain: the image's exposure correction (exposure_gain), 1.0 for none.
    """
    if len(rgb) < min_pixels:
        return None, 0.0
    hist = color_histogram(rgb, gain)
    order = np.argsort(-hist, kind="stable")
    top, runner_up = float(hist[order[0]]), float(hist[order[1]])
    if top >= min_fraction and top >= min_ratio * runner_up:
        return COLOR_NAMES[order[0]], top
    return None, top
