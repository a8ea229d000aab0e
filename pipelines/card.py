"""What a finished run folder says about itself: a dataset card (README.md) and stats.json.

README.md follows the Hugging Face dataset card convention: YAML front matter whose `configs:`
name the `images` and `objects` tables, each with exactly the part files the run's manifest lists
(never a glob: a stale part left in the folder is not part of the run), so

    datasets.load_dataset(RUN_DIR, "objects")        # or "images"

works, and the card's text gives provenance, counts, licences and the right call for each reader
(`pd.read_parquet(RUN_DIR)` trips on manifest.json and the card, and
`ray.data.read_parquet(RUN_DIR)` merges the two tables into one).

stats.json is the img2dataset-style summary: counts, per-code rejects, wall time, rates, and
the counts of every unit. Both files are written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from pathlib import Path

import yaml

from schemas.runs import open_run

CARD = "README.md"
STATS = "stats.json"


def write_dataset_card(run_dir: Path, manifest: dict) -> Path:
    """Write RUN_DIR/README.md for the run whose (merged) manifest is `manifest`."""
    run_dir = Path(run_dir)
    run = open_run(run_dir)
    split = _split_name((manifest.get("source") or {}).get("split"))
    configs = []
    for table in ("objects", "images"):
        paths = [_relative(p, run_dir) for p in run.files(table)]
        configs.append({"config_name": table, "data_files": [{"split": split, "path": paths}]})
    licences = source_licences(manifest)
    front = {"configs": configs, "license": "other", "pretty_name": _title(manifest),
             "tags": ["mqengine", "segmentation", "synthetic-masks", "captions"]}
    text = "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + _body(manifest, split,
                                                                             licences)
    path = run_dir / CARD
    _write_atomic(path, text)
    return path


def _relative(path: str, run_dir: Path) -> str:
    return Path(path).relative_to(run_dir.resolve() if Path(path).is_absolute() else run_dir
                                  ).as_posix()


RESERVED_SPLITS = {"all"}  # datasets' keyword for the union of splits: not a split name


def _split_name(split: str | None) -> str:
    """datasets split names are word characters ('val-2017' is made 'val_2017'), and not one of
    datasets' reserved words ('all', the demo's split, becomes 'train')."""
    name = re.sub(r"\W+", "_", split or "train").strip("_")
    return name if name and name not in RESERVED_SPLITS else "train"


def _title(manifest: dict) -> str:
    source = manifest.get("source") or {}
    return f"mqengine run {manifest.get('run_id', '?')} of {source.get('name', '?')}"


def source_licences(manifest: dict) -> list[dict]:
    """The `licenses` list of the source's COCO-style annotation file, read as a stream that
    stops at the end of that list (or where the annotations begin: a file that keeps its
    licences after the annotations is not scanned to the end for them)."""
    recorded = (manifest.get("source") or {}).get("licenses")
    if recorded is not None:
        return list(recorded)
    path = (manifest.get("source") or {}).get("annotation_file")
    if not path or not Path(path).is_file():
        return []
    import ijson

    licences: list[dict] = []
    try:
        with open(path, "rb") as f:
            for item in _licence_items(ijson.parse(f)):
                licences.append(item)
    except (ijson.JSONError, OSError, UnicodeDecodeError):
        return []  # the card is a courtesy: the run's own reader reported any bad file
    return licences


def _licence_items(events):
    import ijson

    builder = None
    for prefix, event, value in events:
        if prefix in ("annotations", "images") and event == "start_array":
            return
        if prefix == "licenses" and event == "end_array":
            return
        if prefix == "licenses.item" and event == "start_map":
            builder = ijson.ObjectBuilder()
        if builder is not None:
            builder.event(event, value)
            if prefix == "licenses.item" and event == "end_map":
                yield builder.value
                builder = None


def _body(manifest: dict, split: str, licences: list[dict]) -> str:
    source = manifest.get("source") or {}
    config = manifest.get("config") or {}
    totals = manifest.get("totals") or {}
    masker = (config.get("masker") or {}).get("name", "?")
    captioner = (config.get("captioner") or {}).get("name", "?")
    lic = "\n".join(f"- {x.get('name', '?')} ({x.get('url', 'no url')})" for x in licences)
    return f"""# {_title(manifest)}

Masks and captions synthesized by mqengine for the boxes of
`{source.get('name')}` (split `{source.get('split')}`, root `{source.get('root')}`), schema
{manifest.get('schema_version')}. Column meanings: docs/schema.md of the engine.

## Provenance
- masker `{masker}`, captioner `{captioner}`; every mask says what made it in `mask_origin`
  (`gt` = the source's own), every caption in `provenance`.
- quality thresholds: `{json.dumps(config.get('quality') or {})}`
- code version {manifest.get('code_version')}, run {manifest.get('run_id')},
  created {manifest.get('created')}, updated {manifest.get('updated')}

## Counts
| images | images bad | objects | kept | filtered | rejected |
|---|---|---|---|---|---|
| {totals.get('images', 0)} | {totals.get('images_bad', 0)} | {totals.get('objects', 0)} | \
{totals.get('kept', 0)} | {totals.get('filtered', 0)} | {totals.get('rejected', 0)} |

Every input annotation is one row of `objects`: `kept`, `filtered` (a quality threshold failed;
scores kept) or `rejected` (bad input), with `reject_code` and `reject_reason`.

## Licences
The source's licences apply to the images and its annotations:
{lic or '- none recorded by the source (check the dataset you synthesized from)'}

## Reading it
```python
import datasets; datasets.load_dataset("RUN_DIR", "objects")["{split}"]   # or "images"
from schemas.runs import open_run; run = open_run("RUN_DIR")            # the engine's reader
import pandas as pd; pd.concat(pd.read_parquet(f) for f in run.files("objects"))
import duckdb; duckdb.sql(f"SELECT * FROM read_parquet({{run.files('objects')}})")
import ray; ray.data.read_parquet(run.files("objects"))
```
Not `pd.read_parquet("RUN_DIR")` (it trips on manifest.json and this card) nor
`ray.data.read_parquet("RUN_DIR")` (it merges `images` and `objects` into one table): read the
part files of one table, as listed in this card and in manifest.json.
"""


def write_stats(run_dir: Path, manifest: dict, wall_s: float | None = None) -> Path:
    """Write RUN_DIR/stats.json: totals, rejects per code (from the shards), wall time and rates
    (`wall_s`, else the manifest's created -> updated), and every unit's counts."""
    run_dir = Path(run_dir)
    con = open_run(run_dir).connect()
    codes = con.execute(
        "SELECT status, reject_code, count(*) FROM objects WHERE NOT keep GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    per_code: dict[str, dict[str, int]] = {}
    for status, code, n in codes:
        per_code.setdefault(status, {})[code] = n
    if wall_s is None:
        wall_s = wall_seconds(manifest)
    totals = dict(manifest.get("totals") or {})
    rates = {}
    if wall_s:
        rates = {f"{k}_per_s": round(totals.get(k, 0) / wall_s, 3) for k in ("images", "objects")}
    stats = {
        "run_id": manifest.get("run_id"),
        "schema_version": manifest.get("schema_version"),
        "source": (manifest.get("source") or {}).get("name"),
        "totals": totals,
        "input_objects": (manifest.get("plan") or {}).get("objects"),
        "not_kept_by_code": per_code,
        "wall_s": wall_s,
        "rates": rates,
        "units": {k: v.get("counts", {}) for k, v in sorted((manifest.get("units") or {}).items())},
    }
    path = run_dir / STATS
    _write_atomic(path, json.dumps(stats, indent=1) + "\n")
    return path


def wall_seconds(manifest: dict) -> float | None:
    try:
        start = datetime.fromisoformat(manifest["created"])
        end = datetime.fromisoformat(manifest["updated"])
    except (KeyError, TypeError, ValueError):
        return None
    return max((end - start).total_seconds(), 0.0)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
