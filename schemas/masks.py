"""Mask encoding of the contract: COCO compressed RLE through pycocotools, never a hand-written
codec.

A mask value in the tables is `{"counts": str, "height": int, "width": int}`; `counts` is
pycocotools' compressed RLE string (ASCII 48..111, column-major), so it round-trips with
`pycocotools.mask` as is. Source segmentations are validated before pycocotools sees them
(`from_segmentation`; `string_runs` reads an RLE string's run lengths only to check them).
"""

from __future__ import annotations

import reprlib

import numpy as np
from pycocotools import mask as mask_utils


def encode(masks: np.ndarray) -> list[dict]:
    """(N, H, W) bool/uint8 masks -> N mask values. One batched pycocotools call."""
    if masks.ndim != 3:
        raise ValueError(f"encode expects (N, H, W) masks, got shape {masks.shape}")
    n, h, w = masks.shape
    if n == 0:
        return []
    # pycocotools wants H x W x N in Fortran order; this transpose of a C-ordered (N,H,W) is
    # exactly that.
    fortran = np.asfortranarray(masks.astype(np.uint8, copy=False).transpose(1, 2, 0))
    rles = mask_utils.encode(fortran)
    return [{"counts": r["counts"].decode("ascii"), "height": h, "width": w} for r in rles]


def to_rle(value: dict) -> dict:
    """A mask value -> the pycocotools RLE dict ({'size': [h, w], 'counts': bytes})."""
    return {"size": [int(value["height"]), int(value["width"])], "counts": value["counts"].encode()}


def from_rle(rle: dict) -> dict:
    """A COCO RLE (compressed string or uncompressed list of ints) -> one mask value.

    Checked before pycocotools sees it: pycocotools decodes runs that sum to less than h*w from
    uninitialised memory (a different garbage mask each run) and fails the whole decode call on
    more. Raises ValueError saying what is wrong.
    """
    if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
        raise ValueError("an RLE needs 'counts' and 'size'")
    h, w = _rle_size(rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list | tuple):  # uncompressed RLE (COCO iscrowd annotations)
        runs = _uncompressed_runs(counts)
        _check_run_total(sum(runs), h, w)
        counts = mask_utils.frPyObjects({"size": [h, w], "counts": runs}, h, w)["counts"]
    elif isinstance(counts, str | bytes):
        text = counts.decode("ascii", "replace") if isinstance(counts, bytes) else counts
        _check_run_total(sum(string_runs(text)), h, w)
        counts = text
    else:
        raise ValueError(f"RLE counts must be a string or a list of integers, "
                         f"got {type(counts).__name__}")
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"counts": counts, "height": h, "width": w}


def _rle_size(size) -> tuple[int, int]:
    if (not isinstance(size, list | tuple) or len(size) != 2
            or not all(_is_int(v) and 0 < v < 2**31 for v in size)):
        raise ValueError(f"RLE size must be [height, width], two positive 32-bit integers, "
                         f"got {_short(size)}")
    return int(size[0]), int(size[1])


def _uncompressed_runs(counts) -> list[int]:
    if len(counts) > MAX_SEGMENTATION_NUMBERS:
        raise ValueError(f"RLE has {len(counts)} counts, more than the "
                         f"{MAX_SEGMENTATION_NUMBERS} allowed (MAX_SEGMENTATION_NUMBERS)")
    if not all(_is_int(v) and 0 <= v < 2**32 for v in counts):
        bad = next(v for v in counts if not (_is_int(v) and 0 <= v < 2**32))
        raise ValueError(f"RLE counts must be integers >= 0, got {_short(bad)}")
    return [int(v) for v in counts]


def _check_run_total(total: int, h: int, w: int) -> None:
    if total != h * w:
        raise ValueError(f"RLE runs cover {total} pixels, but its size {h}x{w} has {h * w}")


def string_runs(counts: str) -> list[int]:
    """The runs of a compressed RLE string, decoded as pycocotools' rleFrString does, checked.

    Each run is 5-bit groups in characters 48..111 (bit 0x20: more groups follow; bit 0x10 of the
    last group: negative); from the third run on, the value is a difference to the run two before.
    Raises ValueError for a character out of range, a truncated value or a negative run.
    """
    if len(counts) > MAX_SEGMENTATION_NUMBERS:
        raise ValueError(f"RLE string has {len(counts)} characters, more than the "
                         f"{MAX_SEGMENTATION_NUMBERS} allowed (MAX_SEGMENTATION_NUMBERS)")
    runs: list[int] = []
    value = shift = 0
    for pos, char in enumerate(counts):
        c = ord(char) - 48
        if not 0 <= c < 64:
            raise ValueError(f"RLE string has {char!r} at {pos}, outside the characters 0..o")
        value |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:
            if shift > 35:  # pycocotools reads at most 7 groups correctly (a 32-bit count)
                raise ValueError(f"RLE string has an over-long value ending at {pos}")
            continue
        if c & 0x10:
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if not 0 <= value < 2**32:
            raise ValueError(f"RLE string decodes to run {value} (run {len(runs)}), not a count")
        runs.append(value)
        value = shift = 0
    if shift:
        raise ValueError("RLE string ends inside a value (truncated)")
    return runs


def decode(values: list[dict]) -> np.ndarray:
    """N mask values of one size -> (N, H, W) uint8."""
    if not values:
        raise ValueError("decode needs at least one mask")
    stacked = mask_utils.decode([to_rle(v) for v in values])
    return np.ascontiguousarray(stacked.transpose(2, 0, 1))


# pycocotools 2.0.11's `area` overflows (uint8 count) with more than 255 masks per call under
# numpy 2, so it is called in chunks.
_AREA_CHUNK = 255


def area(values: list[dict]) -> np.ndarray:
    rles = [to_rle(v) for v in values]
    chunks = [mask_utils.area(rles[i : i + _AREA_CHUNK]) for i in range(0, len(rles), _AREA_CHUNK)]
    return np.concatenate(chunks).astype(np.int64) if chunks else np.zeros(0, np.int64)


def tight_box(values: list[dict]) -> np.ndarray:
    """(N, 4) xywh tight boxes of the masks (pycocotools toBbox; zeros for an empty mask)."""
    return mask_utils.toBbox([to_rle(v) for v in values]).astype(np.float64)


# Bounds on a ground-truth segmentation, checked before pycocotools, json or DuckDB see it:
# - numbers per segmentation (polygon coordinates, uncompressed counts, or characters of an RLE
#   string): the largest real polygons have a few thousand points; a 57 MB polygon ran DuckDB's
#   256 MB index sort out of memory. 500k numbers is ~10 MB of JSON.
# - nesting: polygons are [[x, y, ...], ...] and RLE {"counts": [...], "size": [h, w]}, so no valid
#   segmentation nests deeper than 2; a 20k-deep list raised RecursionError in json.dumps.
# - polygon boundary length: pycocotools allocates 5 ints per boundary pixel (Chebyshev length of
#   the edges), so 2M pixels caps that at ~80 MB; points must also lie within one image size of
#   the image, since a far-away (or null, read as NaN) point overflows its int conversion (a
#   `null` coordinate made it allocate 22 GB).
MAX_SEGMENTATION_NUMBERS = 500_000
MAX_SEGMENTATION_DEPTH = 2
MAX_POLYGON_PERIMETER = 2_000_000
_CONTAINERS = frozenset({list, dict, tuple})  # parsed JSON holds exact list/dict types
_NUMBERS = frozenset({int, float})


def check_segmentation_shape(segmentation) -> str | None:
    """Why `segmentation` cannot be a COCO segmentation (wrong types, nested deeper than
    MAX_SEGMENTATION_DEPTH, more than MAX_SEGMENTATION_NUMBERS numbers), or None.

    Cheap and never recursive, so it is safe on any parsed JSON: the streaming COCO reader runs it
    on every annotation before the segmentation is serialised for the index.
    """
    if isinstance(segmentation, dict):
        counts, size = segmentation.get("counts"), segmentation.get("size")
        if counts is None or size is None:
            return "an RLE needs 'counts' and 'size'"
        parts = [counts, size]
    elif isinstance(segmentation, list):
        parts = segmentation
    else:
        return f"unsupported segmentation of type {type(segmentation).__name__}"
    total = 0
    for i, part in enumerate(parts):
        if isinstance(part, str | bytes):
            total += len(part)
        elif isinstance(part, list):
            if not _CONTAINERS.isdisjoint(map(type, part)):  # C speed: runs on every annotation
                return (f"segmentation nests deeper than {MAX_SEGMENTATION_DEPTH} levels "
                        f"(MAX_SEGMENTATION_DEPTH) in part {i}")
            total += len(part)
        else:
            return f"segmentation part {i} is {_short(part)}, not a list of numbers"
        if total > MAX_SEGMENTATION_NUMBERS:
            return (f"segmentation has more than {MAX_SEGMENTATION_NUMBERS} numbers "
                    f"(MAX_SEGMENTATION_NUMBERS)")
    return None


def from_polygons(polygons: list, height: int, width: int) -> dict:
    """COCO polygon segmentation -> one mask value (rasterised once, merged).

    Each polygon must be a list of finite numbers, x y pairs, at least 3 points, inside the image
    grown by its own size on each side; raises ValueError naming the polygon otherwise.
    """
    if not polygons:
        raise ValueError("polygon segmentation is an empty list")
    if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
        raise ValueError(f"polygon segmentation needs the image size, got {width}x{height}")
    checked = [_polygon(p, k, height, width) for k, p in enumerate(polygons)]
    rles = mask_utils.frPyObjects(checked, height, width)
    return from_rle(mask_utils.merge(rles))


def _polygon(polygon, k: int, height: int, width: int) -> list[float]:
    # Exact types: bool and None (json null) are not coordinates.
    if not isinstance(polygon, list | tuple) or not _NUMBERS.issuperset(map(type, polygon)):
        raise ValueError(f"polygon {k} must be a list of numbers, got {_short(polygon)}")
    if len(polygon) % 2:
        raise ValueError(f"polygon {k} has an odd number of coordinates ({len(polygon)})")
    if len(polygon) < 6:
        n = len(polygon) // 2
        raise ValueError(f"polygon {k} has {n} point{'' if n == 1 else 's'}; at least 3 are needed")
    try:
        xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    except OverflowError:  # a JSON integer beyond float range
        raise ValueError(f"polygon {k} has a coordinate too large for a float") from None
    if not np.isfinite(xy).all():
        raise ValueError(f"polygon {k} has non-finite coordinates")
    low, high = np.array([-width, -height]), np.array([2 * width, 2 * height])
    if (xy < low).any() or (xy > high).any():
        raise ValueError(f"polygon {k} has points more than the image size outside the "
                         f"{width}x{height} image")
    perimeter = np.abs(xy - np.roll(xy, 1, axis=0)).max(axis=1).sum()
    if perimeter > MAX_POLYGON_PERIMETER:
        raise ValueError(f"polygon {k} has a boundary of {perimeter:.0f} px, more than "
                         f"{MAX_POLYGON_PERIMETER} (MAX_POLYGON_PERIMETER)")
    return xy.ravel().tolist()


def from_segmentation(segmentation, height: int, width: int) -> dict:
    """Any COCO `segmentation` (polygon list, RLE or uncompressed RLE) -> one mask value.

    Raises ValueError saying what is malformed; nothing invalid reaches pycocotools.
    """
    problem = check_segmentation_shape(segmentation)
    if problem:
        raise ValueError(problem)
    if isinstance(segmentation, list):
        return from_polygons(segmentation, height, width)
    return from_rle(segmentation)


def _is_int(v) -> bool:
    return type(v) is int or (type(v) is float and v.is_integer())


def _short(value) -> str:
    """A bounded repr for messages: reprlib stops at 6 levels, so deep nesting cannot recurse."""
    return reprlib.repr(value)
