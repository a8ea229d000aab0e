"""SQL over an output folder with DuckDB: views `images`, `objects`, `captions`, and the stats
report."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import duckdb

from schemas.runs import Run, open_run

FORMATS = ("table", "csv", "json")


def connect(out: Path | Run) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views of run `out` registered: exactly the part files its
    manifest lists (schemas.runs), never a glob of the folder."""
    run = out if isinstance(out, Run) else open_run(Path(out))
    return run.connect()


def run_query(out: Path, sql: str) -> tuple[list[str], list[tuple]]:
    con = connect(out)
    try:
        result = con.execute(sql)
    except duckdb.Error as exc:
        raise ValueError(f"query failed: {exc}") from exc
    columns = [d[0] for d in result.description] if result.description else []
    return columns, result.fetchall()


def format_rows(columns: list[str], rows: list[tuple], fmt: str) -> str:
    """CSV or JSON text of a result (the table format is drawn by the CLI with rich)."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(columns)
        writer.writerows(rows)
        return buf.getvalue()
    if fmt == "json":
        return json.dumps([dict(zip(columns, r, strict=True)) for r in rows], default=str, indent=1)
    raise ValueError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")


STATS_QUERIES = {
    "objects by source and status": (
        "SELECT i.source, o.status, count(*) AS objects FROM objects o "
        "JOIN images i USING (image_id) GROUP BY ALL ORDER BY ALL"
    ),
    "images by status": "SELECT status, count(*) AS images FROM images GROUP BY ALL ORDER BY ALL",
    "objects by mask provenance": (
        "SELECT coalesce(mask_origin, '(none)') AS mask_origin, status, count(*) AS objects "
        "FROM objects GROUP BY ALL ORDER BY ALL"
    ),
    # grouped by the code (a small vocabulary, schemas.REJECT_CODES); the free-text reasons name
    # values and paths, so grouping by them gave one row per object. One example reason per code.
    "reject and filter reasons by code": (
        "SELECT status, reject_code, count(*) AS objects, "
        "arg_min(reject_reason, object_id) AS example_reason FROM objects WHERE NOT keep "
        "GROUP BY ALL ORDER BY objects DESC, status, reject_code"
    ),
    "categories (top 25)": (
        "SELECT category, count(*) AS objects, count(*) FILTER (WHERE keep) AS kept, "
        "round(avg(box_iou) FILTER (WHERE mask IS NOT NULL), 3) AS mean_box_iou "
        "FROM objects GROUP BY ALL ORDER BY objects DESC, category LIMIT 25"
    ),
    "captions by provenance": (
        "SELECT provenance, count(*) AS captions, count(DISTINCT object_id) AS objects "
        "FROM captions GROUP BY ALL ORDER BY ALL"
    ),
}


STATS_FORMATS = ("table", "json")


def stats(out: Path | Run) -> dict[str, tuple[list[str], list[tuple]]]:
    """The stats report of run `out`: section title -> (columns, rows)."""
    con = connect(out)
    report = {}
    for title, sql in STATS_QUERIES.items():
        result = con.execute(sql)
        report[title] = ([d[0] for d in result.description], result.fetchall())
    return report


def stats_json(report: dict[str, tuple[list[str], list[tuple]]]) -> str:
    """The report as one JSON object: section title -> list of row objects."""
    sections = {
        title: [dict(zip(columns, r, strict=True)) for r in rows]
        for title, (columns, rows) in report.items()
    }
    return json.dumps(sections, default=str, indent=1) + "\n"
