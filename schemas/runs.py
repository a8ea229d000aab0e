"""Reading a run folder: the one place that knows which part files belong to a run.

A run folder holds `manifest.json` and `_units.jsonl` (see docs/schema.md). The parts of a run are
exactly the files its manifest and unit log list; any other file in the folder (left by an older
run, copied in by hand) is not part of it. Every reader of shards (`engine query`, `stats`,
`export`, `show`, `report`, the trainer) opens runs through `open_run`, which also refuses a run
written with a schema this code cannot read.

A run may also live on object storage or behind a `file://` URI (schemas/location.py). There an
append-only log cannot exist, so each finished unit is committed by one small object
`_units/unit-NNNNN.json` (its manifest entry), written after both of its part objects; the parts of
such a run are exactly those its manifest and commit objects list, read through pyarrow.fs.

This module knows the layout of a run, not who writes it: it imports nothing from `pipelines`.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from schemas.annotations import SCHEMA_VERSION, SchemaError
from schemas.location import (
    Location,
    LocationError,
    check_reachable,
    explain,
    is_uri,
    open_location,
)

MANIFEST = "manifest.json"
UNIT_LOG = "_units.jsonl"
TABLE_NAMES = ("images", "objects")
UNITS_DIR = "_units"  # commit objects of a run on object storage, one per finished unit
COMMIT = re.compile(r"^unit-(\d{5,})\.json$")


def commit_name(unit: int | str) -> str:
    return f"{UNITS_DIR}/unit-{int(unit):05d}.json"


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


def read_manifest(run_dir: Path | str) -> dict:
    """manifest.json of `run_dir` with the unit log (or, for a URI, the commit objects) merged into
    its units."""
    if is_uri(run_dir):
        return read_store_manifest(open_location(run_dir))
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise RunError(f"{run_dir}: no {MANIFEST} (not an engine run, or its manifest was deleted)")
    manifest = _parse_manifest(path, path.read_bytes())
    manifest.setdefault("units", {}).update(read_unit_log(Path(run_dir) / UNIT_LOG))
    return manifest


def _parse_manifest(where: object, raw: bytes) -> dict:
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("units", {}), dict):
        raise RunError(f"{where}: not an engine manifest (no units mapping)")
    return manifest


def read_object(loc: Location, rel: str) -> bytes:
    with loc.fs.open_input_stream(loc.path(rel)) as f:
        return f.read()


def read_commits(loc: Location, threads: int = 16) -> dict[str, dict]:
    """Entries of the commit objects of the run at `loc` by unit key. One that does not parse is
    no commit (its unit is simply not done). Read with `threads` requests in flight: a run of 30k
    units has 30k small objects, and one GET at a time would take minutes."""
    selector = pafs.FileSelector(loc.path(UNITS_DIR), allow_not_found=True)
    names = [i.base_name for i in loc.fs.get_file_info(selector)
             if i.type == pafs.FileType.File and COMMIT.match(i.base_name)]

    def parse(name: str) -> tuple[str, dict] | None:
        try:
            record = json.loads(read_object(loc, f"{UNITS_DIR}/{name}"))
            key, entry = record["unit"], record["entry"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            return None
        return (key, entry) if isinstance(entry, dict) else None

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(names)))) as pool:
        found = [r for r in pool.map(parse, names) if r is not None]
    return dict(sorted(found))


def read_store_manifest(loc: Location) -> dict:
    """manifest.json at `loc` with its commit objects merged into its units."""
    try:
        info = loc.fs.get_file_info(loc.path(MANIFEST))
        if info.type != pafs.FileType.File:
            check_reachable(loc)  # a missing bucket reads as a missing file: name the bucket
            raise RunError(f"{loc.uri}: no {MANIFEST} (not an engine run, or its manifest was "
                           "deleted)")
        manifest = _parse_manifest(f"{loc.uri}/{MANIFEST}", read_object(loc, MANIFEST))
        manifest.setdefault("units", {}).update(read_commits(loc))
    except OSError as exc:
        raise RunError(explain(exc, loc.uri)) from None
    except LocationError as exc:
        raise RunError(str(exc)) from None
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
    order). For a local or `file://` run the parts are absolute local paths; for a run on object
    storage they are paths inside `fs` (bucket/key), read through pyarrow.fs."""

    dir: Path
    manifest: dict
    root: Path
    parts: dict[str, list[Path]] = field(default_factory=dict)
    fs: pafs.FileSystem | None = None  # set for a run on object storage only
    uri: str | None = None

    @property
    def schema_version(self) -> str:
        return self.manifest["schema_version"]

    @property
    def run_id(self) -> str:
        return self.manifest.get("run_id", "")

    def files(self, table: str) -> list[str]:
        """The part files of `table` as strings (what DuckDB's read_parquet and datasets take);
        URIs (s3://bucket/key) for a run on object storage."""
        if self.fs is not None:
            scheme = self.fs.type_name
            return [f"{scheme}://{p}" for p in self.parts[table]]
        return [str(p) for p in self.parts[table]]

    def connect(self):
        """A DuckDB connection with the views `images`, `objects` and `captions` (one row per
        caption, with its object's id, category and status) over exactly this run's parts."""
        import duckdb

        con = duckdb.connect()
        for table in TABLE_NAMES:
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM {self._scan(con, table)}")
        con.execute(
            "CREATE VIEW captions AS SELECT object_id, image_id, category, status, keep, "
            "c.text AS text, c.provenance AS provenance, c.score AS score "
            "FROM (SELECT *, unnest(captions) AS c FROM objects)"
        )
        return con

    def _scan(self, con, table: str) -> str:
        """The FROM clause over `table`'s parts: DuckDB's own Parquet reader for local files; for
        object storage a pyarrow dataset registered with DuckDB (DuckDB's httpfs extension is a
        download; pyarrow.fs is already here), which DuckDB scans with projection pushdown."""
        if self.fs is None:
            files = ", ".join("'" + f.replace("'", "''") + "'" for f in self.files(table))
            return f"read_parquet([{files}])"
        import pyarrow.dataset as ds

        paths = [str(p) for p in self.parts[table]]
        con.register(f"_{table}_parts", ds.dataset(paths, filesystem=self.fs, format="parquet"))
        return f"_{table}_parts"


def open_run(run_dir: Path | str, root: Path | None = None, require_parts: bool = True) -> Run:
    """Open the run in `run_dir` (a folder, or a URI: schemas/location.py). `root` overrides the
    image root the manifest recorded (the data moved to another machine or mount). Raises RunError
    with one line naming what is wrong."""
    if is_uri(run_dir):
        return _open_store_run(str(run_dir), root, require_parts)
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RunError(f"{run_dir}: no such folder")
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: not a folder (expected an engine run folder)")
    manifest = read_manifest(run_dir)
    _check_version(run_dir, manifest)
    parts = _listed_parts(run_dir, manifest, lambda rel: (run_dir / rel).is_file())
    return _run(run_dir, manifest, root, require_parts,
                {t: [run_dir / rel for rel in rels] for t, rels in parts.items()})


def _check_version(where: object, manifest: dict) -> None:
    version = manifest.get("schema_version")
    if not readable(version):
        raise RunError(
            f"{where}: written with schema version {version!r}; this engine reads "
            f"{SCHEMA_VERSION.split('.')[0]}.x (rerun `engine synthesize` with this version)"
        )


def _listed_parts(where: object, manifest: dict, exists) -> dict[str, list[str]]:
    """The part names (relative to the run) of each table, in unit order; a listed part for
    which `exists(rel)` is false is an error naming the unit."""
    parts: dict[str, list[str]] = {t: [] for t in TABLE_NAMES}
    for key in sorted(manifest["units"]):
        entry = manifest["units"][key]
        for table in TABLE_NAMES:
            rel = entry.get(f"{table}_file")
            if not isinstance(rel, str) or not exists(rel):
                raise RunError(
                    f"{where}: unit {key} lists {table} file {rel!r}, which is missing "
                    "(rerun the same `engine synthesize` command to redo it)"
                )
            parts[table].append(rel)
    return parts


def _run(run_dir: Path, manifest: dict, root: Path | None, require_parts: bool,
         parts: dict, **store) -> Run:
    if require_parts and not parts["images"]:
        raise RunError(f"{store.get('uri') or run_dir}: the run has no finished units yet")
    recorded = (manifest.get("source") or {}).get("root")
    image_root = Path(root) if root is not None else Path(recorded or run_dir)
    if not image_root.is_absolute():
        image_root = run_dir / image_root
    return Run(run_dir, manifest, image_root, parts, **store)


def _open_store_run(location: str, root: Path | None, require_parts: bool) -> Run:
    """A run behind a URI. A `file://` run is a local folder after all: its parts are given as
    local paths, so every reader works on it. On object storage only the readers that go through
    `Run.connect` (query, stats, export) can read it."""
    try:
        loc = open_location(location)
    except LocationError as exc:
        raise RunError(str(exc)) from None
    if loc.local_path is not None and (loc.local_path / UNIT_LOG).exists():
        return open_run(loc.local_path, root, require_parts)  # a run written to a local path
    manifest = read_store_manifest(loc)
    _check_version(loc.uri, manifest)
    try:
        present = {t: _names(loc, t) for t in TABLE_NAMES}
    except OSError as exc:
        raise RunError(explain(exc, loc.uri)) from None
    parts = _listed_parts(loc.uri, manifest, lambda rel: rel in present[rel.split("/", 1)[0]])
    if loc.local_path is not None:
        run_dir = loc.local_path
        return _run(run_dir, manifest, root, require_parts,
                    {t: [run_dir / rel for rel in rels] for t, rels in parts.items()})
    paths = {t: [PurePosixPath(loc.path(rel)) for rel in rels] for t, rels in parts.items()}
    return _run(Path(loc.uri), manifest, root, require_parts, paths, fs=loc.fs, uri=loc.uri)


def _names(loc: Location, table: str) -> set[str]:
    """`table/NAME` of every object under the table's folder: one listing instead of a request
    per part."""
    selector = pafs.FileSelector(loc.path(table), allow_not_found=True)
    return {f"{table}/{i.base_name}" for i in loc.fs.get_file_info(selector)
            if i.type == pafs.FileType.File}


def check_file_version(path: Path, metadata: dict | None) -> None:
    """Raise SchemaError when a part file's footer names a schema this code cannot read."""
    from schemas.annotations import METADATA_KEY

    version = (metadata or {}).get(METADATA_KEY)
    if version is not None and not readable(version.decode()):
        raise SchemaError(f"{path}: schema version {version.decode()}, this engine reads "
                          f"{SCHEMA_VERSION.split('.')[0]}.x")
