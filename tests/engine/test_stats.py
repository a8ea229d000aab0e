"""`engine stats`: reject and filter reasons counted per reject_code (with one example reason each),
and a machine-readable --format json."""

import json

import duckdb
import pytest

from engine.cli import main
from schemas import REJECT_CODES
from schemas.runs import open_run
from tests.helpers.coco_fixture import write_coco

SECTION = "reject and filter reasons by code"


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    """A COCO dataset with one of each bad record (missing/corrupt/escaping image, NaN, empty and
    outside boxes, unknown category) through the box masker."""
    tmp = tmp_path_factory.mktemp("stats")
    ann = write_coco(tmp / "ds", bad=True)
    out = tmp / "out"
    assert main(["synthesize", "--source", "coco", "--root", str(tmp / "ds"), "--annotations",
                 str(ann), "--out", str(out), "--executor", "local", "--masker", "box"]) == 0
    return out


def objects(out) -> str:
    files = ", ".join(f"'{f}'" for f in open_run(out).files("objects"))
    return f"read_parquet([{files}])"


def test_stats_json_counts_rejects_per_code(bad_run, capsys):
    assert main(["stats", str(bad_run), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report[SECTION]
    expected = duckdb.sql(
        f"SELECT status, reject_code, count(*) FROM {objects(bad_run)} WHERE NOT keep "
        "GROUP BY ALL").fetchall()
    assert sorted((r["status"], r["reject_code"], r["objects"]) for r in rows) == sorted(expected)
    assert len(rows) >= 5  # one row per code, not one per object (reasons name values and paths)
    assert {r["reject_code"] for r in rows} <= set(REJECT_CODES)
    reasons = dict(duckdb.sql(
        f"SELECT reject_code, list(reject_reason) FROM {objects(bad_run)} WHERE NOT keep "
        "GROUP BY ALL").fetchall())
    for r in rows:
        assert r["example_reason"] in reasons[r["reject_code"]]
    # every section is there, as row objects keyed by column name
    total = sum(r["objects"] for r in report["objects by source and status"])
    assert total == duckdb.sql(f"SELECT count(*) FROM {objects(bad_run)}").fetchall()[0][0]


def test_stats_table_shows_codes(bad_run, capsys):
    assert main(["stats", str(bad_run)]) == 0
    out = capsys.readouterr().out
    assert SECTION in out
    for code in ("image_missing", "image_corrupt", "unsafe_path", "box_invalid",
                 "category_unknown"):
        assert code in out


def test_stats_unknown_format_is_one_line(bad_run, capsys):
    assert main(["stats", str(bad_run), "--format", "yaml"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: unknown --format 'yaml'; choose one of: table, json")
