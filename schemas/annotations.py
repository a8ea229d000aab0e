"""The annotation contract: Arrow schemas of the `images` and `objects` tables.

Every stage imports its column names from here. `docs/schema.md` is the field table that explains
each column (meaning, type, units); `tests/schemas/test_annotations.py` checks that the two agree.

Conventions (the short version; the field table has the rest):
- Boxes are `[x, y, w, h]` in absolute pixels of the original image, origin top-left, clipped to
  the image. `box_raw` keeps the source's box untouched, in the source's own convention converted
  to xywh.
- Masks are COCO compressed RLE made by pycocotools (column-major), with the size stored
  explicitly as `height`, `width`.
- `status` is one of `kept`, `filtered` (a quality threshold failed: `reject_reason` says which), or
  `rejected` (bad input: `reject_reason` says why). `keep` is `status == 'kept'`.
- Provenance: `mask_origin` is `gt` for source masks, else the producing method and model
  (`grabcut`, `box`, `sam:vit_h`, `hf-sam:<folder>`); each caption carries its own provenance.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1.0.0"
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
    """Build a versioned table of `name` from row dicts; a missing key is a null."""
    schema = with_version(TABLES[name])
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
    keep_matches = pc.equal(table.column("keep"), pc.equal(table.column("status"), KEPT))
    if not pc.all(keep_matches).as_py():
        raise SchemaError("objects.keep: must equal (status == 'kept')")
