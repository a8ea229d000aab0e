"""Bad input end to end: every malformed annotation or image becomes a rejected row with its
reject_code (the rest of its image untouched) or a one-line error; never a crash, hang or wrong
mask. Cases are built by one fixture writer (`write_case`): a tiny COCO file and real images in
tmp_path, run through CocoSource/HFSource -> process_unit, and a few through `engine synthesize`.
"""

from __future__ import annotations

import io
import json
import os
import signal
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from engine.cli import main
from engine.query import connect
from pipelines.captioners import Caption
from pipelines.images import decode_rgb, load_image
from pipelines.maskers.box import BoxMasker
from pipelines.process import UnitContext, process_unit
from pipelines.quality import QualityConfig
from pipelines.sources.coco import CocoSource
from pipelines.sources.hf import HFSource
from schemas import masks as rle
from schemas import table_from_rows, validate

H, W = 48, 64
GOOD_BOXES = [[4, 4, 20, 16], [34, 20, 22, 18]]  # drawn as solid rectangles in every image
BAD_ANN_ID = 99


def _pixels(seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    img = np.random.default_rng(seed).integers(90, 140, (h, w, 3), dtype=np.uint8)
    for k, (x, y, bw, bh) in enumerate(GOOD_BOXES):
        img[y : y + bh, x : x + bw] = (220, 30, 30) if k == 0 else (30, 60, 220)
    return img


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _exif_jpeg(stored: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue()


def write_case(root: Path, *, segmentation=None, case_file: str = "images/case.png",
               case_bytes: bytes | None = None, size: tuple[int, int] = (W, H),
               make_file=None) -> Path:
    """Two images, each with the two GOOD_BOXES objects: `images/good.png` (clean) and the case
    image (`case_file`, written from `case_bytes` or by `make_file(path)`, default a clean PNG),
    whose annotation list also holds annotation BAD_ANN_ID with `segmentation` when given.
    `size` is the (width, height) the annotation file states for the case image."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "images" / "good.png").write_bytes(_png(_pixels(1)))
    target = root / case_file if "\x00" not in case_file else None
    if make_file is not None:
        make_file(target)
    elif target is not None:
        target.write_bytes(case_bytes if case_bytes is not None else _png(_pixels(2)))
    images = [{"id": 1, "file_name": "images/good.png", "width": W, "height": H},
              {"id": 2, "file_name": case_file, "width": size[0], "height": size[1]}]
    anns = [{"id": 10 * image_id + k, "image_id": image_id, "category_id": 1 + k, "bbox": box,
             "area": box[2] * box[3], "iscrowd": 0}
            for image_id in (1, 2) for k, box in enumerate(GOOD_BOXES)]
    if segmentation is not None:
        anns.append({"id": BAD_ANN_ID, "image_id": 2, "category_id": 1, "bbox": [2, 2, 30, 30],
                     "area": 900, "iscrowd": int(isinstance(segmentation, dict)),
                     "segmentation": segmentation})
    cats = [{"id": 1, "name": "red box"}, {"id": 2, "name": "blue box"}]
    path = root / "annotations.json"
    # json.dumps recurses: the 20k-deep case is written as text.
    deep = segmentation == "DEEP"
    if deep:
        anns[-1]["segmentation"] = "@DEEP@"
    text = json.dumps({"images": images, "annotations": anns, "categories": cats})
    if deep:
        text = text.replace('"@DEEP@"', "[" * 20_000 + "]" * 20_000)
    path.write_text(text)
    return path


def _captions(image, boxes, masks, categories):
    return [[Caption(f"a {c}", "test", 1.0)] for c in categories]


def run_unit(root: Path, source) -> tuple[list[dict], list[dict], int]:
    """(images rows, objects rows, number of input objects) of the whole source in one unit."""
    records = list(source.records())
    ctx = UnitContext(source="coco", split="val", root=Path(source.root), run_id="r",
                      quality=QualityConfig())
    images, objects = process_unit(ctx, records, BoxMasker(), _captions)
    validate(table_from_rows("objects", objects), "objects")
    validate(table_from_rows("images", images), "images")
    return images, objects, sum(len(r.objects) for r in records)


def coco_unit(root: Path, ann: Path):
    return run_unit(root, CocoSource("coco", "val", root, ann))


def assert_counts_add_up(objects: list[dict], n_input: int, n_annotations: int) -> None:
    status = Counter(o["status"] for o in objects)
    assert n_input == n_annotations == len(objects) == (
        status["kept"] + status["filtered"] + status["rejected"])


def by_ann(objects: list[dict]) -> dict[str, dict]:
    return {o["source_ann_id"]: o for o in objects}


def _rle_string(mask: np.ndarray) -> str:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()


def _box_mask(h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[2:32, 2:32] = True
    return m


# ----------------------------------------------------------------- malformed segmentations
GOOD_RLE = _rle_string(_box_mask())
BAD_SEGMENTATIONS = {
    "polygon_no_points": [[]],
    "polygon_one_point": [[5, 5]],
    "polygon_two_points": [[5, 5, 20, 20]],
    "polygon_odd_length": [[5, 5, 20, 5, 20, 20, 7]],
    "polygon_null_coordinate": [[5, None, 20, 5, 20, 20]],
    "polygon_far_outside": [[5, 5, 1e12, 5, 20, 20]],
    "polygon_not_nested": [5, 5, 20, 5, 20, 20],
    "polygon_boolean_coordinate": [[5, 5, True, 5, 20, 20]],
    "polygon_too_many_numbers": [[5, 5, 20, 5, 20, 20] * (rle.MAX_SEGMENTATION_NUMBERS // 6 + 1)],
    "nested_20k_deep": "DEEP",
    "rle_runs_short": {"size": [H, W], "counts": [10, 20]},
    "rle_runs_long": {"size": [H, W], "counts": [10, H * W]},
    "rle_negative_run": {"size": [H, W], "counts": [-5, H * W + 5]},
    "rle_float_run": {"size": [H, W], "counts": [0.5, H * W - 0.5]},
    "rle_string_truncated": {"size": [H, W], "counts": GOOD_RLE[:5]},
    "rle_string_cut_mid_value": {"size": [H, W], "counts": GOOD_RLE[:1] + "o"},
    "rle_string_bad_characters": {"size": [H, W], "counts": "zz!!"},
    "rle_string_too_long_for_size": {"size": [H // 2, W], "counts": GOOD_RLE},
    "rle_bad_size": {"size": [H, -W], "counts": GOOD_RLE},
    "rle_no_size": {"counts": GOOD_RLE},
}


@pytest.mark.parametrize("name", sorted(BAD_SEGMENTATIONS))
def test_malformed_segmentation_rejects_that_object_only(tmp_path, name):
    ann = write_case(tmp_path, segmentation=BAD_SEGMENTATIONS[name])
    images, objects, n_input = coco_unit(tmp_path, ann)
    assert_counts_add_up(objects, n_input, 5)
    bad = by_ann(objects)[str(BAD_ANN_ID)]
    assert (bad["status"], bad["reject_code"]) == ("rejected", "gt_mask_invalid"), bad
    assert "segmentation" in bad["reject_reason"]
    assert bad["gt_mask"] is None and bad.get("mask") is None
    others = [o for o in objects if o is not bad]
    assert [o["status"] for o in others] == ["kept"] * 4  # same image included
    assert {i["status"] for i in images} == {"ok"}


def test_from_segmentation_raises_value_error_only(tmp_path):
    """Every malformed segmentation, also ones a JSON parser other than yajl can produce (an
    integer beyond float range, tuples, a 20k-deep list built in Python), is a ValueError."""
    deep: list = []
    for _ in range(20_000):
        deep = [deep]
    cases = [v for v in BAD_SEGMENTATIONS.values() if v != "DEEP"] + [
        [[5, 5, 10**400, 5, 20, 20]], deep, {"size": (H, W), "counts": (1, 2)}, {"counts": 3},
        {"size": [H, W], "counts": b"\xff\xfe"}, {"size": [H, W], "counts": [2**40]}, "text", 7]
    for seg in cases:
        with pytest.raises(ValueError):
            rle.from_segmentation(seg, H, W)


def test_polygon_details_name_the_problem(tmp_path):
    ann = write_case(tmp_path, segmentation=BAD_SEGMENTATIONS["polygon_two_points"])
    _, objects, _ = coco_unit(tmp_path, ann)
    reason = by_ann(objects)[str(BAD_ANN_ID)]["reject_reason"]
    assert f"annotation {BAD_ANN_ID}: unreadable segmentation: polygon 0 has 2 points; " \
           "at least 3 are needed" in reason


def _column_major(runs: list[int], h: int, w: int) -> np.ndarray:
    """Independent RLE decoder: alternating 0/1 runs over the column-major pixel order."""
    flat = np.repeat(np.arange(len(runs)) % 2, runs).astype(bool)
    return flat.reshape(w, h).T


def _runs(mask: np.ndarray) -> list[int]:
    """Independent RLE encoder: run lengths of the column-major pixels, starting with zeros."""
    flat = mask.T.ravel().astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


VALID_SEGMENTATIONS = {
    "uncompressed_rle": ({"size": [H, W], "counts": _runs(_box_mask())}, _box_mask()),
    "compressed_rle": ({"size": [H, W], "counts": GOOD_RLE}, _box_mask()),
    "polygon": ([[2, 2, 32, 2, 32, 32, 2, 32]], None),
}


@pytest.mark.parametrize("name", sorted(VALID_SEGMENTATIONS))
def test_valid_segmentations_are_kept_with_the_exact_mask(tmp_path, name):
    seg, expected = VALID_SEGMENTATIONS[name]
    if expected is None:  # a polygon: pycocotools rasterises it, called directly
        expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, H, W)))
    ann = write_case(tmp_path, segmentation=seg)
    _, objects, n_input = coco_unit(tmp_path, ann)
    assert_counts_add_up(objects, n_input, 5)
    obj = by_ann(objects)["99"]
    assert obj["status"] == "kept" and obj["mask_origin"] == "gt"
    np.testing.assert_array_equal(rle.decode([obj["gt_mask"]])[0].astype(bool),
                                  expected.astype(bool))


def test_rle_string_runs_match_pycocotools():
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = rng.integers(1, 40, 2)
        m = rng.random((h, w)) < rng.random()
        runs = rle.string_runs(_rle_string(m))
        assert sum(runs) == h * w
        np.testing.assert_array_equal(_column_major(runs, h, w), m)


# ------------------------------------------------------------------------------- bad images
@contextmanager
def hang_guard(seconds: int):
    """Fail the test instead of hanging forever (a FIFO read blocks without a writer)."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


BAD_IMAGES = {
    # name: (write_case keyword arguments, images.status, reject_code, detail)
    "nul_byte_in_file_name": (dict(case_file="images/ca\x00se.png"), "unsafe_path",
                              "unsafe_path", "NUL byte"),
    "fifo": (dict(make_file=os.mkfifo), "unsafe_path", "unsafe_path", "a FIFO"),
    "directory": (dict(make_file=Path.mkdir), "missing", "image_missing", "is a directory"),
    "not_an_image": (dict(case_bytes=b"plain text"), "corrupt", "image_corrupt",
                     "not a known image format"),
    # sparse: no disk used, but reading it would take 1 GiB of memory
    "over_a_gibibyte": (dict(make_file=lambda p: os.truncate(p.touch() or p, (1 << 30) + 1)),
                        "corrupt", "image_corrupt", "more than MAX_IMAGE_BYTES"),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_image_rejects_its_objects_and_nothing_else(tmp_path, name):
    kwargs, status, code, detail = BAD_IMAGES[name]
    ann = write_case(tmp_path, **kwargs)
    with hang_guard(20):
        images, objects, n_input = coco_unit(tmp_path, ann)
    assert_counts_add_up(objects, n_input, 4)
    case = next(i for i in images if i["source_image_id"] == "2")
    assert case["status"] == status and detail in case["error"], case
    for o in objects:
        want = ("rejected", code) if o["image_id"] == case["image_id"] else ("kept", None)
        assert (o["status"], o["reject_code"]) == want
        assert o["image_id"] != case["image_id"] or detail in o["reject_reason"]


def test_fifo_label_maps_of_gt_sources_are_reported_not_read(tmp_path):
    from pipelines.sources import SourceConfig, open_source

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png(_pixels(9)))
    (tmp_path / "masks").mkdir()
    os.mkfifo(tmp_path / "masks" / "a.png")
    labels = tmp_path / "annotations" / "training"
    labels.mkdir(parents=True)
    os.mkfifo(labels / "b.png")
    (tmp_path / "classes.txt").write_text("wall\n")
    with hang_guard(20):
        (fg,) = open_source(SourceConfig("foreground", tmp_path / "img", tmp_path / "masks"))\
            .records()
        (ade,) = open_source(SourceConfig("ade_semantic", tmp_path, tmp_path / "classes.txt"))\
            .records()
    assert "unreadable" in fg.error and "unreadable" in ade.error


def test_decompression_bomb_is_rejected_in_coco_and_hf(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # a 64x48 image is then over 2x the limit
    ann = write_case(tmp_path / "coco")
    images, objects, _ = coco_unit(tmp_path / "coco", ann)
    assert {i["status"] for i in images} == {"corrupt"}
    assert {o["reject_code"] for o in objects} == {"image_corrupt"}
    assert all("DecompressionBombError" in o["reject_reason"] for o in objects)
    root = write_hf(tmp_path / "hf", [_png(_pixels(3))])
    images, objects, _ = run_unit(root, HFSource(root, bbox_format="xywh"))
    assert [i["status"] for i in images] == ["corrupt"]
    assert {o["reject_code"] for o in objects} == {"image_corrupt"}


# ---------------------------------------------------------------- EXIF and 16-bit decoding
def _stored_pixels(data: bytes) -> np.ndarray:
    """The JPEG's stored pixel grid, EXIF ignored (decoded by PIL, no transpose)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("orientation, turn", [(6, -1), (8, 1), (3, 2)])
@pytest.mark.parametrize("shape", [(W, H), (H, H)], ids=["non_square", "square"])
def test_exif_orientation_is_applied_when_decoding(orientation, turn, shape):
    stored = _pixels(4, h=shape[1], w=shape[0])
    data = _exif_jpeg(stored, orientation)
    expected = np.rot90(_stored_pixels(data), k=turn)  # numpy turns; PIL only decodes
    np.testing.assert_array_equal(decode_rgb(data, "x.jpg"), expected)


def test_exif_rotated_jpeg_is_kept_and_masked_in_the_displayed_frame(tmp_path):
    # Stored landscape W x H, displayed (orientation 6: turned 90 degrees clockwise) H x W; the
    # annotation's size and boxes are in the displayed frame, as COCO's are.
    data = _exif_jpeg(_pixels(5), 6)
    ann = write_case(tmp_path, case_bytes=data, case_file="images/case.jpg", size=(H, W))
    doc = json.loads(ann.read_text())
    for a in doc["annotations"]:
        if a["image_id"] == 2:
            x, y, w, h = a["bbox"]
            a["bbox"] = [H - y - h, x, h, w]  # where the rectangle is once turned
    ann.write_text(json.dumps(doc))
    images, objects, n_input = coco_unit(tmp_path, ann)
    assert_counts_add_up(objects, n_input, 4)
    assert [i["status"] for i in images] == ["ok", "ok"]
    assert [(i["width"], i["height"]) for i in images] == [(W, H), (H, W)]
    assert {o["status"] for o in objects} == {"kept"}
    pixels = load_image(tmp_path, "images/case.jpg", H, W).pixels
    np.testing.assert_array_equal(pixels, np.rot90(_stored_pixels(data), k=-1))
    red = next(o for o in objects if o["source_ann_id"] == "20")
    x, y, w, h = (int(v) for v in red["box"])
    assert pixels[y : y + h, x : x + w, 0].mean() > 200  # the red rectangle, not background


def _png16(array: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", array)  # cv2 writes 16-bit PNGs (BGR order for 3 channels)
    assert ok
    return buf.tobytes()


def test_16_bit_pngs_are_scaled_to_8_bits():
    gray = np.random.default_rng(0).integers(0, 65536, (H, W), dtype=np.uint16)
    got = decode_rgb(_png16(gray), "gray16.png")
    np.testing.assert_array_equal(got, np.repeat((gray >> 8).astype(np.uint8)[..., None], 3, 2))
    rgb = np.random.default_rng(1).integers(0, 65536, (H, W, 3), dtype=np.uint16)
    got = decode_rgb(_png16(rgb[..., ::-1]), "rgb48.png")
    np.testing.assert_array_equal(got, (rgb >> 8).astype(np.uint8))


def test_decode_errors_name_the_file():
    with pytest.raises(ValueError, match="cannot decode where/x.png: not a known image format"):
        decode_rgb(b"nope", "where/x.png")


# ------------------------------------------------------------------------------- hf source
def write_hf(root: Path, images: list[bytes], objects: list[dict] | None = None) -> Path:
    """A Parquet `hf` dataset: one row per image bytes, each with `objects` (default: the
    GOOD_BOXES as xywh, categories 0 and 1)."""
    from datasets import ClassLabel, Dataset, Features, List, Value
    from datasets import Image as ImageFeature

    objects = objects or [{"bbox": [float(v) for v in b], "category": k, "segmentation": None}
                          for k, b in enumerate(GOOD_BOXES)]
    features = Features({
        "image_id": Value("int64"), "image": ImageFeature(), "width": Value("int64"),
        "height": Value("int64"),
        "objects": List({"bbox": List(Value("float64")),
                         "category": ClassLabel(names=["red box", "blue box"]),
                         "segmentation": List(List(Value("float64")))}),
    })
    rows = {"image_id": list(range(len(images))),
            "image": [{"bytes": b, "path": None} for b in images],
            "width": [W] * len(images), "height": [H] * len(images),
            "objects": [objects] * len(images)}
    root.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows, features=features).to_parquet(str(root / "train-0.parquet"))
    return root


def test_hf_objects_carry_reject_codes(tmp_path):
    good = [{"bbox": [float(v) for v in b], "category": k, "segmentation": None}
            for k, b in enumerate(GOOD_BOXES)]
    bad = [
        {"bbox": [1.0, 2.0, 3.0], "category": 0, "segmentation": None},
        {"bbox": [2.0, 2.0, 10.0, 10.0], "category": None, "segmentation": None},
        {"bbox": [2.0, 2.0, 10.0, 10.0], "category": 1, "segmentation": [[2.0, 2.0, 9.0]]},
        {"bbox": [2.0, 2.0, 10.0, 10.0], "category": 1, "segmentation": [[]]},
    ]
    root = write_hf(tmp_path, [_png(_pixels(6))], good + bad)
    _, objects, n_input = run_unit(root, HFSource(root, bbox_format="xywh"))
    assert_counts_add_up(objects, n_input, 6)
    assert [(o["status"], o["reject_code"]) for o in objects] == [
        ("kept", None), ("kept", None), ("rejected", "box_invalid"),
        ("rejected", "category_missing"), ("rejected", "gt_mask_invalid"),
        ("rejected", "gt_mask_invalid")]
    assert "odd number of coordinates" in objects[4]["reject_reason"]


def test_hf_size_from_an_exif_rotated_header_is_the_displayed_size(tmp_path):
    from datasets import Dataset, Features, List, Value
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(),
                         "objects": List({"bbox": List(Value("float64")),
                                          "category": Value("string")})})
    rows = {"image": [{"bytes": _exif_jpeg(_pixels(8), 6), "path": None}],
            "objects": [[{"bbox": [1.0, 1.0, 8.0, 8.0], "category": "thing"}]]}
    Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "train-0.parquet"))
    images, objects, _ = run_unit(tmp_path, HFSource(tmp_path, bbox_format="xywh"))
    assert [(i["status"], i["width"], i["height"]) for i in images] == [("ok", H, W)]
    assert [o["status"] for o in objects] == ["kept"]


def test_objects365_inherits_the_coco_reject_codes(tmp_path):
    from pipelines.sources.objects365 import Objects365Source

    ann = write_case(tmp_path, segmentation=[[5, 5, 20, 5]])
    doc = json.loads(ann.read_text())
    doc["annotations"][0]["category_id"] = 77
    ann.write_text(json.dumps(doc))
    _, objects, n_input = run_unit(tmp_path, Objects365Source("val", tmp_path, ann, version=2))
    assert_counts_add_up(objects, n_input, 5)
    codes = {o["source_ann_id"]: o["reject_code"] for o in objects}
    assert codes == {"10": "category_unknown", "11": None, "20": None, "21": None,
                     "99": "gt_mask_invalid"}


# --------------------------------------------------------------------------- end to end (CLI)
def test_synthesize_cli_rejects_bad_input_and_counts_add_up(tmp_path, capsys):
    """One dataset holding several cases at once, through `engine synthesize` and DuckDB."""
    data = tmp_path / "ds"
    ann = write_case(data, segmentation=[[5, None, 20, 5, 20, 20]])
    doc = json.loads(ann.read_text())
    (data / "images" / "rotated.jpg").write_bytes(_exif_jpeg(_pixels(7, h=H, w=W), 6))
    os.mkfifo(data / "images" / "fifo.png")
    extra = [(3, "images/nul\x00.png", W, H), (4, "images/fifo.png", W, H),
             (5, "images/rotated.jpg", H, W)]
    for image_id, name, w, h in extra:
        doc["images"].append({"id": image_id, "file_name": name, "width": w, "height": h})
        doc["annotations"].append({"id": 100 + image_id, "image_id": image_id, "category_id": 1,
                                   "bbox": [1, 1, 10, 10], "area": 100, "iscrowd": 0})
    doc["annotations"].append({"id": 200, "image_id": 1, "category_id": 1, "bbox": [1, 1, 9, 9],
                               "iscrowd": 1, "segmentation": {"size": [H, W], "counts": [5, 9]}})
    ann.write_text(json.dumps(doc))
    out = tmp_path / "run"
    with hang_guard(120):
        code = main(["synthesize", "--source", "coco", "--annotations", str(ann), "--root",
                     str(data), "--split", "val", "--out", str(out), "--executor", "local",
                     "--masker", "box", "--captioner", "none", "--unit-size", "2"])
    assert code == 0, capsys.readouterr().err
    con = connect(out)
    rows = dict(con.sql("SELECT source_ann_id, coalesce(reject_code, status) FROM objects")
                .fetchall())
    assert rows == {"10": "kept", "11": "kept", "20": "kept", "21": "kept",
                    "99": "gt_mask_invalid", "200": "gt_mask_invalid", "103": "unsafe_path",
                    "104": "unsafe_path", "105": "kept"}
    n_annotations = len(doc["annotations"])
    (kept, filtered, rejected), = con.sql(
        "SELECT count(*) FILTER (status = 'kept'), count(*) FILTER (status = 'filtered'), "
        "count(*) FILTER (status = 'rejected') FROM objects").fetchall()
    assert kept + filtered + rejected == n_annotations == 9
    # Training and `engine show` decode through the same function: the displayed frame.
    from model.data import ShardSet
    from pipelines.render import render

    displayed = np.rot90(_stored_pixels((data / "images" / "rotated.jpg").read_bytes()), k=-1)
    shards = ShardSet(out)
    entry = next(e for part in shards.images.values() for e in part
                 if e.file_path == "images/rotated.jpg")
    np.testing.assert_array_equal(shards.read_image(entry), displayed)
    shown = render(data, "images/rotated.jpg", [], tmp_path / "show.png")
    np.testing.assert_array_equal(np.asarray(Image.open(shown).convert("RGB")), displayed)


@pytest.mark.parametrize("field", ["width", "file_name", "id"])
def test_deeply_nested_image_field_is_a_one_line_error(tmp_path, capsys, field):
    ann = write_case(tmp_path / "ds")
    doc = json.loads(ann.read_text())
    doc["images"][1][field] = "@DEEP@"
    ann.write_text(json.dumps(doc).replace('"@DEEP@"', "[" * 20_000 + "]" * 20_000))
    code = main(["synthesize", "--source", "coco", "--annotations", str(ann), "--out",
                 str(tmp_path / "run"), "--executor", "local", "--masker", "box"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert f"{ann}: images[1]" in errors[0] and "[[[[" in errors[0]
