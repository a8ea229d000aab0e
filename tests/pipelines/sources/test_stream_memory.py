"""The streaming reader's memory stays bounded: measured against json.load of the same file.

Each side runs in a fresh subprocess and reports its peak RSS (VmHWM) minus its RSS once its imports
are done, so the numbers compare the cost of reading the annotations, not of importing libraries.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines.sources.fixtures import write_objects365_fixture

REPO = Path(__file__).resolve().parents[3]

_RSS = """
def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
"""

BASELINE = _RSS + """
import json, sys
base = rss_kb("VmRSS")
doc = json.load(open(sys.argv[1]))
n = len(doc["annotations"])
print(json.dumps({"extra_kb": rss_kb("VmHWM") - base, "boxes": n}))
"""

OURS = _RSS + """
import json, sys
from pathlib import Path
import duckdb, pyarrow as pa
from pipelines.sources.objects365 import Objects365Source
# Libraries' one-time set-up (pyarrow's first table, DuckDB's first query) is not reading cost.
pa.table({"a": ["x"]})
duckdb.sql("SELECT 1").fetchall()
src = Objects365Source("train", Path(sys.argv[1]).parent, Path(sys.argv[1]),
                       cache_dir=Path(sys.argv[2]), memory_limit="32MB")
base = rss_kb("VmRSS")
n = sum(len(r.objects) for r in src.records())
print(json.dumps({"extra_kb": rss_kb("VmHWM") - base, "boxes": n}))
"""


def _run(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_streaming_reader_uses_a_fraction_of_json_load_memory(tmp_path):
    path = tmp_path / "zhiyuan_objv2_train.json"
    info = write_objects365_fixture(path, n_images=10_000, boxes_per_image=25, seed=1)
    assert info["n_boxes"] == 250_000
    baseline = _run(BASELINE, str(path))
    ours = _run(OURS, str(path), str(tmp_path / "cache"))
    assert baseline["boxes"] == ours["boxes"] == 250_000
    print(f"\nextra peak RSS: json.load {baseline['extra_kb'] / 1024:.0f} MiB, streaming reader "
          f"{ours['extra_kb'] / 1024:.0f} MiB ({info['bytes'] / 2**20:.0f} MiB file)")
    # Measured here: ~70 MiB against ~200 MiB; ours stays near that at 1M boxes (json.load: ~4x).
    assert ours["extra_kb"] < 0.5 * baseline["extra_kb"], (ours, baseline)


@pytest.mark.slow
def test_the_duckdb_sort_of_the_raw_files_fits_a_small_memory_limit(tmp_path, monkeypatch):
    # The sort-free path takes ordered files; an out-of-order one still gets DuckDB's sort of
    # the raw files, which must fit the limit (raw files written without statistics did not).
    from pipelines.sources import sortfree, stream

    path = tmp_path / "zhiyuan_objv2_train.json"
    info = write_objects365_fixture(path, n_images=10_000, boxes_per_image=25, seed=1)
    sorts = []
    real = stream._group
    monkeypatch.setattr(stream, "STREAM_IN_ORDER", False)
    monkeypatch.setattr(sortfree, "write_in_order", lambda folder: False)
    monkeypatch.setattr(stream, "_group", lambda *a: sorts.append(a) or real(*a))
    index = stream.build_index(path, tmp_path / "index", "32MB")
    assert len(sorts) == 1
    assert (index.n_images, index.n_annotations) == (info["n_images"], info["n_boxes"])
