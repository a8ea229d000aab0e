"""Matting data with alpha ground truth: folders of image + alpha, and generated soft-edge scenes.

Folder layout (the one of common matting sets; the subfolder names are arguments, e.g.
Composition-1k's test set is `merged/` + `alpha_copy/`, AIM-500 `original/` + `mask/`):

    <root>/image/<name>.jpg|.png     the images, RGB (stored pixel grid: EXIF orientation ignored,
                                     as the alpha maps are drawn on the stored pixels)
    <root>/alpha/<name>.png          one 8-bit alpha per image, same name; 0 = background,
                                     255 = foreground, between = partial coverage

`read_matting_folder` pairs them by name. An alpha without its image, an image without its alpha,
an unreadable file or a size mismatch is a ValueError / FileNotFoundError naming the file, never a
silently skipped pair.

Generated scenes (`soft_scene`): one silhouette of pipelines/scenes.py (horse, ellipse, star,
polygon) over a photo or texture background, composited as I = alpha F + (1 - alpha) B with a
feathered alpha (a Gaussian edge of sigma FEATHER px) and, if asked, a semi-transparent body. The
alpha is quantised to 8 bits *before* compositing, so the alpha PNG written by
`write_soft_scenes` is the exact ground truth of the image written beside it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

# The scene generator's own drawing functions: one silhouette/appearance model for every scene.
from pipelines.scenes import SHAPES, _background, _object_fill, _shape_mask, scene_rng

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FEATHER = (1.5, 4.0)  # sigma of the soft edge, pixels, drawn uniformly
OPACITY = (0.55, 0.9)  # body opacity of a semi-transparent object, drawn uniformly


@dataclass
class MattingSample:
    """name: the file stem; image: (H, W, 3) uint8 RGB; alpha: (H, W) float32 in [0, 1]."""

    name: str
    image: np.ndarray
    alpha: np.ndarray


# ------------------------------------------------------------------------------ folder of pairs
def _decode(path: Path, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert(mode))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"cannot decode {path}: {exc}") from None


def read_alpha(path: Path) -> np.ndarray:
    """An 8-bit alpha file -> (H, W) float32 in [0, 1]; ValueError naming an unreadable file."""
    return _decode(Path(path), "L").astype(np.float32) / 255.0


def _images_by_stem(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            if path.stem in found:
                raise ValueError(f"{folder}: two images named {path.stem!r} "
                                 f"({found[path.stem].name}, {path.name})")
            found[path.stem] = path
    return found


def read_matting_folder(root: str | Path, image_dir: str = "image",
                        alpha_dir: str = "alpha") -> Iterator[MattingSample]:
    """Pairs of <root>/<image_dir>/<name>.* and <root>/<alpha_dir>/<name>.png, sorted by name."""
    root = Path(root)
    images, alphas = root / image_dir, root / alpha_dir
    for folder in (images, alphas):
        if not folder.is_dir():
            raise FileNotFoundError(f"matting folder {folder} not found "
                                    f"(expected {image_dir}/ and {alpha_dir}/ under {root})")
    by_stem, alpha_files = _images_by_stem(images), _images_by_stem(alphas)
    if not alpha_files:
        raise ValueError(f"{alphas} holds no alpha images")
    unpaired = sorted(set(by_stem) - set(alpha_files))
    if unpaired:
        raise ValueError(f"{by_stem[unpaired[0]]} has no alpha "
                         f"{alphas / (unpaired[0] + '.png')} ({len(unpaired)} images without one)")
    for stem, alpha_path in alpha_files.items():
        if stem not in by_stem:
            raise FileNotFoundError(f"{alpha_path} has no image {stem}.* in {images}")
        image = _decode(by_stem[stem], "RGB")
        alpha = read_alpha(alpha_path)
        check_alpha_size(alpha, image, alpha_path, by_stem[stem])
        yield MattingSample(stem, image, alpha)


def check_alpha_size(alpha: np.ndarray, image: np.ndarray, alpha_path: Path,
                     image_path: Path) -> None:
    """ValueError naming both files when an alpha is not the size of its image."""
    if alpha.shape != image.shape[:2]:
        raise ValueError(f"{alpha_path} is {alpha.shape[1]}x{alpha.shape[0]} but "
                         f"{image_path} is {image.shape[1]}x{image.shape[0]}")


# --------------------------------------------------------------------------- generated scenes
def soft_scene(rng: np.random.Generator, width: int = 320, height: int = 240,
               transparent: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One object with a feathered (optionally semi-transparent) alpha over a background.

    -> image (H, W, 3) uint8 RGB, alpha (H, W) float32 in [0, 1], multiples of 1/255 (exact GT).
    """
    if width < 64 or height < 64:
        raise ValueError(f"soft scene size {width}x{height} is too small (need at least 64x64)")
    background = _background(rng, height, width).astype(np.float32)
    shape = str(SHAPES[int(rng.integers(len(SHAPES)))])
    size = int(rng.uniform(0.35, 0.7) * min(height, width))
    sil = _shape_mask(rng, shape, size)
    sh, sw = min(sil.shape[0], height), min(sil.shape[1], width)
    y0, x0 = int(rng.integers(0, height - sh + 1)), int(rng.integers(0, width - sw + 1))
    hard = np.zeros((height, width), np.float32)
    hard[y0:y0 + sh, x0:x0 + sw] = sil[:sh, :sw]
    alpha = cv2.GaussianBlur(hard, (0, 0), float(rng.uniform(*FEATHER)))
    if transparent:
        alpha *= float(rng.uniform(*OPACITY))
    alpha = np.round(np.clip(alpha, 0, 1) * 255) / 255  # 8-bit first: the PNG is then exact
    fill = np.zeros_like(background)
    fill[y0:y0 + sh, x0:x0 + sw] = _object_fill(rng, sh, sw)
    a = alpha[..., None]
    image = np.clip(np.round(a * fill + (1 - a) * background), 0, 255).astype(np.uint8)
    return image, alpha.astype(np.float32)


def soft_scenes(n: int, seed: int = 0, width: int = 320, height: int = 240,
                transparent: bool = False) -> Iterator[MattingSample]:
    """n generated scenes named scene_NNNN; scene i depends only on (seed, i)."""
    for i in range(n):
        image, alpha = soft_scene(scene_rng(seed, i), width, height, transparent)
        yield MattingSample(f"scene_{i:04d}", image, alpha)


def _write_png(path: Path, pixels: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(pixels).save(tmp, format="PNG")
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def write_soft_scenes(out_dir: str | Path, n: int, seed: int = 0, width: int = 320,
                      height: int = 240, transparent: bool = False) -> Path:
    """Write n soft scenes as <out_dir>/image/NAME.png + <out_dir>/alpha/NAME.png (the folder
    layout above, so read_matting_folder reads them back bit for bit). Returns out_dir."""
    out_dir = Path(out_dir)
    for sub in ("image", "alpha"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    for sample in soft_scenes(n, seed, width, height, transparent):
        _write_png(out_dir / "image" / f"{sample.name}.png", sample.image)
        _write_png(out_dir / "alpha" / f"{sample.name}.png",
                   np.round(sample.alpha * 255).astype(np.uint8))
    return out_dir
