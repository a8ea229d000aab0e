"""The coco-index plan: units by range of the annotation index, read straight from it.

Checked against the records plan (every record as JSON text) of the same source, unit by unit,
and in a run: the index lives in the run's `_plan/` and a resume reads it without rebuilding it.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from pipelines.captioners import CaptionerConfig
from pipelines.maskers import MaskerConfig
from pipelines.plan import (
    COCO_INDEX,
    INDEX_PLAN_SCHEMA,
    open_plan,
    read_unit,
    write_index_plan,
    write_plan,
)
from pipelines.sources import SourceConfig, coco
from pipelines.sources.coco import CocoSource
from pipelines.synthesize import SynthesizeConfig, run
from tests.helpers.coco_fixture import write_coco


@pytest.fixture
def source(tmp_path):
    root = tmp_path / "data"
    ann = write_coco(root, n_images=10, objects_per_image=3, bad=True)
    return CocoSource("coco", "val", root, ann, cache_dir=tmp_path / "run" / "_plan")


def _text(records) -> list[str]:
    return [json.dumps(r.to_dict(), sort_keys=True) for r in records]  # NaN boxes compare equal


@pytest.mark.parametrize("unit_size, limit", [(3, None), (1, None), (4, 7), (100, None)])
def test_index_plan_units_equal_the_records_plan_of_the_same_source(source, tmp_path, unit_size,
                                                                    limit):
    records = list(source.records())[:limit]
    by_text = write_plan(iter(records), tmp_path / "records.parquet", unit_size, "fp")
    path = tmp_path / "run" / "_plan" / "plan.parquet"
    by_range = write_index_plan(source.index(), path, unit_size, "fp", limit=limit)
    assert by_range.kind == COCO_INDEX
    assert (by_range.num_units, by_range.num_images, by_range.num_objects) == (
        by_text.num_units, by_text.num_images, by_text.num_objects)
    for unit in range(by_text.num_units):
        assert _text(read_unit(path, unit, source)) == _text(read_unit(by_text.path, unit))
    assert pq.read_schema(path).remove_metadata() == INDEX_PLAN_SCHEMA  # no record text in it
    reopened = open_plan(path, "fp")
    assert (reopened.kind, reopened.num_units, reopened.num_images, reopened.num_objects) == (
        COCO_INDEX, by_text.num_units, by_text.num_images, by_text.num_objects)


def test_an_index_plan_is_not_reused_without_its_index_or_for_another_fingerprint(source,
                                                                                tmp_path):
    path = tmp_path / "run" / "_plan" / "plan.parquet"
    write_index_plan(source.index(), path, 3, "fp")
    assert open_plan(path, "other") is None
    with pytest.raises(ValueError, match="read through its coco source"):
        read_unit(path, 0)
    (source.index().folder / "index.json").unlink()
    assert open_plan(path, "fp") is None  # an incomplete index: plan again


def _config(root, ann, out, **over):
    kw = dict(source=SourceConfig("coco", root, ann, "val"), out=out,
              masker=MaskerConfig(name="box"), captioner=CaptionerConfig(name="none"),
              unit_size=2, executor="local")
    return SynthesizeConfig(**{**kw, **over})


def _rows(out, table):
    return sorted(json.dumps(r, sort_keys=True, default=str)
                  for r in pq.read_table(out / table).to_pylist())


def test_a_resumed_run_reads_the_index_in_its_plan_folder_without_rebuilding_it(tmp_path,
                                                                               monkeypatch):
    root = tmp_path / "data"
    ann = write_coco(root, n_images=7, objects_per_image=2, bad=True)
    builds = []
    real = coco.build_index
    monkeypatch.setattr(coco, "build_index", lambda *a: builds.append(a) or real(*a))
    out = tmp_path / "out"
    first = run(_config(root, ann, out))
    assert len(builds) == 1 and builds[0][1].parent == out / "_plan"
    before = {t: _rows(out, t) for t in ("images", "objects")}
    (out / "objects" / "part-00001.parquet").unlink()  # a lost unit: redone from the index
    resumed = run(_config(root, ann, out))
    assert resumed.units_written == 1 and resumed.units_skipped == first.units_total - 1
    assert len(builds) == 1
    assert {t: _rows(out, t) for t in ("images", "objects")} == before
    clean = run(_config(root, ann, tmp_path / "clean"))
    assert {t: _rows(tmp_path / "clean", t) for t in ("images", "objects")} == before
    assert first.totals == resumed.totals == clean.totals
    assert first.input_objects == sum(first.totals[k] for k in ("kept", "filtered", "rejected"))


def test_overwrite_after_the_file_changed_keeps_only_the_new_index(tmp_path):
    root = tmp_path / "data"
    ann = write_coco(root, n_images=4, objects_per_image=2)
    out = tmp_path / "out"
    run(_config(root, ann, out))
    doc = json.loads(ann.read_text())
    doc["annotations"] = doc["annotations"][:-1]
    ann.write_text(json.dumps(doc))
    again = run(_config(root, ann, out, overwrite=True))
    assert again.input_objects == 7
    assert len(list((out / "_plan").glob("coco-index-*"))) == 1


def test_sort_memory_is_a_quarter_of_the_file_within_64mb_and_1gb():
    assert [coco.sort_memory(n) for n in (10**6, 2 * 10**9, 10**11)] == [
        "64MiB", f"{2 * 10**9 // 4 // 2**20}MiB", "1024MiB"]
