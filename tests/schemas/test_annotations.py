import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from schemas import OBJECTS_SCHEMA, SCHEMA_VERSION, SchemaError, table_from_rows, validate
from schemas import masks as rle
from schemas.annotations import IMAGES_SCHEMA, METADATA_KEY, REJECT_CODES

DOCS = Path(__file__).parents[2] / "docs" / "schema.md"


def object_row(**over):
    row = {
        "object_id": "s:v:1:1",
        "image_id": "s:v:1",
        "source_ann_id": "1",
        "category": "cat",
        "box": [1.0, 2.0, 3.0, 4.0],
        "box_raw": [1.0, 2.0, 3.0, 4.0],
        "iscrowd": False,
        "mask": {"counts": "PPY2", "height": 10, "width": 10},
        "status": "kept",
        "keep": True,
        "captions": [{"text": "a cat", "provenance": "template", "score": 0.5}],
        "run_id": "r",
    }
    row.update(over)
    return row


def test_round_trip_through_parquet_keeps_values_and_version(tmp_path):
    table = table_from_rows("objects", [object_row()])
    pq.write_table(table, tmp_path / "o.parquet")
    back = pq.read_table(tmp_path / "o.parquet")
    validate(back, "objects")
    assert back.schema.metadata[METADATA_KEY].decode() == SCHEMA_VERSION
    assert back.to_pylist()[0]["captions"] == [
        {"text": "a cat", "provenance": "template", "score": 0.5}
    ]
    assert back.to_pylist()[0]["box"] == [1.0, 2.0, 3.0, 4.0]


def test_validate_names_the_broken_column():
    table = table_from_rows("objects", [object_row()])
    with pytest.raises(SchemaError, match="missing column 'keep'"):
        validate(table.drop_columns(["keep"]), "objects")
    wrong = table.set_column(
        table.schema.get_field_index("mask_area"), "mask_area", pa.array(["x"], pa.string())
    )
    with pytest.raises(SchemaError, match=r"objects\.mask_area: type string"):
        validate(wrong, "objects")
    with pytest.raises(SchemaError, match="objects.status: value 'maybe'"):
        validate(table_from_rows("objects", [object_row(status="maybe")]), "objects")
    with pytest.raises(SchemaError, match="objects.box: every box must have 4"):
        validate(table_from_rows("objects", [object_row(box=[1.0, 2.0])]), "objects")
    with pytest.raises(SchemaError, match="keep"):
        bad = object_row(status="filtered", reject_code="low_box_iou")
        validate(table_from_rows("objects", [bad]), "objects")
    with pytest.raises(SchemaError, match="nulls"):
        validate(table_from_rows("objects", [object_row(run_id=None)]), "objects")


def test_field_table_documents_every_column():
    text = DOCS.read_text()
    for schema, heading in ((IMAGES_SCHEMA, "## `images`"), (OBJECTS_SCHEMA, "## `objects`")):
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        documented = re.findall(r"^\| (\w+) \|", section, flags=re.M)
        assert [c for c in documented if c != "column"] == schema.names


@pytest.mark.parametrize("seed", range(5))
def test_rle_agrees_with_pycocotools_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 60, size=2)
    masks = rng.random((4, h, w)) < rng.random()
    values = rle.encode(masks)
    np.testing.assert_array_equal(rle.decode(values), masks.astype(np.uint8))
    np.testing.assert_array_equal(rle.area(values), masks.reshape(4, -1).sum(1))
    for value, mask in zip(values, masks, strict=True):
        ref = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert value["counts"].encode() == ref["counts"]
        assert (value["height"], value["width"]) == tuple(ref["size"])
        np.testing.assert_allclose(rle.tight_box([value])[0], mask_utils.toBbox(ref))


def test_area_of_many_masks_in_one_call():
    masks = np.zeros((600, 12, 12), bool)
    for i in range(600):
        masks[i, : 1 + i % 12, :3] = True
    np.testing.assert_array_equal(rle.area(rle.encode(masks)), masks.reshape(600, -1).sum(1))


def test_polygons_rasterise_like_pycocotools():
    poly = [[2.0, 2.0, 20.0, 3.0, 15.0, 18.0]]
    value = rle.from_segmentation(poly, 24, 30)
    ref = mask_utils.merge(mask_utils.frPyObjects(poly, 24, 30))
    np.testing.assert_array_equal(rle.decode([value])[0], mask_utils.decode(ref))
    uncompressed = {"size": [4, 5], "counts": [3, 4, 13]}
    assert rle.decode([rle.from_segmentation(uncompressed, 4, 5)])[0].sum() == 4


def test_reject_code_is_required_exactly_on_non_kept_rows():
    ok = object_row(status="filtered", keep=False, reject_code="low_box_iou", reject_reason="x")
    validate(table_from_rows("objects", [ok]), "objects")
    with pytest.raises(SchemaError, match="reject_code"):
        validate(table_from_rows("objects", [object_row(status="filtered", keep=False)]), "objects")
    with pytest.raises(SchemaError, match="reject_code"):
        validate(table_from_rows("objects", [object_row(reject_code="low_box_iou")]), "objects")
    with pytest.raises(SchemaError, match="'no_such_code'"):
        bad = object_row(status="rejected", keep=False, reject_code="no_such_code")
        validate(table_from_rows("objects", [bad]), "objects")


def test_an_empty_unit_validates():
    # A unit whose images have no annotations: its objects table is empty and must still validate
    # (before, `pc.all` of nothing was null and every rerun failed on "objects.keep").
    validate(table_from_rows("objects", []), "objects")
    validate(table_from_rows("images", []), "images")


def test_unknown_row_keys_are_an_error_not_a_null_column():
    with pytest.raises(SchemaError, match="reject_reasn"):
        table_from_rows("objects", [object_row(reject_reasn="typo")])


def test_reject_codes_are_documented():
    section = DOCS.read_text().split("## Reject codes", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \|", section, flags=re.M)
    assert documented == list(REJECT_CODES)
