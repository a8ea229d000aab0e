import json
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipelines.captioners import Caption
from pipelines.maskers import MaskOutput
from pipelines.maskers.box import BoxMasker, box_masks
from pipelines.process import UnitContext, clip_box, process_unit
from pipelines.quality import QualityConfig, box_iou_xywh, decide, measure
from pipelines.records import ImageRecord, SourceObject
from pipelines.sources.coco import CocoSource
from schemas import masks as rle
from schemas import table_from_rows, validate
from tests.helpers.coco_fixture import write_coco


def no_captions(image, boxes, masks, categories):
    return [[Caption(f"a {c}", "test", 1.0)] for c in categories]


@pytest.mark.parametrize(
    "box, expected",
    [
        ([-5, -5, 20, 20], [0, 0, 15, 15]),  # negative corner clipped
        ([90, 40, 50, 50], [90, 40, 10, 20]),  # spills past the right/bottom edge
        ([10, 10, 5, 5], [10, 10, 5, 5]),
    ],
)
def test_clip_box_keeps_inside_part(box, expected):
    clipped, problem = clip_box(box, 100, 60)
    assert problem is None and clipped == expected


@pytest.mark.parametrize(
    "box, reason",
    [
        ([1, 2, 3], "4 numbers"),
        ([0, 0, math.nan, 3], "non-finite"),
        ([0, 0, -1, 3], "non-positive"),
        ([200, 0, 5, 5], "outside"),
        (["a", 0, 5, 5], "non-numeric"),
    ],
)
def test_clip_box_rejects_with_reason(box, reason):
    clipped, problem = clip_box(box, 100, 60)
    assert clipped is None and reason in problem


def test_box_masks_fill_exactly_the_box_pixels():
    m = box_masks(20, 30, np.array([[2.0, 3.0, 12.0, 9.0]]))[0]
    assert m.sum() == 10 * 6 and m[3:9, 2:12].all()


def test_measure_matches_independent_computation():
    mask = np.zeros((40, 40), bool)
    mask[5:15, 5:15] = True
    mask[30:32, 30:32] = True  # a second island
    q = measure(mask, [5.0, 5.0, 10.0, 10.0])
    ref = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert q.area == int(mask_utils.area(ref))
    assert q.mask_box == list(mask_utils.toBbox(ref))
    assert q.n_components == 2
    assert q.box_iou == pytest.approx(100 / (27 * 27))
    assert q.box_fill == pytest.approx(104 / 100)
    assert box_iou_xywh([0, 0, 2, 2], [1, 1, 2, 2]) == pytest.approx(1 / 7)


def test_decide_names_every_failed_threshold():
    mask = np.zeros((40, 40), bool)
    mask[0:2, 0:2] = True
    q = measure(mask, [0.0, 0.0, 30.0, 30.0])
    code, reason = decide(q, 0.5, float("nan"), QualityConfig(max_components=1))
    assert code == "low_box_iou"  # the first failure; the text lists all of them
    assert "box_iou" in reason and "box_fill" in reason and "pred_iou 0.500 < 0.88" in reason
    assert "stability" not in reason  # no score, no verdict
    assert (
        decide(measure(mask, [0.0, 0.0, 2.0, 2.0]), float("nan"), float("nan"), QualityConfig())
        is None
    )


def ctx_for(root):
    return UnitContext(source="coco", split="val", root=root, run_id="r", quality=QualityConfig())


def test_unit_counts_add_up_and_bad_records_become_rejections(tmp_path):
    ann = write_coco(tmp_path, n_images=3, bad=True)
    records = list(CocoSource("coco", "val", tmp_path, ann).records())
    images, objects = process_unit(ctx_for(tmp_path), records, BoxMasker(), no_captions)
    validate(table_from_rows("objects", objects), "objects")
    validate(table_from_rows("images", images), "images")
    n_input = sum(len(r.objects) for r in records)
    assert len(objects) == n_input == len({o["object_id"] for o in objects})
    by_status = {
        s: [o for o in objects if o["status"] == s] for s in ("kept", "filtered", "rejected")
    }
    assert len(by_status["kept"]) == 9
    reasons = sorted(o["reject_reason"] for o in by_status["rejected"])
    assert len(reasons) == 7
    for needle in (
        "image missing",
        "image corrupt",
        "image unsafe_path",
        "unknown category id 77",
        "non-positive size",
        "outside the 128x96 image",
    ):
        assert any(needle in r for r in reasons), needle
    codes = sorted(o["reject_code"] for o in by_status["rejected"])
    assert codes == sorted(
        ["image_missing", "image_corrupt", "unsafe_path", "category_unknown"] + ["box_invalid"] * 3
    ), codes
    assert {i["status"] for i in images} == {"ok", "missing", "corrupt", "unsafe_path"}
    assert [o["image_id"] for o in objects] == sorted(o["image_id"] for o in objects)
    for o in by_status["kept"]:
        assert o["mask_origin"] == "box" and o["captions"][0]["provenance"] == "test"
        assert rle.area([o["mask"]])[0] == o["mask_area"] == o["box"][2] * o["box"][3]


def test_gt_masks_are_kept_unless_remask(tmp_path):
    ann = write_coco(tmp_path, n_images=1, objects_per_image=2)
    data = json.loads(ann.read_text())
    x, y, w, h = data["annotations"][0]["bbox"]
    data["annotations"][0]["segmentation"] = [[x, y, x + w, y, x, y + h]]  # a triangle
    ann.write_text(json.dumps(data))
    records = list(CocoSource("coco", "val", tmp_path, ann).records())
    ctx = ctx_for(tmp_path)
    _, objects = process_unit(ctx, records, BoxMasker(), no_captions)
    assert [o["mask_origin"] for o in objects] == ["gt", "box"]
    assert objects[0]["mask"] == objects[0]["gt_mask"]
    assert objects[0]["mask_area"] < w * h  # the triangle, not the box
    ctx.remask = True
    _, remasked = process_unit(ctx, records, BoxMasker(), no_captions)
    assert [o["mask_origin"] for o in remasked] == ["box", "box"]
    assert remasked[0]["gt_mask"] == objects[0]["gt_mask"]  # still there for comparison


def test_a_failing_model_rejects_that_image_only(tmp_path):
    ann = write_coco(tmp_path, n_images=2)
    records = list(CocoSource("coco", "val", tmp_path, ann).records())

    class Flaky:
        origin = "flaky"

        def __call__(self, image, boxes):
            if image.mean() == Flaky.bad_mean:
                raise MemoryError("out of memory")
            return MaskOutput.unscored(box_masks(*image.shape[:2], boxes))

    from pipelines.images import load_image

    Flaky.bad_mean = load_image(tmp_path, records[0].file, None, None).pixels.mean()
    images, objects = process_unit(ctx_for(tmp_path), records, Flaky(), no_captions)
    first = [o for o in objects if o["image_id"] == images[0]["image_id"]]
    assert all(o["status"] == "rejected" and "MemoryError" in o["reject_reason"] for o in first)
    assert "MemoryError" in images[0]["error"]
    assert all(o["status"] == "kept" for o in objects if o not in first)


def test_duplicate_image_ids_stay_unique(tmp_path):
    rec = ImageRecord("7", "a.png", 10, 10, [SourceObject("1", "cat", [0, 0, 2, 2])])
    dup = ImageRecord(
        "7",
        "a.png",
        10,
        10,
        [SourceObject("2", "cat", [0, 0, 2, 2])],
        error="duplicate image id",
        error_status="duplicate",
        index=1,
    )
    images, objects = process_unit(ctx_for(tmp_path), [rec, dup], BoxMasker(), no_captions)
    assert len({i["image_id"] for i in images}) == 2
    assert len({o["object_id"] for o in objects}) == 2
