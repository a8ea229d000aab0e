"""Reading a run folder: the one place that knows which part files belong to a run.

A run folder holds `manifest.json` and `_units.jsonl` (see docs/schema.md). The parts of a run are
exactly the files its manifest and unit log list; any other file in the folder (left by an older
run, copied in by hand) is not part of it. Every reader of shards (`engine query`, `stats`,
`export`, `show`, `report`, the trainer) opens runs through `open_run`, which also refuses a run
written with a schema this code cannot read.

This module knows the layout of a run, not who writes it: it imports nothing from `pipelines`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from schemas.annotations import SCHEMA_VERSION, SchemaError

MANIFEST = "manifest.json"
UNIT_LOG = "_units.jsonl"
TABLE_NAMES = ("images", "objects")


class RunError(ValueError):
    """A folder that is not a readable run (one line naming the folder and the reason)."""


def read_unit_log(path: Path) -> dict[str, dict]:
    """Entries of the unit log by unit key; a torn last line (a kill mid-append) is ignored: its
    unit is simply not done."""
    units: dict[str, dict] = {}
    if not path.exists():
        return units
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            units[record["unit"]] = record["entry"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return units


def read_manifest(run_dir: Path) -> dict:
    """manifest.json of `run_dir` with the unit log merged into its units."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise RunError(f"{run_dir}: no {MANIFEST} (not an engine run, or its manifest was deleted)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("units", {}), dict):
        raise RunError(f"{path}: not an engine manifest (no units mapping)")
    manifest.setdefault("units", {}).update(read_unit_log(Path(run_dir) / UNIT_LOG))
    return manifest


def readable(version: str | None) -> bool:
    """Whether shards of schema `version` can be read by this code: the same major version (minor
    versions only add columns, which readers select by name)."""
    if not isinstance(version, str) or not version:
        return False
    return version.split(".")[0] == SCHEMA_VERSION.split(".")[0]


@dataclass
class Run:
    """An opened run: its folder, manifest, image root and the part files of each table (in unit
    order, absolute paths)."""

    dir: Path
    manifest: dict
    root: Path
    parts: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def schema_version(self) -> str:
        return self.manifest["schema_version"]

    @property
    def run_id(self) -> str:
        return self.manifest.get("run_id", "")

    def files(self, table: str) -> list[str]:
        """The part files of `table` as strings (what DuckDB's read_parquet and datasets take)."""
        return [str(p) for p in self.parts[table]]

    def connect(self):
        """A DuckDB connection with the views `images`, `objects` and `captions` (one row per
        caption, with its object's id, category and status) over exactly this run's parts."""
        import duckdb

        con = duckdb.connect()
        for table in TABLE_NAMES:
            files = ", ".join("'" + f.replace("'", "''") + "'" for f in self.files(table))
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet([{files}])")
        con.execute(
            "CREATE VIEW captions AS SELECT object_id, image_id, category, status, keep, "
            "c.text AS text, c.provenance AS provenance, c.score AS score "
            "FROM (SELECT *, unnest(captions) AS c FROM objects)"
        )
        return con


def open_run(run_dir: Path, root: Path | None = None, require_parts: bool = True) -> Run:
    """Open the run in `run_dir`. `root` overrides the image root the manifest recorded (the data
    moved to another machine or mount). Raises RunError with one line naming what is wrong."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RunError(f"{run_dir}: no such folder")
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: not a folder (expected an engine run folder)")
    manifest = read_manifest(run_dir)
    version = manifest.get("schema_version")
    if not readable(version):
        raise RunError(
            f"{run_dir}: written with schema version {version!r}; this engine reads "
            f"{SCHEMA_VERSION.split('.')[0]}.x (rerun `engine synthesize` with this version)"
        )
    parts: dict[str, list[Path]] = {t: [] for t in TABLE_NAMES}
    for key in sorted(manifest["units"]):
        entry = manifest["units"][key]
        for table in TABLE_NAMES:
            rel = entry.get(f"{table}_file")
            path = run_dir / rel if isinstance(rel, str) else None
            if path is None or not path.is_file():
                raise RunError(
                    f"{run_dir}: unit {key} lists {table} file {rel!r}, which is missing "
                    "(rerun the same `engine synthesize` command to redo it)"
                )
            parts[table].append(path)
    if require_parts and not parts["images"]:
        raise RunError(f"{run_dir}: the run has no finished units yet")
    recorded = (manifest.get("source") or {}).get("root")
    image_root = Path(root) if root is not None else Path(recorded or run_dir)
    if not image_root.is_absolute():
        image_root = run_dir / image_root
    return Run(run_dir, manifest, image_root, parts)


def check_file_version(path: Path, metadata: dict | None) -> None:
    """Raise SchemaError when a part file's footer names a schema this code cannot read."""
    from schemas.annotations import METADATA_KEY

    version = (metadata or {}).get(METADATA_KEY)
    if version is not None and not readable(version.decode()):
        raise SchemaError(f"{path}: schema version {version.decode()}, this engine reads "
                          f"{SCHEMA_VERSION.split('.')[0]}.x")
