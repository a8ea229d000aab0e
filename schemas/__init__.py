"""The annotation contract shared by every stage: Arrow schemas, SCHEMA_VERSION, validate()."""

from schemas.annotations import (
    FILTERED,
    GT,
    IMAGE_STATUS_CODES,
    IMAGES_SCHEMA,
    KEPT,
    OBJECTS_SCHEMA,
    REJECT_CODES,
    REJECTED,
    SCHEMA_VERSION,
    SchemaError,
    empty_table,
    table_from_rows,
    validate,
    with_version,
)
from schemas.runs import Run, RunError, open_run

__all__ = [
    "Run",
    "RunError",
    "open_run",
    "FILTERED",
    "GT",
    "IMAGE_STATUS_CODES",
    "IMAGES_SCHEMA",
    "KEPT",
    "OBJECTS_SCHEMA",
    "REJECT_CODES",
    "REJECTED",
    "SCHEMA_VERSION",
    "SchemaError",
    "empty_table",
    "table_from_rows",
    "validate",
    "with_version",
]
