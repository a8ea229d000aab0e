"""The one-pass reader: the scanner against json.load, the column fast path against the per-entry
checks, and the Parquet index read back by record range against json.load of the same file."""

from __future__ import annotations

import json
import random

import pytest

from pipelines.sources import rows, scan
from pipelines.sources.coco import CocoSource
from pipelines.sources.rows import (
    ANNS_SCHEMA,
    IMAGES_SCHEMA,
    _ann_row,
    _image_row,
    _table,
    _uniform_ann_table,
    _uniform_image_table,
    ann_table,
    image_table,
)


def _doc(rng: random.Random, n_images: int = 30) -> dict:
    images = [{"id": 100 + i, "file_name": f"img {i} \u00e9\"q\".jpg", "width": 640,
               "height": 480} for i in range(n_images)]
    anns = []
    for k in range(n_images * 4):
        anns.append({"id": k + 1, "image_id": 100 + rng.randrange(n_images + 2),  # some unknown
                     "category_id": rng.choice([1, 2, 3]),
                     "bbox": [rng.uniform(0, 9), 0, rng.uniform(1, 50), 1.5 + k],
                     "iscrowd": 0, "area": 1.0, "isfake": rng.randrange(2), "note": "x" * k})
    return {"info": {"a": [1, {"b": None}]}, "images": images, "annotations": anns,
            "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}


@pytest.mark.parametrize("indent", [None, 1, "\t"])
def test_scanner_yields_what_json_load_reads_across_every_window_boundary(tmp_path, monkeypatch,
                                                                         indent):
    # Windows of 64 characters with 8 of lookahead: elements and numbers are cut everywhere.
    monkeypatch.setattr(scan, "CHUNK_CHARS", 64)
    monkeypatch.setattr(scan, "LOOKAHEAD", 8)
    doc = _doc(random.Random(0))
    path = tmp_path / "a.json"
    path.write_text(json.dumps(doc, indent=indent, separators=(" , ", " : ") if indent else None))
    got: dict[str, list] = {"images": [], "annotations": []}
    starts: dict[str, list] = {"images": [], "annotations": []}

    def consumer(name):
        return lambda items, start: (got[name].extend(items), starts[name].append(start))

    kept, types = scan.scan(path, {k: consumer(k) for k in got}, ("categories", "info"), batch=7)
    assert got["images"] == doc["images"] and got["annotations"] == doc["annotations"]
    assert starts["annotations"] == list(range(0, len(doc["annotations"]), 7))
    assert kept == {"categories": doc["categories"], "info": doc["info"]}
    assert types == {"info": "object", "images": "array", "annotations": "array",
                     "categories": "array"}


@pytest.mark.parametrize("text", [
    '{"images": [1, 2,, 3], "annotations": [], "categories": []}',
    '{"images": [1, 2 3], "annotations": [], "categories": []}',
    '{"images": [NaN], "annotations": [], "categories": []}',
    '{"images": [], "annotations": [{"id": 1}', '{"images": []} x', '[1]',
])
def test_scanner_refuses_what_json_does_not_allow(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(scan.SyntaxProblem):
        scan.scan(path, {"images": lambda *a: None, "annotations": lambda *a: None}, (), 4)


def _slow(items: list, start: int):
    return _table([_ann_row(item, start + i, "f.json") for i, item in enumerate(items)],
                  ANNS_SCHEMA)


def _same(a, b) -> bool:
    """Equal tables, NaN equal to NaN (a null box coordinate is NaN on both paths)."""
    return a.schema == b.schema and repr(a.to_pylist()) == repr(b.to_pylist())


def _outcome(read) -> tuple:
    """A table's rows, or the file error both paths must raise alike (a fractional id...)."""
    try:
        return "rows", repr(read().to_pylist())
    except ValueError as e:
        return "error", str(e)


def _good(n: int = 50) -> list[dict]:
    rng = random.Random(1)
    return [{"id": 10 + i, "image_id": 3 + i % 4, "category_id": 7, "iscrowd": i % 3 == 0,
             "bbox": [rng.choice([0, 1, 2.5]), rng.random(), 3, rng.random() * 1e6],
             "area": 2.0, "isfake": i % 2, "isreflected": i % 5 == 0} for i in range(n)]


def test_uniform_batches_take_the_column_path_and_equal_the_per_entry_checks():
    items = _good()
    fast = _uniform_ann_table(items, 40)
    assert fast is not None
    assert _same(fast, _slow(items, 40))
    assert fast.column("attributes")[0].as_py() == '{"isfake": 0, "isreflected": true}'


def _bad(key, value):
    def edit(items):
        items[17][key] = value
    return edit


EDITS = {
    "bool in bbox": _bad("bbox", [1, True, 3, 4]),
    "null in bbox": _bad("bbox", [1, None, 3, 4]),
    "3-number bbox": _bad("bbox", [1, 2, 3]),
    "bbox is text": _bad("bbox", "1 2 3 4"),
    "float category": _bad("category_id", 7.0),
    "fractional id": _bad("id", 1.5),
    "text id": _bad("id", "abc"),
    "huge id": _bad("id", 2**70),
    "bool image id": _bad("image_id", True),
    "null category": _bad("category_id", None),
    "float attribute": _bad("isfake", 0.5),
    "text attribute": _bad("isfake", "yes"),
    "list attribute": _bad("isfake", [1, 2]),
    "crowd as text": _bad("iscrowd", "no"),
    "segmentation": _bad("segmentation", [[0, 0, 1, 0, 1, 1]]),
    "missing key": lambda items: items[3].pop("isreflected"),
    "extra key": _bad("z", 1),
}


@pytest.mark.parametrize("edit", list(EDITS), ids=list(EDITS))
def test_any_odd_entry_gives_the_per_entry_result(edit):
    items = _good()
    EDITS[edit](items)
    assert _outcome(lambda: ann_table(items, 5, "f.json")) == _outcome(lambda: _slow(items, 5))
    if edit not in ("extra key", "missing key", "float attribute", "text attribute",
                    "list attribute"):
        assert _uniform_ann_table(items, 5) is None


def _images(n: int = 30) -> list[dict]:
    return [{"id": 5 + i, "file_name": f"{i}.jpg", "width": 640 + i, "height": 480, "url": ""}
            for i in range(n)]


def _slow_images(items: list, start: int):
    return _table([_image_row(item, start + i, "f.json") for i, item in enumerate(items)],
                  IMAGES_SCHEMA)


IMAGE_EDITS = {
    "text ids": lambda items: [item.update(id=f"a{i}") for i, item in enumerate(items)],
    "no sizes": lambda items: [(item.pop("width"), item.pop("height")) for item in items],
    "one size null": _bad("width", None),
    "one size missing": lambda items: items[3].pop("height"),
}
ODD_IMAGES = {
    "float id": _bad("id", 7.0),
    "fractional id": _bad("id", 7.5),
    "bool id": _bad("id", True),
    "text and integer ids": _bad("id", "x"),
    "huge id": _bad("id", 2**70),
    "missing id": lambda items: items[4].pop("id"),
    "null file name": _bad("file_name", None),
    "file name a number": _bad("file_name", 3),
    "float width": _bad("width", 640.5),
    "bool height": _bad("height", True),
    "text width": _bad("width", "640"),
    "not an object": lambda items: items.__setitem__(2, [1, 2]),
}


@pytest.mark.parametrize("edit", [None, *IMAGE_EDITS], ids=["plain", *IMAGE_EDITS])
def test_uniform_image_batches_take_the_column_path_and_equal_the_per_entry_rows(edit):
    items = _images()
    if edit:
        IMAGE_EDITS[edit](items)
    fast = _uniform_image_table(items, 9)
    assert fast is not None
    assert _same(fast, _slow_images(items, 9))


@pytest.mark.parametrize("edit", list(ODD_IMAGES), ids=list(ODD_IMAGES))
def test_any_odd_image_gives_the_per_entry_result(edit):
    items = _images()
    ODD_IMAGES[edit](items)
    assert _uniform_image_table(items, 9) is None
    assert (_outcome(lambda: image_table(items, 9, "f.json"))
            == _outcome(lambda: _slow_images(items, 9)))


def test_an_entry_that_is_not_an_object_is_still_a_file_error():
    items = _good()
    items[9] = [1, 2]
    with pytest.raises(ValueError, match=r"annotations\[9\]: expected an object"):
        rows.ann_table(items, 0, "f.json")


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_records_by_range_equal_json_load_of_the_file(tmp_path, step):
    doc = _doc(random.Random(2))
    doc["images"].append(dict(doc["images"][3]))  # a duplicate image id
    doc["annotations"][5]["bbox"] = [1, 2]  # a bad box: the per-entry path for that batch
    path = tmp_path / "a.json"
    path.write_text(json.dumps(doc))
    src = CocoSource("coco", "val", tmp_path, path, cache_dir=tmp_path / "cache")
    index = src.index()
    got = []
    for first in range(0, index.n_records, step):
        got += src.range_records(index.folder, first, first + step)
    assert [r.index for r in got] == list(range(len(got)))
    by_image: dict[int, list] = {}
    for a in doc["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    known = [i["id"] for i in doc["images"]]
    unknown = sorted({a["image_id"] for a in doc["annotations"]} - set(known), key=str)
    expected = [(str(i), [a["id"] for a in by_image.get(i, [])] if n != 30 else [])
                for n, i in enumerate(known)]
    expected += [(str(i), [a["id"] for a in by_image[i]]) for i in unknown]
    assert [(r.image_id, [int(o.ann_id) for o in r.objects]) for r in got] == expected
    assert got[30].error_status == "duplicate" and got[-1].error_status == "invalid"
    bad = [o for r in got for o in r.objects if o.ann_id == "6"]
    assert bad[0].error_code == "box_invalid" and bad[0].box_raw == []
    first = next(o for r in got for o in r.objects if o.ann_id == "1")
    assert first.box_raw == doc["annotations"][0]["bbox"]
    assert first.attributes == {"isfake": doc["annotations"][0]["isfake"], "note": ""}
    assert [r.to_dict() for r in src.records()] == [
        {**r.to_dict(), "index": None} for r in got]


def test_bad_json_early_in_a_large_file_is_reported_without_reading_the_rest(tmp_path,
                                                                             monkeypatch):
    monkeypatch.setattr(scan, "CHUNK_CHARS", 1024)
    monkeypatch.setattr(scan, "LOOKAHEAD", 64)
    windows = []
    real = scan._Text.more

    def more(self):
        real(self)
        windows.append(len(self.text))

    monkeypatch.setattr(scan._Text, "more", more)
    path = tmp_path / "bad.json"
    good = '{"id": 1, "file_name": "a.jpg"}, '
    path.write_text('{"images": [' + good * 10 + '{"id": 2 "x": 1}, ' + good * 100_000 + "]}")
    with pytest.raises(scan.SyntaxProblem):
        scan.scan(path, {"images": lambda *a: None}, (), 4)
    assert max(windows) < 4096  # the error is met in the first kB: the 3 MB after it stay unread


def test_invalid_utf8_is_one_error_naming_the_file_and_byte(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"images": [{"id": 1, "file_name": "caf\xe9.jpg"}], "annotations": [],'
                     b' "categories": []}')
    with pytest.raises(ValueError) as err:
        CocoSource("coco", "val", tmp_path, path, cache_dir=tmp_path / "c").index()
    assert str(path) in str(err.value) and "byte" in str(err.value), str(err.value)
    assert not any((tmp_path / "c").iterdir())  # the incomplete index is removed


def test_a_value_too_deep_for_the_c_scanner_is_read_by_ijson(tmp_path, monkeypatch):
    monkeypatch.setattr(scan, "CHUNK_CHARS", 4096)  # the deep value spans many windows
    monkeypatch.setattr(scan, "LOOKAHEAD", 64)
    deep = "[" * 20_000 + "]" * 20_000
    path = tmp_path / "deep.json"
    path.write_text('{"images": [1, {"s": "]["}, ' + deep + ', 2], "categories": ' + deep + "}")
    got = []
    kept, _ = scan.scan(path, {"images": lambda items, start: got.extend(items)},
                        ("categories",), 2)
    depth, value = 0, got[2]
    while value:
        value, depth = value[0], depth + 1
    assert got[:2] == [1, {"s": "]["}] and got[3] == 2 and depth == 19_999
    assert isinstance(kept["categories"], list)


def test_a_top_level_array_given_twice_keeps_both_in_file_order(tmp_path):
    path = tmp_path / "twice.json"
    path.write_text('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": '
                    '[{"id": 1, "image_id": 2, "category_id": 1, "bbox": [1, 2, 3, 4]}], '
                    '"images": [{"id": 2, "file_name": "b.jpg"}], '
                    '"categories": [{"id": 1, "name": "c"}]}')
    records = list(CocoSource("coco", "val", tmp_path, path, cache_dir=tmp_path / "c").records())
    assert [(r.image_id, r.error, len(r.objects)) for r in records] == [
        ("1", None, 0), ("2", None, 1)]


def _tricky_annotations(rng: random.Random, n: int = 120) -> list[dict]:
    """Annotations whose text holds '},' inside strings and nested values, so that the last
    '},' of a window is often not the end of an element."""
    anns = []
    for k in range(n):
        ann = {"id": k, "image_id": k // 3, "category_id": 1, "bbox": [k, 1.5, 2, 3]}
        if k % 4 == 1:
            ann["note"] = 'x}, {"id": 1}, {' * rng.randrange(1, 3)
        if k % 5 == 2:
            ann["parts"] = [{"a": 1}, {"b": [{"c": 2}, {}]}]
        anns.append(ann)
    return anns


@pytest.mark.parametrize("indent", [None, 1])
def test_bulk_runs_end_only_after_whole_elements(tmp_path, monkeypatch, indent):
    # A bulk reader that takes any text strict JSON accepts: the scanner's cut must still hand
    # it only whole elements, and what it declines must come element by element, in order.
    monkeypatch.setattr(scan, "CHUNK_CHARS", 256)
    monkeypatch.setattr(scan, "LOOKAHEAD", 16)
    monkeypatch.setattr(scan, "BULK_TRIES", 10**6)
    doc = {"images": [], "annotations": _tricky_annotations(random.Random(4)), "categories": []}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(doc, indent=indent))
    got: list = []
    runs = {"taken": 0, "declined": 0}

    def bulk(text):
        try:
            items = json.loads("[" + text + "]")
        except json.JSONDecodeError:
            runs["declined"] += 1
            return None
        runs["taken"] += 1
        got.extend(items)
        return len(items)

    scan.scan(path, {"images": lambda *a: None, "annotations": lambda items, _: got.extend(items)},
              (), batch=5, bulk={"annotations": bulk})
    assert got == doc["annotations"]
    # declined: the window's last '},' was inside a string or a nested value
    assert runs["taken"] >= 5 and runs["declined"] >= 2, runs


def _objects365_like(rng: random.Random, n_images: int = 40) -> dict:
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 48}
              for i in range(n_images)]
    anns = []
    for image in images:
        for _ in range(rng.choice([0, 2, 5])):
            anns.append({"id": len(anns), "iscrowd": 0, "area": rng.random(),
                         "bbox": [rng.random() * 9, 1, rng.choice([2, 2.5]), 3],
                         "image_id": image["id"], "category_id": rng.choice([1, 2]),
                         "isfake": rng.randrange(2), "isreflected": 0})
    odd = {5: ("id", 2**70), 17: ("bbox", [1, 2, 3]), 30: ("isfake", True), 44: ("area", None),
           58: ("isreflected", "no"), 71: ("category_id", 7.0), 85: ("bbox", [1, True, 3, 4])}
    for k, (key, value) in odd.items():
        if k < len(anns):
            anns[k][key] = value
    return {"images": images, "annotations": anns,
            "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 7)]}


def test_the_bulk_path_writes_the_index_the_element_path_writes(tmp_path, monkeypatch):
    from pipelines.sources import sortfree, stream

    monkeypatch.setattr(scan, "CHUNK_CHARS", 700)  # a few entries per window
    monkeypatch.setattr(scan, "LOOKAHEAD", 32)
    monkeypatch.setattr(scan, "BULK_TRIES", 10**6)
    monkeypatch.setattr(stream, "BATCH_ROWS", 4)
    path = tmp_path / "o365.json"
    path.write_text(json.dumps(_objects365_like(random.Random(5)), separators=(",", ":")))
    runs = []
    real_bulk = sortfree.AnnSink.bulk
    monkeypatch.setattr(sortfree.AnnSink, "bulk",
                        lambda self, text: runs.append(real_bulk(self, text)) or runs[-1])
    with_bulk = build_index_files(path, tmp_path / "bulk")
    assert sum(r is not None for r in runs) >= 3 and runs.count(None) >= 3, runs
    monkeypatch.setattr(sortfree.AnnSink, "bulk", lambda self, text: None)
    assert with_bulk == build_index_files(path, tmp_path / "entries")


def build_index_files(path, folder) -> dict:
    import pyarrow.parquet as pq

    from pipelines.sources.stream import build_index

    build_index(path, folder, "64MB")
    return {f: pq.read_table(folder / f).to_pylist()
            for f in ("images.parquet", "annotations.parquet", "orphans.parquet")}


@pytest.mark.parametrize("key", ["isreflected", "bbox"])
def test_a_deeply_nested_annotation_value_is_that_object_s_error(tmp_path, key):
    # pyarrow's type inference recursed into such a value and crashed the process (segfault).
    deep = "[" * 20_000 + "]" * 20_000
    anns = [json.dumps({"id": k, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4],
                        "isreflected": 0}) for k in range(6)]
    anns[3] = anns[3].replace(f'"{key}": ' + ("[1, 2, 3, 4]" if key == "bbox" else "0"),
                              f'"{key}": {deep}')
    path = tmp_path / "deep.json"
    path.write_text('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": ['
                    + ", ".join(anns) + '], "categories": [{"id": 1, "name": "a"}]}')
    records = list(CocoSource("coco", "train", tmp_path, path).records())
    objects = records[0].objects
    assert len(objects) == 6
    assert [o.error is not None for o in objects] == [False, False, False, True, False, False]
