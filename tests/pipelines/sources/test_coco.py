"""The `coco` source: streaming COCO-format reader, per-record errors, masks, malformed files."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipelines.sources import SourceConfig, open_source
from pipelines.sources import stream as stream_mod
from pipelines.sources.coco import CocoSource
from schemas.masks import decode


def _doc(n_images=5, per_image=3, seed=0):
    """A valid COCO dict with string and int ids mixed, non-contiguous category ids."""
    rng = np.random.default_rng(seed)
    cats = [{"id": 1, "name": "person"}, {"id": 13, "name": "stop sign"},
            {"id": 90, "name": "toothbrush"}]
    images, anns = [], []
    for i in range(n_images):
        images.append({"id": 100 - i, "file_name": f"img/{i}.jpg", "width": 64, "height": 48})
        for _ in range(per_image):
            x, y = rng.uniform(0, 40, 2)
            anns.append({"id": 1000 + len(anns), "image_id": 100 - i,
                         "category_id": int(rng.choice([1, 13, 90])),
                         "bbox": [float(x), float(y), float(rng.uniform(1, 20)), 7.5],
                         "area": 1.0, "iscrowd": 0, "score_note": "x"})
    rng.shuffle(anns)  # annotations come in any order; records follow `images`
    return {"info": {}, "images": images, "annotations": anns, "categories": cats}


def _write(tmp_path, doc, name="ann.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def _records(path, **kw):
    return list(CocoSource("coco", "val", root=path.parent, annotation_file=path, **kw).records())


def test_records_follow_images_order_and_match_an_independent_grouping(tmp_path):
    doc = _doc()
    path = _write(tmp_path, doc)
    records = _records(path)
    expected = defaultdict(list)
    for a in doc["annotations"]:  # independent: group in plain Python, in file order
        expected[a["image_id"]].append(a)
    names = {c["id"]: c["name"] for c in doc["categories"]}
    assert [r.image_id for r in records] == [str(im["id"]) for im in doc["images"]]
    for record, image in zip(records, doc["images"], strict=True):
        assert (record.file, record.width, record.height) == (image["file_name"], 64, 48)
        assert record.error is None
        want = expected[image["id"]]
        assert [o.ann_id for o in record.objects] == [str(a["id"]) for a in want]
        assert [o.box_raw for o in record.objects] == [a["bbox"] for a in want]
        assert [o.category for o in record.objects] == [names[a["category_id"]] for a in want]
        assert all(o.attributes == {"score_note": "x"} and o.error is None for o in record.objects)
    assert records == _records(path)  # deterministic: same records on a second pass


def test_per_record_problems_become_errors_and_counts_add_up(tmp_path):
    doc = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10},
                   {"id": "b7", "file_name": "b.jpg", "width": 10, "height": 10},
                   {"id": 1, "file_name": "a_again.jpg", "width": 10, "height": 10}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 999, "bbox": [1, 1, 2, 2]},
            {"id": 2, "image_id": "b7", "category_id": 5, "bbox": [1, 2, 3]},
            {"id": 2, "image_id": "b7", "category_id": 5, "bbox": [0, 0, -4, 3]},
            {"id": 3, "image_id": 1, "category_id": 5, "bbox": [None, 1, 2, 2]},
            {"id": 4, "image_id": 77, "category_id": 5, "bbox": [1, 1, 1, 1]},
            {"id": 5, "image_id": 77, "category_id": 5, "bbox": [2, 2, 1, 1]},
            {"id": 6, "image_id": 78, "category_id": "five", "bbox": [2, 2, 1, 1]},
        ],
        "categories": [{"id": 5, "name": "cup"}],
    }
    records = _records(_write(tmp_path, doc))
    by_file = {r.file: r for r in records if r.file}
    assert [r.image_id for r in records] == ["1", "b7", "1", "77", "78"]
    a, b = by_file["a.jpg"], by_file["b.jpg"]
    assert a.error is None and [o.error for o in a.objects] == ["unknown category id 999", None]
    assert math.isnan(a.objects[1].box_raw[0]) and a.objects[1].box_raw[1:] == [1, 2, 2]
    assert b.objects[0].error.startswith("bbox is not 4 numbers: [1, 2, 3]")
    assert b.objects[1].error == "duplicate annotation id 2"
    assert b.objects[1].box_raw == [0, 0, -4, 3]  # negative size passes through for the pipeline
    dup = by_file["a_again.jpg"]
    assert (dup.error, dup.error_status, dup.objects) == ("duplicate image id", "duplicate", [])
    orphans = [r for r in records if not r.file]
    assert [(r.image_id, r.error, r.error_status, len(r.objects)) for r in orphans] == [
        ("77", "annotation refers to unknown image id 77", "invalid", 2),
        ("78", "annotation refers to unknown image id 78", "invalid", 1)]
    assert orphans[1].objects[0].error == 'category_id is not an integer: "five"'
    assert sum(len(r.objects) for r in records) == len(doc["annotations"])


def test_masks_polygon_rle_and_crowd_match_pycocotools(tmp_path):
    h, w = 30, 40
    fortran = np.asfortranarray(np.pad(np.ones((5, 6), np.uint8), ((3, 22), (4, 30))))
    compressed = mask_utils.encode(fortran)
    compressed["counts"] = compressed["counts"].decode()
    doc = {
        "images": [{"id": 1, "file_name": "m.png", "width": w, "height": h}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "iscrowd": 0,
             "segmentation": [[2, 2, 12, 2, 12, 12], [20, 20, 25, 20, 25, 28, 20, 28]]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [4, 3, 6, 5], "iscrowd": 0,
             "segmentation": compressed},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 2], "iscrowd": 1,
             "segmentation": {"size": [h, w], "counts": [0, 2, h * w - 2]}},
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "segmentation": []},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = _write(tmp_path, doc)
    (obj_poly, obj_rle, obj_crowd, obj_none), = [r.objects for r in _records(path)]
    coco = COCO(str(path))  # the reference reader
    for obj, ann_id in ((obj_poly, 1), (obj_rle, 2), (obj_crowd, 3)):
        expected = coco.annToMask(coco.loadAnns([ann_id])[0])
        got = decode([obj.gt_mask])[0]
        assert obj.gt_mask["height"] == h and obj.gt_mask["width"] == w
        np.testing.assert_array_equal(got, expected)
        assert got.sum() > 0
    assert obj_crowd.iscrowd and not obj_poly.iscrowd
    assert obj_none.gt_mask is None


@pytest.mark.parametrize(
    "text, position, reason",
    [
        (b'{"images": [{"id": 1, "file_name": "a"}],\n "annotations": [{"id": 1,}],'
         b' "categories": []}', "near byte 68 (line 2, column 27)", "invalid object key"),  # the }
        (b'{"images": [], "annotations": [', "near byte 31", "premature EOF"),
        (b'{"images": [], "annotations": [], "categories": [{"id": 1, "name": NaN}]}',
         "near byte 67", "invalid char"),  # the N of NaN
        (b'{"images": [], "annotations": []}', "$", "missing top-level key 'categories'"),
        (b'{"annotations": [], "categories": []}', "$", "missing top-level key 'images'"),
        (b'{"images": [], "categories": []}', "$", "missing top-level key 'annotations'"),
        (b'{"images": {"id": 1}, "annotations": [], "categories": []}', "images",
         "expected an array, got object"),
        (b'[1, 2]', "byte 0", "top level is not a JSON object"),
        (b'{"images": [{"id": 1, "file_name": "a"}, {"id": [2], "file_name": "b"}],'
         b' "annotations": [], "categories": []}', "images[1].id", "integer or a string"),
        (b'{"images": [{"id": 1}], "annotations": [], "categories": []}', "images[0]",
         "'file_name' must be a string"),
        (b'{"images": [], "annotations": [{"id": 1, "image_id": 1}, {"id": 2}],'
         b' "categories": []}', "annotations[1]", "missing 'image_id'"),
        (b'{"images": [], "annotations": [3], "categories": []}', "annotations[0]",
         "expected an object, got int"),
        (b'{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"},'
         b' {"id": 1, "name": "b"}]}', "categories[1]", "duplicate category id 1"),
    ],
)
def test_malformed_files_fail_fast_naming_file_position_and_reason(tmp_path, text, position,
                                                                   reason):
    path = tmp_path / "bad.json"
    path.write_bytes(text)
    with pytest.raises(ValueError) as err:
        _records(path)
    message = str(err.value)
    assert str(path) in message and position in message and reason in message, message


def test_error_offset_points_at_the_bad_byte_deep_in_a_large_file(tmp_path):
    good = b'{"id": 1, "file_name": "a.jpg", "width": 3, "height": 4},'
    body = b'{"images": [' + good * 20_000  # ~1.1 MB: the error is many chunks in
    bad_at = len(body) + len(b'{"id": 2 ')
    path = tmp_path / "deep.json"
    path.write_bytes(body + b'{"id": 2 "file_name": "b"}], "annotations": [], "categories": []}')
    with pytest.raises(ValueError, match="near byte") as err:
        _records(path)
    offset = int(str(err.value).split("near byte ")[1].split()[0])
    assert abs(offset - bad_at) <= 2, (offset, bad_at)


def test_index_is_reused_from_cache_dir_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    path = _write(tmp_path, _doc(n_images=2))
    calls = []
    real = stream_mod.build_index
    monkeypatch.setattr("pipelines.sources.coco.build_index",
                        lambda *a: calls.append(a) or real(*a))
    first = _records(path, cache_dir=tmp_path / "cache")
    second = _records(path, cache_dir=tmp_path / "cache")
    assert first == second and len(calls) == 1
    doc = _doc(n_images=3)
    path.write_text(json.dumps(doc) + " ")  # new size: a stale index must not be used
    assert len(_records(path, cache_dir=tmp_path / "cache")) == 3 and len(calls) == 2


def test_open_source_cli_contract(tmp_path):
    path = _write(tmp_path, _doc(n_images=2), name="instances_val2017.json")
    src = open_source(SourceConfig(name="coco", annotations=path))
    assert (src.name, src.split, src.root, src.annotation_file) == (
        "coco", "instances_val2017", tmp_path, path)
    assert len(list(src.records())) == 2
    with pytest.raises(ValueError, match="--annotations"):
        open_source(SourceConfig(name="coco", root=tmp_path))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        open_source(SourceConfig(name="coco", annotations=tmp_path / "nope.json"))
