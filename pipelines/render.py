"""Draw a run's objects for eyeballing it: mask overlays with outlines, boxes, and readable labels
(text on a filled background, placed so labels do not overlap) that carry the reject code of every
filtered or rejected object. `render` draws one image into a file, `render_grid` a contact sheet;
the HTML report (pipelines/report.py) draws its thumbnails with `render` too.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipelines.images import load_image
from schemas import masks as rle

# Distinct colours (RGB) for kept objects, chosen far (RGB distance >= 129) from the two status
# colours below, so a kept object is never mistaken for a filtered or rejected one.
PALETTE = [
    (60, 180, 75),
    (0, 130, 200),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
    (0, 0, 128),
    (170, 255, 195),
    (128, 128, 255),
]
STATUS_EDGE = {"kept": None, "filtered": (255, 140, 0), "rejected": (255, 0, 0)}
FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass
class Label:
    text: str
    rect: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), in image pixels
    colour: tuple[int, int, int]  # background (RGB)


def object_colour(k: int, status: str) -> tuple[int, int, int]:
    """Colour of the k-th object of an image: its status colour unless kept."""
    return STATUS_EDGE.get(status) or PALETTE[k % len(PALETTE)]


def label_text(obj: dict) -> str:
    """Category (or first caption when there is no category), with `[reject_code]` in front for
    every object that was not kept."""
    caps = obj.get("captions") or []
    text = obj.get("category") or (caps[0]["text"] if caps else "")
    if obj.get("status", "kept") != "kept":
        text = f"[{obj.get('reject_code') or obj['status']}] {text}"
    return text[:48]


def render(
    root: Path, file_path: str, objects: list[dict], dest: Path, alpha: float = 0.45
) -> Path:
    """objects: rows with box, mask, category, status, captions. Writes `dest` and returns it."""
    loaded = load_image(root, file_path, None, None)
    if loaded.pixels is None:
        raise FileNotFoundError(f"cannot show {file_path}: {loaded.error}")
    canvas = loaded.pixels.astype(np.float32)
    out, _ = draw_objects(canvas.astype(np.uint8), objects, alpha)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(dest), cv2.cvtColor(out, cv2.COLOR_RGB2BGR)):
        raise ValueError(f"cannot write {dest} (use a .png or .jpg name)")
    return dest


def draw_objects(
    pixels: np.ndarray, objects: list[dict], alpha: float = 0.45
) -> tuple[np.ndarray, list[Label]]:
    """(H, W, 3) uint8 RGB + object rows -> the drawn image and the labels placed on it."""
    canvas = pixels.astype(np.float32)
    h, w = pixels.shape[:2]
    outlines = []
    for k, obj in enumerate(objects):
        if not obj.get("mask"):
            continue
        m = rle.decode([obj["mask"]])[0]
        if m.shape != (h, w):
            continue  # a mask of another size cannot be drawn on this image
        colour = np.array(object_colour(k, obj.get("status", "kept")), np.float32)
        canvas[m.astype(bool)] = (1 - alpha) * canvas[m.astype(bool)] + alpha * colour
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        outlines.append((contours, tuple(int(c) for c in colour)))
    out = canvas.clip(0, 255).astype(np.uint8)
    thick = max(1, round(max(h, w) / 400))
    for contours, colour in outlines:
        cv2.drawContours(out, contours, -1, colour, thick, cv2.LINE_AA)
    boxes = []
    for k, obj in enumerate(objects):
        if obj.get("box") and len(obj["box"]) == 4:
            x, y, bw, bh = (int(round(v)) for v in obj["box"])
            colour = object_colour(k, obj.get("status", "kept"))
            cv2.rectangle(out, (x, y), (x + max(bw, 1) - 1, y + max(bh, 1) - 1), colour, thick + 1)
            boxes.append((k, (x, y, bw, bh), colour))
    scale = max(0.4, min(1.6, max(h, w) / 1000))
    labels = place_labels([(label_text(objects[k]), b, c) for k, b, c in boxes], (h, w), scale)
    for label in labels:
        _draw_label(out, label, scale)
    return out, labels


def text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with `background` (WCAG relative luminance)."""
    return (0, 0, 0) if luminance(background) > 0.179 else (255, 255, 255)


def luminance(rgb) -> float:
    lin = [(c / 255) / 12.92 if c <= 10 else (((c / 255) + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def place_labels(items: list, shape: tuple[int, int], scale: float) -> list[Label]:
    """Greedy placement: each label tries spots around its box (above, inside, below; left then
    right aligned) and takes the first that stays in the image and overlaps no label placed
    before it, else the spot that overlaps least."""
    h, w = shape
    placed: list[Label] = []
    for text, (x, y, bw, bh), colour in items:
        (tw, th), base = cv2.getTextSize(text, FONT, scale, 1)
        lw, lh = tw + 6, th + base + 6
        spots = [(x, y - lh), (x, y), (x, y + bh), (x + bw - lw, y - lh), (x + bw - lw, y + bh)]
        spots += [(x, y + k * lh) for k in range(1, 1 + max(1, bh // max(lh, 1)))]
        spots += [(x, y - k * lh) for k in range(2, 12)]
        spots += [(x, y + bh + k * lh) for k in range(1, 12)]
        best, best_cost = None, None
        for sx, sy in spots:
            sx, sy = min(max(sx, 0), max(w - lw, 0)), min(max(sy, 0), max(h - lh, 0))
            rect = (sx, sy, sx + lw, sy + lh)
            cost = sum(_overlap(rect, p.rect) for p in placed)
            if best_cost is None or cost < best_cost:
                best, best_cost = rect, cost
            if cost == 0:
                break
        placed.append(Label(text, best, colour))
    return placed


def _overlap(a, b) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def _draw_label(out: np.ndarray, label: Label, scale: float) -> None:
    x0, y0, x1, y1 = label.rect
    cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), label.colour, cv2.FILLED)
    (_, th), base = cv2.getTextSize(label.text, FONT, scale, 1)
    origin = (x0 + 3, y0 + 3 + th)
    cv2.putText(out, label.text, origin, FONT, scale, text_colour(label.colour), 1, cv2.LINE_AA)


def render_grid(
    root: Path, items: list[tuple[str, str, list[dict]]], dest: Path, tile: int = 320
) -> Path:
    """A contact sheet: items are (title, file_path, objects); each image drawn by `render`, fit
    into a tile x tile cell with its title underneath. An image that cannot be read gets a grey
    cell that says why, so the sheet still shows every requested image."""
    if not items:
        raise ValueError(f"nothing to draw into {dest}: no images selected")
    cols = int(np.ceil(np.sqrt(len(items))))
    rows = int(np.ceil(len(items) / cols))
    strip = 22
    sheet = np.full((rows * (tile + strip), cols * tile, 3), 255, np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        for n, (title, file_path, objects) in enumerate(items):
            r, c = divmod(n, cols)
            cell = _grid_cell(root, file_path, objects, Path(tmp) / f"{n}.png", tile)
            y, x = r * (tile + strip), c * tile
            sheet[y : y + cell.shape[0], x : x + cell.shape[1]] = cell
            cv2.putText(sheet, title[:40], (x + 4, y + tile + 15), FONT, 0.45, (0, 0, 0), 1,
                        cv2.LINE_AA)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(dest), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
        raise ValueError(f"cannot write {dest} (use a .png or .jpg name)")
    return dest


def _grid_cell(root: Path, file_path: str, objects: list[dict], tmp: Path, tile: int) -> np.ndarray:
    try:
        render(root, file_path, objects, tmp)
        drawn = cv2.cvtColor(cv2.imread(str(tmp)), cv2.COLOR_BGR2RGB)
    except FileNotFoundError as exc:
        return placeholder(str(exc), tile, tile)
    return fit(drawn, tile)


def fit(image: np.ndarray, side: int) -> np.ndarray:
    """Downscale (never up) so the longer side is at most `side`."""
    h, w = image.shape[:2]
    f = min(1.0, side / max(h, w))
    if f == 1.0:
        return image
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def placeholder(text: str, h: int, w: int) -> np.ndarray:
    """A grey image saying why there is no picture (missing, corrupt, unsafe path)."""
    img = np.full((h, w, 3), 200, np.uint8)
    words, lines = text.split(), [""]
    for word in words:
        if len(lines[-1]) + len(word) > max(8, w // 9):
            lines.append("")
        lines[-1] += ("" if not lines[-1] else " ") + word
    for i, line in enumerate(lines[:8]):
        cv2.putText(img, line, (6, 20 + 18 * i), FONT, 0.45, (120, 0, 0), 1, cv2.LINE_AA)
    return img
