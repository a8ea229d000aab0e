"""Generated scenes with exact ground-truth masks: object silhouettes pasted onto real backgrounds.

Box-prompted maskers are measured on these (bench/mask_quality.py): the boxes go in, the masks that
come out are compared with the pixels each object really covers. A scene is built by

1. a background: a random crop of one of the bundled demo photos (or a tinted CC0 texture), resized
   to the scene size;
2. objects, painted back to front: a silhouette (the CC0 horse from scikit-image, an ellipse, a
   star, a random polygon), scaled, rotated and placed at random, filled with a flat shaded colour,
   a tinted texture or a patch of another photo, and blended in through a slightly soft edge;
3. occlusion: an object's ground-truth mask is its *visible* pixels (its silhouette minus every
   object painted after it), and its box is the tight box of those pixels. Objects left with too
   little visible area are dropped, so each remaining box has a meaningful mask.

Everything is drawn from the numpy Generator given, so a seed fixes every pixel. Scenes are written
as PNG (lossless: the masks stay exact) with two COCO files: `scenes.json` (boxes only, what a
detection dataset gives) and `scenes_gt.json` (the same plus RLE `segmentation`, for measuring).

Coordinates: images are (H, W, 3) uint8 RGB; masks (N, H, W) bool; boxes (N, 4) XYXY absolute pixels
with integer edges (x1 = last column + 1), so a box covers exactly its mask's pixel extent.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

log = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).parent / "sources" / "demo_data"
SHAPES = ("horse", "ellipse", "star", "polygon")
TEXTURES = ("brick", "grass", "gravel")
STYLES = ("photo", "plain")
MIN_VISIBLE_FRACTION = 0.5  # drop objects mostly hidden behind later ones
MIN_VISIBLE_PIXELS = 150  # at 320x240; scaled down for small scenes
EDGE_SIGMA = 0.7  # softness of pasted edges, in pixels


@dataclass
class Scene:
    """One generated image and its objects (visible masks, tight boxes, category names)."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    masks: np.ndarray  # (N, H, W) bool, visible pixels of each object
    boxes: np.ndarray  # (N, 4) float64 XYXY, tight around each mask, integer edges
    categories: list[str]


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """The bundled demo photos as RGB arrays (backgrounds and object fills)."""
    paths = sorted((ASSETS_DIR / "photos").glob("*.jpg"))
    if not paths:
        raise FileNotFoundError(f"no background photos under {ASSETS_DIR / 'photos'}")
    return tuple(
        cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for p in paths
    )


@lru_cache(maxsize=1)
def _textures() -> tuple[np.ndarray, ...]:
    """Grayscale CC0 textures (brick, grass, gravel), (256, 256) uint8."""
    return tuple(_read_gray(ASSETS_DIR / "assets" / f"{n}.jpg") for n in TEXTURES)


@lru_cache(maxsize=1)
def _horse() -> np.ndarray:
    """The horse silhouette, (h, w) bool, cropped tight."""
    return _read_gray(ASSETS_DIR / "assets" / "horse.png") > 127


def _read_gray(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise FileNotFoundError(f"cannot read scene asset {path}")
    return img


# --- silhouettes: each returns an (h, w) bool mask that fills its own frame tightly ---------------


def _shape_mask(rng: np.random.Generator, shape: str, size: int) -> np.ndarray:
    """A silhouette of kind `shape` whose longer side is about `size` pixels, randomly rotated."""
    canvas = np.zeros((2 * size, 2 * size), np.uint8)
    c = size  # centre of the canvas; drawing around it leaves room for rotation
    if shape == "horse":
        horse = _horse().astype(np.uint8) * 255
        scale = size / max(horse.shape)
        small = cv2.resize(horse, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        if rng.random() < 0.5:
            small = small[:, ::-1]
        h, w = small.shape
        canvas[c - h // 2 : c - h // 2 + h, c - w // 2 : c - w // 2 + w] = small
    elif shape == "ellipse":
        axes = (size // 2, max(3, int(size / 2 * rng.uniform(0.35, 1.0))))
        cv2.ellipse(canvas, (c, c), axes, 0, 0, 360, 255, -1)
    elif shape == "star":
        n = int(rng.integers(4, 8))
        inner = rng.uniform(0.45, 0.7)
        angles = np.arange(2 * n) * np.pi / n
        radii = np.where(np.arange(2 * n) % 2 == 0, size / 2, size / 2 * inner)
        pts = np.stack([c + radii * np.cos(angles), c + radii * np.sin(angles)], 1)
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 255)
    elif shape == "polygon":
        n = int(rng.integers(3, 9))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = size / 2 * rng.uniform(0.6, 1.0, n)
        pts = np.stack([c + radii * np.cos(angles), c + radii * np.sin(angles)], 1)
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 255)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of: {', '.join(SHAPES)}")
    angle = rng.uniform(-180, 180) if shape != "horse" else rng.uniform(-25, 25)
    rot = cv2.getRotationMatrix2D((float(c), float(c)), angle, 1.0)
    canvas = cv2.warpAffine(canvas, rot, canvas.shape[::-1], flags=cv2.INTER_NEAREST)
    ys, xs = np.nonzero(canvas)
    return canvas[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] > 0


# --- appearance -----------------------------------------------------------------------------------


def _photo_crop(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random crop of a random bundled photo, resized to (height, width, 3)."""
    photos = _photos()
    photo = photos[int(rng.integers(len(photos)))]
    ph, pw = photo.shape[:2]
    scale = rng.uniform(0.4, 1.0)
    ch = max(8, int(min(ph, pw * height / width) * scale))
    cw = max(8, int(ch * width / height))
    y0 = int(rng.integers(0, ph - ch + 1))
    x0 = int(rng.integers(0, pw - cw + 1))
    crop = photo[y0 : y0 + ch, x0 : x0 + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA)


def _texture_fill(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A grayscale texture tiled to (height, width), tinted with a random colour."""
    tex = _textures()[int(rng.integers(len(TEXTURES)))]
    reps = (height // tex.shape[0] + 1, width // tex.shape[1] + 1)
    tiled = np.tile(tex, reps)[:height, :width].astype(np.float32) / 255.0
    tint = rng.uniform(40, 255, 3).astype(np.float32)
    return np.clip(tiled[..., None] * tint * 1.4, 0, 255).astype(np.uint8)


def _shaded_fill(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A flat colour with a linear light gradient and mild noise, (height, width, 3)."""
    colour = rng.uniform(0, 255, 3).astype(np.float32)
    gy, gx = np.mgrid[0:height, 0:width].astype(np.float32)
    direction = rng.uniform(-1, 1, 2)
    ramp = (gx * direction[0] / max(width, 1) + gy * direction[1] / max(height, 1)) * 50
    noise = rng.normal(0, 8, (height, width, 1)).astype(np.float32)
    return np.clip(colour + ramp[..., None] + noise, 0, 255).astype(np.uint8)


def _object_fill(rng: np.random.Generator, height: int, width: int,
                 plain: bool = False) -> np.ndarray:
    if plain:
        return _shaded_fill(rng, height, width)
    kind = rng.choice(3, p=[0.45, 0.3, 0.25])
    if kind == 0:
        return _shaded_fill(rng, height, width)
    if kind == 1:
        return _texture_fill(rng, height, width)
    return _photo_crop(rng, height, width)


def _background(rng: np.random.Generator, height: int, width: int,
                plain: bool = False) -> np.ndarray:
    if plain:
        return _texture_fill(rng, height, width)
    if rng.random() < 0.8:
        return _photo_crop(rng, height, width)
    return _texture_fill(rng, height, width)


# --- scenes ---------------------------------------------------------------------------------------


def make_scene(
    rng: np.random.Generator,
    width: int = 320,
    height: int = 240,
    n_objects: tuple[int, int] = (2, 5),
    shapes: tuple[str, ...] = SHAPES,
    style: str = "photo",
) -> Scene:
    """Draw one scene of (height, width) with between n_objects[0] and n_objects[1] objects.

    style: "photo" (photo or texture backgrounds; flat, textured or photo fills) or "plain" (a
    tinted texture background and flat shaded fills only: the easy end, for training miniatures
    that must learn within minutes on a CPU).

    Objects that end up mostly hidden are dropped, so a scene may hold fewer objects than drawn (at
    least one is always kept: the last painted object is never occluded).
    """
    if width < 32 or height < 32:
        raise ValueError(f"scene size {width}x{height} is too small (need at least 32x32)")
    if style not in STYLES:
        raise ValueError(f"unknown scene style {style!r}; choose one of: {', '.join(STYLES)}")
    plain = style == "plain"
    image = _background(rng, height, width, plain)
    full_masks, categories = [], []
    for _ in range(int(rng.integers(n_objects[0], n_objects[1] + 1))):
        shape = str(shapes[int(rng.integers(len(shapes)))])
        size = int(rng.uniform(0.25, 0.7) * min(height, width))
        sil = _shape_mask(rng, shape, size)
        sh, sw = sil.shape
        sh, sw = min(sh, height), min(sw, width)
        sil = sil[:sh, :sw]
        y0 = int(rng.integers(0, height - sh + 1))
        x0 = int(rng.integers(0, width - sw + 1))
        mask = np.zeros((height, width), bool)
        mask[y0 : y0 + sh, x0 : x0 + sw] = sil
        _paste(image, mask, _object_fill(rng, sh, sw, plain), y0, x0)
        full_masks.append(mask)
        categories.append(shape)
    return _visible(image, full_masks, categories)


def _paste(image: np.ndarray, mask: np.ndarray, fill: np.ndarray, y0: int, x0: int) -> None:
    """Blend `fill` (placed at row y0, col x0) into `image` in place through a slightly soft edge.

    Real photos have no hard 1-pixel edges; a Gaussian alpha (sigma EDGE_SIGMA) mimics the blur of a
    lens. The alpha is >= 0.5 exactly where `mask` is set (a symmetric blur of a 0/1 edge), so the
    binary mask stays the right ground truth.
    """
    h, w = fill.shape[:2]
    alpha = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), EDGE_SIGMA)[y0 : y0 + h, x0 : x0 + w]
    alpha = np.where(
        mask[y0 : y0 + h, x0 : x0 + w], np.maximum(alpha, 0.5), np.minimum(alpha, 0.49)
    )
    region = image[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
    blended = alpha[..., None] * fill + (1.0 - alpha[..., None]) * region
    image[y0 : y0 + h, x0 : x0 + w] = np.clip(np.round(blended), 0, 255).astype(np.uint8)


def _visible(image: np.ndarray, full_masks: list[np.ndarray], categories: list[str]) -> Scene:
    """Occlusion: each object keeps the pixels no later object covers; mostly hidden ones go."""
    h, w = image.shape[:2]
    min_pixels = min(MIN_VISIBLE_PIXELS, int(0.01 * h * w))  # small scenes have small objects
    covered = np.zeros((h, w), bool)
    kept_masks, kept_cats = [], []
    for mask, cat in zip(reversed(full_masks), reversed(categories), strict=True):
        visible = mask & ~covered
        on_top = not covered.any()  # the last painted object is whole: always kept
        covered |= mask
        n_vis = int(visible.sum())
        if on_top or (n_vis >= min_pixels and n_vis >= MIN_VISIBLE_FRACTION * mask.sum()):
            kept_masks.append(visible)
            kept_cats.append(cat)
    kept_masks.reverse()
    kept_cats.reverse()
    masks = np.stack(kept_masks) if kept_masks else np.zeros((0, h, w), bool)
    return Scene(image=image, masks=masks, boxes=tight_boxes(masks), categories=kept_cats)


def tight_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, 4) float64 XYXY: [min col, min row, max col + 1, max row + 1]."""
    boxes = np.zeros((len(masks), 4), np.float64)
    for i, m in enumerate(masks):
        rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        if len(rows):
            boxes[i] = [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
    return boxes


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of scene `index` of a set: independent of how many scenes the set has."""
    return np.random.default_rng([seed, index])


def write_scenes(
    out_dir: Path,
    n: int,
    seed: int = 0,
    width: int = 320,
    height: int = 240,
    first_image_id: int = 1,
    subdir: str = "scenes",
    style: str = "photo",
    n_objects: tuple[int, int] = (2, 5),
) -> tuple[Path, Path]:
    """Write n scenes as `<out_dir>/<subdir>/scene_NNNN.png` plus two COCO files in out_dir.

    Returns (scenes.json path, scenes_gt.json path). `file_name`s are relative to out_dir.
    Annotation ids are `<image_id * 1000 + k>`, so they stay stable when n changes.
    """
    out_dir = Path(out_dir)
    (out_dir / subdir).mkdir(parents=True, exist_ok=True)
    images, boxes_only, with_masks = [], [], []
    cat_ids = {name: k + 1 for k, name in enumerate(SHAPES)}
    for i in range(n):
        scene = make_scene(scene_rng(seed, i), width=width, height=height,
                           n_objects=n_objects, style=style)
        image_id = first_image_id + i
        file_name = f"{subdir}/scene_{i:04d}.png"
        bgr = cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR)
        if not cv2.imwrite(str(out_dir / file_name), bgr, [cv2.IMWRITE_PNG_COMPRESSION, 9]):
            raise OSError(f"could not write {out_dir / file_name}")
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        rles = mask_utils.encode(np.asfortranarray(scene.masks.transpose(1, 2, 0).astype(np.uint8)))
        for k, (box, cat, rle) in enumerate(zip(scene.boxes, scene.categories, rles, strict=True)):
            x0, y0, x1, y1 = (int(v) for v in box)
            ann = {
                "id": image_id * 1000 + k,
                "image_id": image_id,
                "category_id": cat_ids[cat],
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0),
                "iscrowd": 0,
            }
            boxes_only.append(ann)
            seg = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            with_masks.append({**ann, "segmentation": seg, "area": int(mask_utils.area(rle))})
    categories = [{"id": i, "name": name, "supercategory": "shape"} for name, i in cat_ids.items()]
    info = {"description": f"mqengine generated scenes (seed {seed}, {n} images, {style})",
            "version": "1.0"}
    paths = (out_dir / "scenes.json", out_dir / "scenes_gt.json")
    for path, anns in zip(paths, (boxes_only, with_masks), strict=True):
        coco = {
            "info": info,
            "licenses": [],
            "images": images,
            "annotations": anns,
            "categories": categories,
        }
        path.write_text(json.dumps(coco, indent=None, separators=(",", ":")))
    log.info("wrote %d scenes (%d objects) to %s", n, len(boxes_only), out_dir)
    return paths
