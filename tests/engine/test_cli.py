"""End to end through the CLI on the bundled demo data, read back by DuckDB, `datasets` and
pycocotools."""

import json

import duckdb
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from engine.cli import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    code = main(
        [
            "synthesize",
            "--source",
            "demo",
            "--out",
            str(out),
            "--unit-size",
            "8",
            "--executor",
            "local",
        ]
    )
    assert code == 0
    return out


def test_manifest_counts_match_the_shards(demo_run):
    manifest = json.loads((demo_run / "manifest.json").read_text())
    totals = manifest["totals"]
    assert manifest["plan"]["units"] == len(manifest["units"]) == 3  # 21 images / 8
    con = duckdb.connect()
    objects = f"read_parquet('{demo_run}/objects/part-*.parquet')"
    n, kept, filtered, rejected = con.execute(
        f"SELECT count(*), count(*) FILTER (keep), count(*) FILTER (status = 'filtered'), "
        f"count(*) FILTER (status = 'rejected') FROM {objects}"
    ).fetchone()
    assert (n, kept, filtered, rejected) == (
        totals["objects"],
        totals["kept"],
        totals["filtered"],
        totals["rejected"],
    )
    assert n == manifest["plan"]["objects"] == kept + filtered + rejected
    assert kept > 0.8 * n
    origins = {r[0] for r in con.execute(f"SELECT DISTINCT mask_origin FROM {objects}").fetchall()}
    assert "grabcut" in origins
    assert origins <= {"grabcut", "grabcut+ellipse-fallback", "grabcut+box-fallback"}
    # A substitute is never passed off as GrabCut's output: labelled, and filtered by default.
    fallbacks = con.execute(
        f"SELECT DISTINCT status, reject_code FROM {objects} WHERE mask_origin LIKE '%fallback'"
    ).fetchall()
    assert fallbacks in ([], [("filtered", "mask_fallback")])


def test_the_run_folder_loads_as_a_dataset_by_its_card(demo_run):
    import datasets

    totals = json.loads((demo_run / "manifest.json").read_text())["totals"]
    objects = datasets.load_dataset(str(demo_run), "objects", cache_dir=str(demo_run.parent / "c"))
    assert sum(len(split) for split in objects.values()) == totals["objects"]
    stats = json.loads((demo_run / "stats.json").read_text())
    assert stats["totals"]["objects"] == totals["objects"]


def test_datasets_reads_the_shards(demo_run):
    import datasets

    ds = datasets.load_dataset(
        "parquet",
        data_files=str(demo_run / "objects" / "*.parquet"),
        split="train",
        cache_dir=str(demo_run.parent / "hf_cache"),
    )
    manifest = json.loads((demo_run / "manifest.json").read_text())
    assert ds.num_rows == manifest["totals"]["objects"]
    row = ds[0]
    assert set(row["mask"]) == {"counts", "height", "width"}
    assert isinstance(row["captions"], list) and row["captions"][0]["provenance"] == "template"


def test_every_mask_decodes_and_agrees_with_its_columns(demo_run):
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT o.mask, o.mask_area, o.mask_box, i.width, i.height FROM "
        f"read_parquet('{demo_run}/objects/*.parquet') o JOIN "
        f"read_parquet('{demo_run}/images/*.parquet') i USING (image_id) WHERE o.mask IS NOT NULL"
    ).fetchall()
    assert rows
    for mask, area, mask_box, width, height in rows:
        rle = {"size": [mask["height"], mask["width"]], "counts": mask["counts"].encode()}
        decoded = mask_utils.decode(rle)
        assert decoded.shape == (height, width)
        assert int(decoded.sum()) == area == int(mask_utils.area(rle))
        np.testing.assert_allclose(mask_box, mask_utils.toBbox(rle))


def test_query_formats_and_stats(demo_run, capsys):
    sql = "SELECT category, count(*) AS n FROM objects GROUP BY ALL ORDER BY n DESC, category"
    assert main(["query", str(demo_run), sql, "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = duckdb.sql(
        f"SELECT category, count(*) AS n FROM read_parquet('{demo_run}/objects/*.parquet') "
        "GROUP BY ALL ORDER BY n DESC, category"
    ).fetchall()
    assert [(r["category"], r["n"]) for r in result] == expected
    assert (
        main(["query", str(demo_run), "SELECT count(*) AS n FROM captions", "--format", "csv"]) == 0
    )
    n_captions = int(capsys.readouterr().out.splitlines()[1])
    assert (
        n_captions
        == duckdb.connect()
        .execute(f"SELECT sum(len(captions)) FROM read_parquet('{demo_run}/objects/*.parquet')")
        .fetchone()[0]
    )
    assert main(["stats", str(demo_run)]) == 0
    assert "reject and filter reasons" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["synthesize", "--source", "nope", "--out", "x"], "unknown source 'nope'; choose one of"),
        (["synthesize", "--masker", "nope", "--out", "x"], "unknown masker 'nope'; choose one of"),
        (["synthesize", "--unit-size", "0", "--out", "x"], "--unit-size must be >= 1"),
        (["query", "/nonexistent", "SELECT 1"], "/nonexistent: no such folder"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split())


def test_bad_sql_is_a_user_error(demo_run, capsys):
    assert main(["query", str(demo_run), "SELECT nope FROM objects"]) == 2
    assert "query failed" in capsys.readouterr().err


def test_export_coco_is_read_by_pycocotools(demo_run, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dest = tmp_path / "coco.json"
    assert main(["export", str(demo_run), "--to", str(dest)]) == 0
    gt = COCO(str(dest))
    kept = (
        duckdb.connect()
        .execute(
            f"SELECT object_id, mask FROM read_parquet('{demo_run}/objects/*.parquet') WHERE keep "
            "ORDER BY image_id, object_id"
        )
        .fetchall()
    )
    assert len(gt.getAnnIds()) == len(kept)
    by_object = {a["mq_object_id"]: a for a in gt.loadAnns(gt.getAnnIds())}
    for object_id, mask in kept[:10]:
        rle = {"size": [mask["height"], mask["width"]], "counts": mask["counts"].encode()}
        np.testing.assert_array_equal(gt.annToMask(by_object[object_id]), mask_utils.decode(rle))
    # The export evaluated against itself is a perfect score: ids, boxes and masks are consistent.
    anns = [{**a, "score": 1.0} for a in gt.loadAnns(gt.getAnnIds())]
    ev = COCOeval(gt, gt.loadRes(anns), "segm")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_show_draws_a_png(demo_run, tmp_path):
    import cv2

    dest = tmp_path / "show.png"
    assert main(["show", str(demo_run), "--to", str(dest)]) == 0
    img = cv2.imread(str(dest))
    assert img is not None and img.shape[2] == 3


def test_relative_root_is_recorded_absolute(tmp_path, monkeypatch):
    from tests.helpers.coco_fixture import write_coco

    ann = write_coco(tmp_path / "ds", n_images=2)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main(["synthesize", "--source", "coco", "--root", "ds", "--annotations", str(ann),
                 "--out", str(out), "--executor", "local", "--masker", "box"]) == 0
    root = json.loads((out / "manifest.json").read_text())["source"]["root"]
    assert root == str((tmp_path / "ds").resolve())
    monkeypatch.chdir("/")  # a reader elsewhere still finds the images
    assert main(["show", str(out), "--to", str(tmp_path / "s.png")]) == 0
