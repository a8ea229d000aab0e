"""`engine export`: COCO with the source's ids, so pycocotools evaluates it against the user's own
annotation file with no remapping; one SQL condition only in --where; --root for moved data."""

import json
import shutil

import duckdb
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from engine.cli import main
from pipelines.export import EXPORTERS, export_coco
from pipelines.export_select import check_where
from tests.helpers.coco_fixture import write_coco

# ids far from 1..N, so a renumbering export cannot line up with the original by accident
IMAGE_IDS = {1: 1001, 2: 57, 3: 300, 4: 2}
CATEGORY_IDS = {1: 18, 2: 5, 3: 44}


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory):
    """A COCO dataset with sparse ids -> `engine synthesize --masker box`; (original file, run)."""
    tmp = tmp_path_factory.mktemp("export")
    ann = write_coco(tmp / "ds", n_images=4, objects_per_image=3)
    data = json.loads(ann.read_text())
    for image in data["images"]:
        image["id"] = IMAGE_IDS[image["id"]]
    for category in data["categories"]:
        category["id"] = CATEGORY_IDS[category["id"]]
    for k, a in enumerate(data["annotations"]):
        a["id"] = 7000 - 11 * k
        a["image_id"], a["category_id"] = IMAGE_IDS[a["image_id"]], CATEGORY_IDS[a["category_id"]]
    ann.write_text(json.dumps(data))
    out = tmp / "out"
    assert main(["synthesize", "--source", "coco", "--root", str(tmp / "ds"), "--annotations",
                 str(ann), "--out", str(out), "--executor", "local", "--masker", "box"]) == 0
    return ann, out


def export(out, tmp_path, *flags) -> dict:
    dest = tmp_path / "export.json"
    assert main(["export", str(out), "--to", str(dest), *flags]) == 0
    return json.loads(dest.read_text())


def test_export_keeps_the_source_ids(coco_run, tmp_path):
    ann, out = coco_run
    original = json.loads(ann.read_text())
    exported = export(out, tmp_path)
    assert exported["info"]["ids"] == {"images": "source", "annotations": "source",
                                       "categories": "source"}
    files = {i["id"]: i["file_name"] for i in original["images"]}
    assert {i["id"]: i["file_name"] for i in exported["images"]} == files
    assert exported["categories"] == sorted(original["categories"], key=lambda c: c["id"])
    by_id = {a["id"]: a for a in original["annotations"]}
    assert sorted(a["id"] for a in exported["annotations"]) == sorted(by_id)
    for a in exported["annotations"]:
        source = by_id[a["id"]]
        assert (a["image_id"], a["category_id"], a["bbox"]) == (
            source["image_id"], source["category_id"], [float(v) for v in source["bbox"]])


def test_cocoeval_against_the_original_file_scores_the_box_masker_perfectly(coco_run, tmp_path):
    ann, out = coco_run
    results = export(out, tmp_path)["annotations"]
    gt = COCO(str(ann))
    ev = COCOeval(gt, gt.loadRes(results), "bbox")  # same boxes as the source: AP 1
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)
    # segm: the ground truth is the filled box, rasterised here with numpy
    original = json.loads(ann.read_text())
    sizes = {i["id"]: (i["height"], i["width"]) for i in original["images"]}
    for a in original["annotations"]:
        x, y, w, h = a["bbox"]
        m = np.zeros(sizes[a["image_id"]], np.uint8, order="F")
        m[y : y + h, x : x + w] = 1
        a["segmentation"] = {k: v.decode() if k == "counts" else v
                             for k, v in mask_utils.encode(m).items()}
    with_masks = tmp_path / "gt_masks.json"
    with_masks.write_text(json.dumps(original))
    gt = COCO(str(with_masks))
    ev = COCOeval(gt, gt.loadRes(results), "segm")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_score_is_pred_iou_else_box_iou(coco_run, tmp_path):
    _, out = coco_run
    exported = export(out, tmp_path)
    expected = dict(duckdb.sql(
        f"SELECT CAST(source_ann_id AS BIGINT), coalesce(pred_iou, box_iou) "
        f"FROM read_parquet('{out}/objects/*.parquet') WHERE keep").fetchall())
    got = {a["id"]: a["score"] for a in exported["annotations"]}
    assert got == pytest.approx(expected)
    assert all(a["pred_iou"] is None for a in exported["annotations"])  # the box masker has none


def test_non_integer_or_repeated_ids_are_renumbered_and_the_file_says_so(coco_run, tmp_path):
    ann, out = coco_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    # rewrite the shards so that source ids are text, as a hf or demo source may give (readers
    # do not check the unit checksums; only a resumed synthesize does)
    for part in (copy / "images").glob("*.parquet"):
        duckdb.sql(f"COPY (SELECT * REPLACE ('img-' || source_image_id AS source_image_id) "
                   f"FROM '{part}') TO '{part}.new' (FORMAT parquet)")
        (part.parent / (part.name + ".new")).replace(part)
    # ... and one category id for every category
    for part in (copy / "objects").glob("*.parquet"):
        duckdb.sql(f"COPY (SELECT * REPLACE (7 AS source_category_id) "
                   f"FROM '{part}') TO '{part}.new' (FORMAT parquet)")
        (part.parent / (part.name + ".new")).replace(part)
    exported = export(copy, tmp_path)
    ids = exported["info"]["ids"]
    assert ids["images"].startswith("renumbered 1..4 in engine order")
    assert ids["categories"].startswith("renumbered 1..3 in engine order")
    assert ids["annotations"] == "source"
    names = {c["id"]: c["name"] for c in exported["categories"]}
    assert names == {1: "blue", 2: "green", 3: "red"}
    original = {a["id"]: a for a in json.loads(ann.read_text())["annotations"]}
    source_names = {CATEGORY_IDS[i + 1]: n for i, n in enumerate(["red", "green", "blue"])}
    for a in exported["annotations"]:
        assert names[a["category_id"]] == source_names[original[a["id"]]["category_id"]]
    images = {i["mq_image_id"]: i["id"] for i in exported["images"]}
    assert sorted(images.values()) == [1, 2, 3, 4]
    assert list(images) == sorted(images)  # in engine order
    for a in exported["annotations"]:
        assert a["image_id"] == images[a["mq_object_id"].rsplit(":", 1)[0]]


@pytest.mark.parametrize(
    "where",
    [
        "keep; COPY (SELECT 1) TO '{pwn}'",
        "keep); COPY (SELECT 1) TO '{pwn}'; SELECT (1",
    ],
)
def test_where_runs_one_condition_only(coco_run, tmp_path, where, capsys):
    _, out = coco_run
    pwn, dest = tmp_path / "pwn.csv", tmp_path / "x.json"
    code = main(["export", str(out), "--to", str(dest), "--where", where.format(pwn=pwn)])
    assert code == 2
    assert "is not one SQL condition on objects" in capsys.readouterr().err
    assert not pwn.exists() and not dest.exists()


def test_check_where_accepts_one_expression():
    assert check_where(None) == "true"
    assert check_where("keep AND category = 'a;b'") == "keep AND category = 'a;b'"
    with pytest.raises(ValueError, match="2 statements|not one SQL condition"):
        check_where("keep); DROP TABLE x; SELECT (1")


def test_export_dispatches_through_exporters(coco_run, tmp_path, capsys):
    _, out = coco_run
    assert EXPORTERS["coco"] is export_coco
    default = export(out, tmp_path)
    assert export(out, tmp_path, "--format", "coco") == default
    assert main(["export", str(out), "--to", str(tmp_path / "y"), "--format", "nope"]) == 2
    assert "unknown --format 'nope'; choose one of: coco" in capsys.readouterr().err


def test_root_overrides_the_recorded_image_root(coco_run, tmp_path, capsys):
    ann, out = coco_run
    moved = tmp_path / "moved"
    shutil.copytree(ann.parent, moved)
    run_copy = tmp_path / "run"
    shutil.copytree(out, run_copy)
    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["source"]["root"] = str(tmp_path / "gone")  # where the data used to be
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    png = tmp_path / "s.png"
    assert main(["show", str(run_copy), "--to", str(png)]) == 2
    assert "cannot show images/img_000.png" in capsys.readouterr().err
    assert main(["show", str(run_copy), "--to", str(png), "--root", str(moved)]) == 0
    assert png.exists()
    assert export(run_copy, tmp_path, "--root", str(moved))["images"]
