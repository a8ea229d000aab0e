"""The weights-free captioner: captions built from category, colour, size, position and relations.

For each object of an image it writes up to `max_captions` captions, best first:

  kind        example                          score (a confidence in [0, 1])
  plain       "a dog"                          1.0 (the category comes from the source annotation)
  colour      "a brown dog"                    f = fraction of the object's pixels named brown
  place       "a large dog on the left"        s x p (size and position confidences, below)
  relation    "a dog in a basket"              r = strength of the geometric relation (relations.py)
  colour+rel  "a brown dog in a basket"        f x r
  full        "a large brown dog on the left"  f x s x p
  statement   "the dog is brown"               f

Captions are sorted by score (rounded to 4 decimals), ties kept in the order of the table, and
deduplicated by text; the statement, a paraphrase of the colour caption, goes last whatever its
score, so it only fills slots that no caption with new content wants. The plain phrase always
comes first, so every object has one caption.
Nothing is stated without evidence: no colour unless one dominates (colors.py), no size word for a
medium box, no position for a box spanning most of the image, no relation unless geometry holds.
No colour either when the category names one ("red cabbage", "orange").

Size: relative box area a = box area / image area; "small" when a < 0.02, "large" when a >= 0.25.
Confidence grows with the distance past the threshold on a log scale: 0.5 at the threshold, 1.0 at
a quarter of it (small) or twice it (large). Position: the box centre in thirds of the image width
and height; confidence 0.5 on a third line, 1.0 a sixth of the image inside the zone. A box wider
(taller) than 60% of the image gets no horizontal (vertical) position word.
"""

from __future__ import annotations

import math

import numpy as np

from pipelines.captioners import Caption
from pipelines.captioners.colors import COLOR_NAMES, MAX_PIXELS, dominant_color, exposure_gain
from pipelines.captioners.relations import pair_relations, relation_phrase
from pipelines.masksets import region

PROVENANCE = "template"
SMALL_AREA, LARGE_AREA = 0.02, 0.25
SPAN_NO_POSITION = 0.6
# Words that start with a vowel letter but a consonant sound, and the reverse (rule of thumb).
_CONSONANT_SOUND = ("uni", "use", "usu", "uti", "eu", "one", "once", "ewe")
_VOWEL_SOUND = ("hour", "honest", "honor", "honour", "heir")


def normalize_category(category: str | None, index: int) -> str:
    """'  Traffic_Light ' -> 'traffic light'. Raises ValueError naming the object index if empty."""
    text = " ".join(str(category).replace("_", " ").split()).lower() if category is not None else ""
    if not text:
        raise ValueError(f"object {index}: category is {category!r}; a caption needs a category")
    return text


def with_article(phrase: str) -> str:
    """'apple' -> 'an apple', 'unicorn' -> 'a unicorn', 'hour glass' -> 'an hour glass'."""
    word = phrase.split()[0]
    vowel = word[0] in "aeiou" and not word.startswith(_CONSONANT_SOUND)
    return f"{'an' if vowel or word.startswith(_VOWEL_SOUND) else 'a'} {phrase}"


def size_word(box: np.ndarray, height: int, width: int) -> tuple[str | None, float]:
    """XYXY box in an image of (height, width) -> ('small' | 'large' | None, confidence)."""
    area = float(max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)) / (height * width)
    if area < SMALL_AREA:
        ratio = math.log(SMALL_AREA / area) / math.log(4) if area > 0 else 1.0
        return "small", 0.5 + 0.5 * min(ratio, 1.0)
    if area >= LARGE_AREA:
        return "large", 0.5 + 0.5 * min(math.log(area / LARGE_AREA) / math.log(2), 1.0)
    return None, 1.0


def _zone(
    lo: float, hi: float, extent: int, names: tuple[str, str, str]
) -> tuple[str | None, float]:
    """Interval [lo, hi] along an axis of length `extent` -> (zone name or None, confidence)."""
    if (hi - lo) > SPAN_NO_POSITION * extent:
        return None, 1.0
    u = (lo + hi) / 2 / extent
    zone = 0 if u < 1 / 3 else 2 if u > 2 / 3 else 1
    to_line = min(abs(u - 1 / 3), abs(u - 2 / 3))  # how far inside its zone the centre lies
    return names[zone], 0.5 + min(3 * float(to_line), 0.5)


def position_phrase(box: np.ndarray, height: int, width: int) -> tuple[str | None, float]:
    """XYXY box -> ('on the left' | 'at the top right' | 'in the center' | ... | None, conf)."""
    horizontal, ch = _zone(box[0], box[2], width, ("left", "center", "right"))
    vertical, cv = _zone(box[1], box[3], height, ("top", "center", "bottom"))
    h_side = horizontal not in (None, "center")
    v_side = vertical not in (None, "center")
    if h_side and v_side:
        return f"at the {vertical} {horizontal}", ch * cv
    if h_side:
        return f"on the {horizontal}", ch
    if v_side:
        return f"at the {vertical}", cv
    if horizontal is None and vertical is None:
        return None, 1.0
    return "in the center", ch * cv


def names_a_color(category: str) -> bool:
    """True when the category already names a colour ('red cabbage', 'orange'): a second colour
    word would contradict it ('a brown orange') or repeat it."""
    return any(word in COLOR_NAMES or word == "grey" for word in category.split())


def _pixel_range(box: np.ndarray, height: int, width: int) -> tuple[slice, slice]:
    """XYXY box -> (row slice, column slice) of the pixels whose centres lie inside it."""
    c0, r0, c1, r1 = (int(math.floor(v + 0.5)) for v in box)
    rows = slice(min(max(r0, 0), height), min(max(r1, 0), height))
    return rows, slice(min(max(c0, 0), width), min(max(c1, 0), width))


def object_pixels(
    image: np.ndarray, boxes: np.ndarray, masks: np.ndarray, index: int, min_pixels: int = 20
) -> np.ndarray:
    """The (K, 3) uint8 pixels whose colour describes object `index`.

    Those of its mask inside its box (the whole box when the mask is empty there), minus the
    masks of smaller objects overlapping it: a cup on a table sits in front of the table, and its
    pixels say nothing about the table's colour. The exclusion is dropped if it leaves fewer than
    `min_pixels` pixels. Depends only on the set of objects, not on their order. At most
    colors.MAX_PIXELS pixels come back (an even, row-major stride subsample).
    """
    height, width = image.shape[:2]
    rows, cols = _pixel_range(boxes[index], height, width)
    own = region(masks, index, rows, cols)
    if not own.any():
        own = np.ones_like(own)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    in_front = np.zeros_like(own)
    for j in np.flatnonzero(area < area[index]):
        r, c = _pixel_range(boxes[j], height, width)
        r = slice(max(r.start, rows.start), min(r.stop, rows.stop))
        c = slice(max(c.start, cols.start), min(c.stop, cols.stop))
        if r.start < r.stop and c.start < c.stop:
            local = (
                slice(r.start - rows.start, r.stop - rows.start),
                slice(c.start - cols.start, c.stop - cols.start),
            )
            in_front[local] |= region(masks, j, r, c)
    keep = own & ~in_front
    if np.count_nonzero(keep) < min_pixels:
        keep = own
    # Subsample the positions before gathering (the same pixels colors.subsample would keep).
    rr, cc = np.nonzero(keep)
    step = -(-len(rr) // MAX_PIXELS) or 1
    return image[rows.start + rr[::step], cols.start + cc[::step]]


def object_captions(
    subject: str,
    color: tuple[str | None, float],
    place: tuple[str | None, str | None, float],
    relations: list[tuple[str, float]],
    max_captions: int,
) -> list[Caption]:
    """Captions of one object from its parts, best first, deduplicated, at most `max_captions`.

    subject: normalised category ('dog'). color: (name or None, dominance fraction).
    place: (size word or None, position phrase or None, their joint confidence).
    relations: (phrase after the subject, e.g. 'in a basket', strength), strongest first.
    """
    color_name, f = color
    size, position, sp = place
    noun = f"{color_name} {subject}" if color_name else subject
    candidates: list[tuple[str, float]] = [(with_article(subject), 1.0)]
    if color_name:
        candidates.append((with_article(noun), f))
    if size or position:
        sized = f"{size} {subject}" if size else subject
        candidates.append((with_article(sized) + (f" {position}" if position else ""), sp))
    candidates += [(f"{with_article(subject)} {phrase}", r) for phrase, r in relations]
    if color_name and relations:
        candidates.append((f"{with_article(noun)} {relations[0][0]}", f * relations[0][1]))
    if color_name and (size or position):
        sized = f"{size} {noun}" if size else noun
        candidates.append((with_article(sized) + (f" {position}" if position else ""), f * sp))
    ranked = sorted(((t, round(float(s), 4)) for t, s in candidates), key=lambda c: -c[1])
    if color_name:  # a paraphrase of "a brown dog": it only fills slots nothing new would take
        ranked.append((f"the {subject} is {color_name}", round(float(f), 4)))
    seen: set[str] = set()
    out: list[Caption] = []
    for text, score in ranked:
        if text not in seen and len(out) < max_captions:
            seen.add(text)
            out.append(Caption(text, PROVENANCE, score))
    return out


def template_captions(
    image: np.ndarray,
    boxes: np.ndarray,
    masks: np.ndarray,
    categories: list[str | None],
    max_captions: int = 5,
    max_relations: int = 2,
) -> list[list[Caption]]:
    """Captions for every object of one image (the captioner contract in captioners/__init__.py).

    image: (H, W, 3) uint8 RGB; boxes: (N, 4) XYXY absolute pixels; masks: (N, H, W) bool;
    categories: N texts. Returns N lists of Caption, each best first.
    """
    height, width = image.shape[:2]
    subjects = [normalize_category(c, i) for i, c in enumerate(categories)]
    all_relations = pair_relations(boxes, subjects)
    gain = exposure_gain(image)
    out = []
    for i, subject in enumerate(subjects):
        color = dominant_color(object_pixels(image, boxes, masks, i), gain)
        if names_a_color(subject):
            color = (None, color[1])
        size, s = size_word(boxes[i], height, width)
        position, p = position_phrase(boxes[i], height, width)
        phrases: list[tuple[str, float]] = []
        for rel in all_relations[i]:
            other = subjects[rel.other]
            other_phrase = f"another {other}" if other == subject else with_article(other)
            phrase = relation_phrase(rel.kind, other_phrase)
            if len(phrases) < max_relations and phrase not in (t for t, _ in phrases):
                phrases.append((phrase, rel.score))
        out.append(object_captions(subject, color, (size, position, s * p), phrases, max_captions))
    return out


class TemplateCaptioner:
    """Callable captioner over template_captions, checking the contract's shapes up front."""

    def __init__(self, max_captions: int = 5, max_relations: int = 2):
        if max_captions < 1:
            raise ValueError(f"max_captions must be >= 1, got {max_captions}")
        if max_relations < 0:
            raise ValueError(f"max_relations must be >= 0, got {max_relations}")
        self.max_captions = max_captions
        self.max_relations = max_relations

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, masks: np.ndarray, categories: list[str]
    ) -> list[list[Caption]]:
        image, boxes = np.asarray(image), np.asarray(boxes, np.float64)
        if isinstance(masks, np.ndarray):
            masks = masks.astype(bool, copy=False)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        n, (height, width) = len(categories), image.shape[:2]
        if boxes.shape != (n, 4) or not np.isfinite(boxes).all():
            raise ValueError(
                f"boxes must be ({n}, 4) finite XYXY for {n} categories, got {boxes.shape}"
            )
        if tuple(masks.shape) != (n, height, width):
            raise ValueError(f"masks must be ({n}, {height}, {width}), got {masks.shape}")
        return template_captions(
            image,
            boxes,
            masks,
            list(categories),
            self.max_captions,
            self.max_relations,
        )
