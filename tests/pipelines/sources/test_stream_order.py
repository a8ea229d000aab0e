"""The sort-free paths of `build_index` (during the scan, and after it from the raw files): taken
when the annotations come grouped by image in `images` order, and then writing exactly the files
DuckDB's sort writes; an out-of-order file takes the sort and gives the same records as the
ordered one, also when the order breaks after part of the file was written in final form."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.sources import sortfree, stream
from pipelines.sources.stream import build_index, iter_records

FILES = ("images.parquet", "annotations.parquet", "orphans.parquet")


def _doc(rng: random.Random, n_images: int = 40, repeat_ann_ids: bool = True) -> dict:
    """Annotations grouped by image in images order; some images have none, some annotation
    ids repeat, a few entries take the per-entry path (a bad box, a segmentation)."""
    images = [{"id": 7 + 3 * i, "file_name": f"{i}.jpg", "width": 64, "height": 48}
              for i in range(n_images)]
    anns: list[dict] = []
    for image in images:
        for _ in range(rng.choice([0, 0, 1, 3, 7])):
            k = len(anns)
            ann = {"id": (k % 3 if repeat_ann_ids and k % 5 == 0 else 1000 + k),
                   "image_id": image["id"], "category_id": rng.choice([1, 2]),
                   "bbox": [rng.uniform(0, 9), 1, rng.uniform(1, 9), 2 + k % 5], "iscrowd": 0,
                   "isfake": rng.randrange(2)}
            if k % 17 == 5:
                ann["bbox"] = [1, 2, 3]
            if k % 23 == 7:
                ann["segmentation"] = [[1, 1, 5, 1, 5, 5]]
            anns.append(ann)
    return {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def _write(tmp_path: Path, name: str, doc: dict) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def _rows(folder: Path) -> dict[str, list[dict]]:
    return {f: pq.read_table(folder / f).to_pylist() for f in FILES}


def _records(index) -> list[tuple]:
    out = []
    for records, anns in iter_records(index, step=7):
        rows, ann_rows = records.to_pylist(), anns.to_pylist()
        at = 0
        for r in rows:
            group = ann_rows[at:at + r["ann_count"]]
            at += r["ann_count"]
            r.pop("ann_start")
            out.append((r, [{k: v for k, v in a.items() if k != "img_ord"} for a in group]))
    return out


def _no_sort(*args):
    raise AssertionError("the DuckDB sort ran on an ordered file")


def _no_walk_after_the_scan(*args):
    raise AssertionError("the annotations were not written during the scan")


def _small_batches(monkeypatch) -> None:
    monkeypatch.setattr(stream, "BATCH_ROWS", 6)  # runs of one image cut across scan batches
    monkeypatch.setattr(sortfree, "WALK_ROWS", 5)  # ... and across read-back batches
    monkeypatch.setattr(sortfree, "ROW_GROUP", 3)


@pytest.mark.parametrize("when", ["during_scan", "after_scan"])
@pytest.mark.parametrize("case", ["repeat_ann_ids", "distinct_ann_ids", "no_annotations"])
def test_ordered_file_skips_the_sort_and_writes_what_the_sort_writes(tmp_path, monkeypatch, case,
                                                                     when):
    doc = _doc(random.Random(1), repeat_ann_ids=case == "repeat_ann_ids")
    if case == "no_annotations":
        doc["annotations"] = []
    path = _write(tmp_path, "ordered", doc)
    _small_batches(monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(stream, "STREAM_IN_ORDER", False)
        m.setattr(sortfree, "write_in_order", lambda *a: False)  # the sort, as before
        sorted_index = build_index(path, tmp_path / "sorted", "64MB")
    with monkeypatch.context() as m:
        m.setattr(stream, "_group", _no_sort)
        if when == "during_scan":
            m.setattr(sortfree, "write_in_order", _no_walk_after_the_scan)
        else:
            m.setattr(stream, "STREAM_IN_ORDER", False)
        fast_index = build_index(path, tmp_path / "fast", "64MB")
    fast, by_sort = _rows(tmp_path / "fast"), _rows(tmp_path / "sorted")
    assert fast == by_sort
    assert any(a["duplicate"] for a in fast["annotations.parquet"]) == (case == "repeat_ann_ids")
    assert len(fast["annotations.parquet"]) == len(doc["annotations"])
    assert (fast_index.n_images, fast_index.n_annotations, fast_index.n_orphans) == (
        sorted_index.n_images, sorted_index.n_annotations, sorted_index.n_orphans)
    assert sorted(p.name for p in (tmp_path / "fast").iterdir()) == sorted(FILES)


def _reordered(doc: dict, how: str) -> dict:
    anns = list(doc["annotations"])
    if how == "shuffled":
        random.Random(5).shuffle(anns)
    elif how == "reversed":  # grouped by image, but not in images order
        anns.reverse()
    elif how == "orphan":  # an unknown image id in the middle
        anns.insert(len(anns) // 2, {**anns[0], "id": 99999, "image_id": 123456})
    elif how == "duplicate_image":
        return {**doc, "images": doc["images"] + [doc["images"][3]], "annotations": anns}
    return {**doc, "annotations": anns}


def _by_image(records: list[tuple]) -> list[tuple]:
    """Records with their annotations in a canonical order (an out-of-order file lists an image's
    annotations in another order)."""
    return [(r, sorted(a, key=lambda x: json.dumps(x, sort_keys=True))) for r, a in records]


@pytest.mark.parametrize("how", ["shuffled", "reversed", "orphan", "duplicate_image"])
def test_out_of_order_file_takes_the_sort_and_gives_the_same_records(tmp_path, monkeypatch, how):
    doc = _doc(random.Random(2), repeat_ann_ids=False)
    _small_batches(monkeypatch)  # the order breaks after batches were written in final form
    sorts = []
    real = stream._group
    monkeypatch.setattr(stream, "_group", lambda *a: sorts.append(a) or real(*a))
    ordered = build_index(_write(tmp_path, "ordered", doc), tmp_path / "o", "64MB")
    assert not sorts
    other_doc = _reordered(doc, how)
    other = build_index(_write(tmp_path, how, other_doc), tmp_path / "x", "64MB")
    assert len(sorts) == 1
    assert not (tmp_path / "x" / "raw_anns.parquet").exists()
    got, want = _by_image(_records(other)), _by_image(_records(ordered))
    if how == "orphan":
        assert other.n_orphans == 1 and got[-1][0]["key"] == "123456"
        got = got[:-1]
    if how == "duplicate_image":
        assert got[-1][0]["duplicate"] and got[-1][1] == []
        got = got[:-1]
    if how in ("shuffled", "reversed"):
        # The records carry their annotations' ordinal in the file: compare without it.
        got = [(r, [{k: v for k, v in a.items() if k != "ord"} for a in anns]) for r, anns in got]
        want = [(r, [{k: v for k, v in a.items() if k != "ord"} for a in anns])
                for r, anns in want]
    assert got == want


@pytest.mark.parametrize("ann_id", ["a{k}", "00{k}"])
def test_annotation_ids_that_are_not_canonical_integers_take_the_sort(tmp_path, monkeypatch,
                                                                      ann_id):
    doc = _doc(random.Random(3), repeat_ann_ids=False)
    for k, ann in enumerate(doc["annotations"]):
        ann["id"] = ann_id.format(k=k % 7)  # "007" and "7" would be one integer
    doc["annotations"][0]["id"] = "7"
    sorts = []
    real = stream._group
    monkeypatch.setattr(stream, "_group", lambda *a: sorts.append(a) or real(*a))
    build_index(_write(tmp_path, "ids", doc), tmp_path / "x", "64MB")
    assert len(sorts) == 1
