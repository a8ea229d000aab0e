"""The annotation contract: Arrow schemas of the `images` and `objects` tables.

Every stage imports its column names from here. `docs/schema.md` is the field table that explains
each column (meaning, type, units); `tests/schemas/test_annotations.py` checks that the two agree.

Conventions (the short version; the field table has the rest):
- Boxes are `[x, y, w, h]` in absolute pixels of the original image, origin top-left, clipped to
  the image. `box_raw` keeps the source's box untouched, in the source's own convention converted
  to xywh.
- Masks are COCO compressed RLE made by pycocotools (column-major), with the size stored
  explicitly as `height`, `width`.
- `status` is one of `kept`, `filtered` (a quality threshold failed), or `rejected` (bad input or a
  failed model call). `keep` is `status == 'kept'`. Every non-kept row has a `reject_code` from
  REJECT_CODES (groupable) and a free-text `reject_reason` (the values, paths and every failed
  threshold).
- Provenance: `mask_origin` is `gt` for source masks, else the producing method and model
  (`grabcut`, `box`, `sam:vit_h`, `hf-sam:<folder>`); each caption carries its own provenance.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1.1.0"  # 1.1: objects.reject_code
METADATA_KEY = b"mqengine.schema_version"

# Values of `objects.status` and `images.status`.
KEPT, FILTERED, REJECTED = "kept", "filtered", "rejected"
OBJECT_STATUSES = (KEPT, FILTERED, REJECTED)
IMAGE_OK = "ok"
IMAGE_STATUSES = (
    IMAGE_OK,
    "missing",
    "corrupt",
    "unsafe_path",
    "duplicate",
    "size_mismatch",
    "invalid",
)
GT = "gt"

# `objects.reject_code`: one code per non-kept row (the first reason when several apply; the detail
# text lists all of them). docs/schema.md repeats this table; a test keeps the two in step.
REJECT_CODES = {
    # rejected: the input cannot be used
    "image_missing": "the image file does not exist or cannot be read",
    "image_corrupt": "the image bytes do not decode (or are a decompression bomb)",
    "unsafe_path": "the image path escapes the dataset root, or is not a regular file",
    "size_mismatch": "the annotated width/height differ from the pixels",
    "image_invalid": "the image record is unusable (e.g. annotations name an unknown image)",
    "duplicate_id": "a repeated image id or annotation id (the first occurrence is used)",
    "box_invalid": "the box is not 4 finite numbers with positive size inside the image",
    "category_unknown": "the category id is not in the annotation file's categories",
    "category_missing": "the object has no category",
    "gt_mask_invalid": "the source's polygon or RLE is malformed or does not fit the image",
    "annotation_invalid": "another problem with the annotation (the detail says which)",
    "model_error": "the masker or captioner raised on this image",
    # filtered: a synthesized mask failed a quality threshold (scores are kept)
    "empty_mask": "the mask has no pixels",
    "mask_fallback": "the method failed and a substitute (box or ellipse) was put in its place",
    "low_box_iou": "IoU of the mask's tight box with the prompt box below --min-box-iou",
    "low_box_fill": "mask area / box area below --min-box-fill",
    "too_many_components": "more connected components than --max-components",
    "low_pred_iou": "the model's predicted IoU below --min-pred-iou",
    "low_stability": "the stability score below --min-stability",
}
# images.status -> the reject_code its objects get
IMAGE_STATUS_CODES = {
    "missing": "image_missing",
    "corrupt": "image_corrupt",
    "unsafe_path": "unsafe_path",
    "duplicate": "duplicate_id",
    "size_mismatch": "size_mismatch",
    "invalid": "image_invalid",
}

MASK_TYPE = pa.struct(
    [
        pa.field("counts", pa.string(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
    ]
)
CAPTION_TYPE = pa.struct(
    [
        pa.field("text", pa.string(), nullable=False),
        pa.field("provenance", pa.string(), nullable=False),
        pa.field("score", pa.float32()),
    ]
)
BOX_TYPE = pa.list_(pa.float64())

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("source_image_id", pa.string(), nullable=False),
        pa.field("file_path", pa.string(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("sha256", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("num_objects", pa.int32(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

OBJECTS_SCHEMA = pa.schema(
    [
        pa.field("object_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source_ann_id", pa.string(), nullable=False),
        pa.field("category", pa.string()),
        pa.field("source_category_id", pa.int64()),
        pa.field("source_category_name", pa.string()),
        pa.field("box", BOX_TYPE),
        pa.field("box_raw", BOX_TYPE),
        pa.field("iscrowd", pa.bool_(), nullable=False),
        pa.field("attributes", pa.string()),
        pa.field("mask", MASK_TYPE),
        pa.field("mask_origin", pa.string()),
        pa.field("gt_mask", MASK_TYPE),
        pa.field("mask_area", pa.int64()),
        pa.field("mask_box", BOX_TYPE),
        pa.field("pred_iou", pa.float32()),
        pa.field("stability", pa.float32()),
        pa.field("box_iou", pa.float32()),
        pa.field("box_fill", pa.float32()),
        pa.field("n_components", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("keep", pa.bool_(), nullable=False),
        pa.field("reject_code", pa.string()),
        pa.field("reject_reason", pa.string()),
        pa.field("captions", pa.list_(CAPTION_TYPE)),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

TABLES = {"images": IMAGES_SCHEMA, "objects": OBJECTS_SCHEMA}


def with_version(schema: pa.Schema) -> pa.Schema:
    """The schema with SCHEMA_VERSION stored in its metadata (it lands in the Parquet footer)."""
    return schema.with_metadata({METADATA_KEY: SCHEMA_VERSION.encode()})


def empty_table(name: str) -> pa.Table:
    return with_version(TABLES[name]).empty_table()


def table_from_rows(name: str, rows: list[dict]) -> pa.Table:
    """Build a versioned table of `name` from row dicts; a missing key is a null, an unknown key
    an error (a typo'd column must not silently become null)."""
    schema = with_version(TABLES[name])
    unknown = {k for row in rows for k in row} - set(schema.names)
    if unknown:
        raise SchemaError(f"{name}: unknown columns {sorted(unknown)}")
    columns = {f.name: [row.get(f.name) for row in rows] for f in schema}
    return pa.Table.from_pydict(columns, schema=schema)


class SchemaError(ValueError):
    """A table does not match the annotation contract."""


def validate(table: pa.Table, name: str) -> None:
    """Raise SchemaError naming the first column that breaks the contract of table `name`."""
    if name not in TABLES:
        raise SchemaError(f"unknown table {name!r}; choose one of: {', '.join(TABLES)}")
    expected = TABLES[name]
    for field in expected:
        if field.name not in table.column_names:
            raise SchemaError(f"{name}: missing column {field.name!r}")
        actual = table.schema.field(field.name).type
        if actual != field.type:
            raise SchemaError(f"{name}.{field.name}: type {actual}, expected {field.type}")
        if not field.nullable and table.column(field.name).null_count:
            raise SchemaError(f"{name}.{field.name}: {table.column(field.name).null_count} nulls")
    extra = [c for c in table.column_names if c not in expected.names]
    if extra:
        raise SchemaError(f"{name}: unexpected columns {extra}")
    version = (table.schema.metadata or {}).get(METADATA_KEY)
    if version is not None and version.decode() != SCHEMA_VERSION:
        raise SchemaError(f"{name}: schema version {version.decode()}, expected {SCHEMA_VERSION}")
    _validate_values(table, name)


def _validate_values(table: pa.Table, name: str) -> None:
    import pyarrow.compute as pc

    allowed = OBJECT_STATUSES if name == "objects" else IMAGE_STATUSES
    bad = pc.invert(pc.is_in(table.column("status"), value_set=pa.array(allowed)))
    if pc.any(bad).as_py():
        first = table.column("status").filter(bad)[0].as_py()
        raise SchemaError(f"{name}.status: value {first!r} not in {allowed}")
    if name != "objects":
        return
    for col in ("box", "box_raw", "mask_box"):
        lengths = pc.list_value_length(table.column(col))
        wrong = pc.and_(pc.is_valid(lengths), pc.not_equal(lengths, 4))
        if pc.any(wrong).as_py():
            raise SchemaError(f"objects.{col}: every box must have 4 numbers [x, y, w, h]")
    codes = table.column("reject_code")
    unknown = pc.invert(pc.is_in(codes, value_set=pa.array(list(REJECT_CODES))))
    if pc.any(pc.and_(pc.is_valid(codes), unknown)).as_py():
        first = codes.filter(pc.and_(pc.is_valid(codes), unknown))[0].as_py()
        raise SchemaError(f"objects.reject_code: value {first!r} not in REJECT_CODES")
    coded = pc.not_equal(pc.is_valid(codes), pc.equal(table.column("status"), KEPT))
    if table.num_rows and not pc.all(coded).as_py():
        raise SchemaError("objects.reject_code: required exactly when status != 'kept'")
    keep_matches = pc.equal(table.column("keep"), pc.equal(table.column("status"), KEPT))
    if table.num_rows and not pc.all(keep_matches).as_py():
        raise SchemaError("objects.keep: must equal (status == 'kept')")
