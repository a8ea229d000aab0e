"""What an export takes from a run, streamed image by image (shared by export_hf, export_yolo_seg
and export_sa1b).

The selection is `objects WHERE <where>` (default `keep`: kept objects only) joined to their
images; rows come from DuckDB in batches of BATCH (fetchmany) ordered by image, and are grouped
into one (image, objects) pair at a time, so memory stays bounded by one batch whatever the size
of the run. Only images with at least one selected object are exported: an image whose objects
were all filtered is not a background image, and would teach a detector that its objects are not
there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from hashlib import sha1
from pathlib import Path

import duckdb

from schemas.runs import Run

BATCH = 2_000
OBJECT_COLUMNS = (
    "object_id", "category", "box", "mask", "mask_origin", "mask_area", "iscrowd", "pred_iou",
    "stability", "box_iou", "box_fill", "n_components", "status", "reject_code", "captions",
)
IMAGE_COLUMNS = ("image_id", "file_path", "width", "height", "split", "sha256", "source")


def check_where(where: str | None) -> str:
    """The SQL condition `where` as one expression over `objects` ('true' when empty); refuses
    anything that is not exactly one SELECT when put in `WHERE (...)`, e.g. `keep; COPY ...`."""
    if where is None or not where.strip():
        return "true"
    sql = f"SELECT count(*) FROM objects WHERE ({where})"
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        first = str(exc).splitlines()[0]
        raise ValueError(f"--where {where!r} is not one SQL condition on objects: {first}") from exc
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise ValueError(
            f"--where {where!r} is not one SQL condition on objects: it holds "
            f"{len(statements)} statements; give a single expression such as \"keep AND "
            "category = 'dog'\""
        )
    return where


def selection_sql(where: str | None) -> str:
    """`where` (default: kept objects) as one checked condition: a second statement such as
    `keep; COPY ...` is refused before DuckDB sees it (check_where)."""
    return f"SELECT * FROM objects WHERE ({check_where(where) if where else 'keep'})"


def open_selection(run: Run, where: str | None,
                   materialize: bool = False) -> duckdb.DuckDBPyConnection:
    """A connection with `sel` = the selected objects; a bad `where` is one ValueError. Every
    exporter selects through here. materialize: `sel` is a temp table instead of a view (the
    COCO exporter reads it several times: ids, categories, then the stream)."""
    con = run.connect()
    kind = "TABLE" if materialize else "VIEW"
    try:
        con.execute(f"CREATE TEMP {kind} sel AS {selection_sql(where)}")
        con.execute("SELECT count(*) FROM sel").fetchone()
    except duckdb.Error as exc:
        first = str(exc).splitlines()[0]
        raise ValueError(
            f"--where {where!r} is not a valid SQL condition on objects: {first}"
        ) from exc
    return con


def categories(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Selected category names, sorted: their position is the class id of yolo-seg and hf."""
    rows = con.execute(
        "SELECT DISTINCT category FROM sel WHERE category IS NOT NULL ORDER BY 1"
    ).fetchall()
    return [r[0] for r in rows]


def iter_images(con: duckdb.DuckDBPyConnection) -> Iterator[tuple[dict, list[dict]]]:
    """(image row, its selected object rows) for every image with a selected object, in image_id
    order; objects in object_id order."""
    cols = ", ".join([f"i.{c}" for c in IMAGE_COLUMNS] + [f"o.{c}" for c in OBJECT_COLUMNS])
    cursor = con.execute(
        f"SELECT {cols} FROM sel o JOIN images i USING (image_id) "
        "ORDER BY i.image_id, o.object_id"
    )
    n_image = len(IMAGE_COLUMNS)
    current, objects = None, []
    while rows := cursor.fetchmany(BATCH):
        for row in rows:
            image = dict(zip(IMAGE_COLUMNS, row[:n_image], strict=True))
            if current is not None and image["image_id"] != current["image_id"]:
                yield current, objects
                objects = []
            current = image
            objects.append(dict(zip(OBJECT_COLUMNS, row[n_image:], strict=True)))
    if current is not None:
        yield current, objects


def safe_name(image_id: str, file_path: str) -> str:
    """A file name for an image that is unique per image_id and safe on any filesystem: the
    id with unsafe characters replaced, a short hash of the id, the source file's extension."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id)[-80:]
    ext = Path(file_path).suffix.lower() or ".jpg"
    return f"{stem}-{sha1(image_id.encode()).hexdigest()[:8]}{ext}"


def image_path(run: Run, image: dict) -> Path:
    """The image file under the run's root; FileNotFoundError names the image and the file."""
    from pipelines.images import resolve_inside

    path = resolve_inside(run.root, image["file_path"])
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"image {image['image_id']}: file {image['file_path']!r} not found under {run.root} "
            "(pass the image root the run was made from)"
        )
    return path


def copy_file(src: Path, dest: Path) -> None:
    """Copy under a temporary name, then rename (a killed export leaves no torn image)."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def write_json_atomic(data, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


@contextmanager
def staging(dest: Path) -> Iterator[Path]:
    """A folder to write an export into, renamed to `dest` when the export finished: a failed or
    killed export leaves no half-written `dest`. `dest` must be new or an empty folder, so an
    export never mixes with another one."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"{dest}: exists and is not an empty folder (choose a new --to)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_receipt(dest: Path, fmt: str, run: Run, where: str | None, counts: dict) -> None:
    """export.json: what was taken (run, selection) and how much, beside the exported files."""
    receipt = {"format": fmt, "run_dir": str(run.dir), "run_id": run.run_id,
               "schema_version": run.schema_version, "where": where or "keep", "counts": counts}
    write_json_atomic(receipt, dest / "export.json")
