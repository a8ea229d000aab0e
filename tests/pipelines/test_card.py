"""The dataset card and stats.json of a run: `datasets.load_dataset(RUN_DIR, "objects")` works,
and the calls the card recommends for pandas and DuckDB read exactly the run's rows."""

from __future__ import annotations

import json
from collections import Counter

import datasets
import duckdb
import pandas as pd
import pytest
import yaml

from pipelines.card import source_licences, write_dataset_card, write_stats
from schemas.runs import open_run, read_manifest
from tests.helpers.runs import read_table, synthesize_photos


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = synthesize_photos(tmp_path_factory.mktemp("card"))
    write_dataset_card(out, read_manifest(out))
    return out


def _front(run_dir) -> dict:
    text = (run_dir / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.mark.parametrize("table", ["objects", "images"])
def test_load_dataset_reads_each_table(run_dir, table):
    expected = read_table(run_dir, table)
    loaded = datasets.load_dataset(str(run_dir), table)
    (split,) = loaded.keys()
    ds = loaded[split]
    assert ds.num_rows == len(expected)
    assert set(ds.column_names) == set(expected[0])
    key = "object_id" if table == "objects" else "image_id"
    assert sorted(ds[key]) == sorted(r[key] for r in expected)


def test_card_lists_exactly_the_manifest_parts(run_dir):
    run = open_run(run_dir)
    (run_dir / "objects" / "part-99999.parquet").write_bytes(b"stale, not part of the run")
    try:
        configs = {c["config_name"]: c for c in _front(run_dir)["configs"]}
        for table in ("objects", "images"):
            paths = configs[table]["data_files"][0]["path"]
            assert [str(run_dir / p) for p in paths] == run.files(table)
        assert datasets.load_dataset(str(run_dir), "objects")[
            configs["objects"]["data_files"][0]["split"]].num_rows == len(
            read_table(run_dir, "objects"))
    finally:
        (run_dir / "objects" / "part-99999.parquet").unlink()


def test_card_states_provenance_counts_and_the_right_readers(run_dir):
    text = (run_dir / "README.md").read_text()
    totals = read_manifest(run_dir)["totals"]
    status = Counter(o["status"] for o in read_table(run_dir, "objects"))
    assert f"| {totals['objects']} | {status['kept']} | {status['filtered']} | " \
           f"{status['rejected']} |" in text
    assert "masker `grabcut`" in text and "captioner `template`" in text
    # the documented calls work and read one table, not both
    run = open_run(run_dir)
    frame = pd.concat(pd.read_parquet(f) for f in run.files("objects"))
    assert len(frame) == totals["objects"] and "object_id" in frame.columns
    files = run.files("objects")
    con = duckdb.connect()
    assert con.execute(f"SELECT count(*) FROM read_parquet({files})").fetchone()[0] == len(frame)
    with pytest.raises(ValueError, match="not a parquet file"):  # what the card warns about
        pd.read_parquet(run_dir)


def test_licences_come_from_the_source_annotation_file(tmp_path):
    ann = tmp_path / "a.json"
    lic = [{"id": 1, "name": "CC BY 4.0", "url": "https://creativecommons.org/licenses/by/4.0/"}]
    ann.write_text(json.dumps({"info": {}, "licenses": lic, "images": [], "annotations": []}))
    assert source_licences({"source": {"annotation_file": str(ann)}}) == lic
    late = tmp_path / "late.json"  # licences after the annotations: not scanned for
    late.write_text(json.dumps({"annotations": [], "licenses": lic}))
    assert source_licences({"source": {"annotation_file": str(late)}}) == []
    assert source_licences({"source": {"licenses": lic}}) == lic


def test_stats_json_counts_match_the_shards(run_dir):
    manifest = read_manifest(run_dir)
    stats = json.loads(write_stats(run_dir, manifest, wall_s=2.0).read_text())
    objects = read_table(run_dir, "objects")
    codes = Counter((o["status"], o["reject_code"]) for o in objects if not o["keep"])
    got = {(s, c): n for s, by in stats["not_kept_by_code"].items() for c, n in by.items()}
    assert got == codes
    assert stats["totals"]["objects"] == len(objects) == stats["input_objects"]
    assert stats["rates"]["objects_per_s"] == pytest.approx(len(objects) / 2.0)
    assert sum(u["objects"] for u in stats["units"].values()) == len(objects)
    assert list(stats["units"]) == sorted(manifest["units"])

