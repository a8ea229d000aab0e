"""Resume, kill-and-resume, config changes, Ray vs local: the run-level promises of the pipeline."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.captioners import CaptionerConfig
from pipelines.maskers import MaskerConfig
from pipelines.sources import SourceConfig
from pipelines.synthesize import SynthesizeConfig, run
from tests.helpers.coco_fixture import write_coco

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    return root, write_coco(root, n_images=10, objects_per_image=3, bad=True)


def config(dataset, out, **over):
    root, ann = dataset
    kw = dict(
        source=SourceConfig("coco", root, ann, "val"),
        out=out,
        masker=MaskerConfig(name="grabcut"),
        captioner=CaptionerConfig(name="none"),
        unit_size=3,
        executor="local",
    )
    kw.update(over)
    return SynthesizeConfig(**kw)


def read_rows(out: Path, table: str) -> list[str]:
    """Every row of every part file, as canonical JSON (so NaN boxes compare equal), sorted."""
    rows = pq.read_table(out / table).to_pylist()
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in rows)


def test_rerun_skips_finished_units_and_changes_nothing(dataset, tmp_path):
    first = run(config(dataset, tmp_path / "out"))
    assert first.units_written == first.units_total == 5  # 13 images / 3 per unit
    before = read_rows(tmp_path / "out", "objects")
    second = run(config(dataset, tmp_path / "out"))
    assert second.units_written == 0 and second.units_skipped == 5
    assert read_rows(tmp_path / "out", "objects") == before
    t = first.totals
    assert first.input_objects == t["kept"] + t["filtered"] + t["rejected"] == len(before)


def test_changed_configuration_is_refused_unless_overwrite(dataset, tmp_path):
    run(config(dataset, tmp_path / "out"))
    with pytest.raises(ValueError, match="different configuration"):
        run(config(dataset, tmp_path / "out", masker=MaskerConfig(name="box")))
    summary = run(
        config(dataset, tmp_path / "out", masker=MaskerConfig(name="box"), overwrite=True)
    )
    assert summary.units_written == 5
    origins = {json.loads(r)["mask_origin"] for r in read_rows(tmp_path / "out", "objects")}
    assert origins == {"box", None}


def test_damaged_or_unrecorded_shards_are_redone(dataset, tmp_path):
    out = tmp_path / "out"
    run(config(dataset, out))
    reference = read_rows(out, "objects")
    (out / "objects" / "part-00001.parquet").write_bytes(b"garbage")  # damaged after the fact
    # Killed after writing unit 3's files, before recording it (and mid-append of its log line).
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["units"]["00003"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    log_lines = (out / "_units.jsonl").read_text().splitlines()
    kept = [line for line in log_lines if '"00003"' not in line]
    (out / "_units.jsonl").write_text("\n".join(kept) + '\n{"unit": "00003", "ent')
    (out / "images" / ".part-00004.parquet.tmp-123").write_bytes(b"half")  # killed mid-write
    summary = run(config(dataset, out))
    assert summary.units_written == 2
    assert json.loads((out / "manifest.json").read_text())["totals"] == summary.totals
    assert read_rows(out, "objects") == reference
    assert not list((out / "images").glob(".*tmp*"))


KILL_SCRIPT = """
import sys, time
from pipelines.maskers import MASKERS
from pipelines.maskers.box import BoxMasker
class Slow(BoxMasker):
    def __call__(self, image, boxes):
        time.sleep(0.4)
        return super().__call__(image, boxes)
MASKERS["slowbox"] = lambda cfg: Slow()
from engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_run_resumes_to_exactly_the_uninterrupted_rows(dataset, tmp_path, monkeypatch):
    from pipelines.maskers import MASKERS
    from pipelines.maskers.box import BoxMasker

    root, ann = dataset
    out = tmp_path / "killed"
    args = [
        "synthesize",
        "--source",
        "coco",
        "--root",
        str(root),
        "--annotations",
        str(ann),
        "--split",
        "val",
        "--out",
        str(out),
        "--masker",
        "slowbox",
        "--captioner",
        "none",
        "--unit-size",
        "3",
        "--executor",
        "local",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        unit_log = out / "_units.jsonl"  # the resume marker, written right after each unit
        if unit_log.exists() and unit_log.read_text().strip():
            break
        time.sleep(0.05)
    assert proc.poll() is None, (
        "run finished before it could be killed: " + proc.stderr.read().decode()
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = (out / "_units.jsonl").read_text().splitlines()
    assert 1 <= len(done) < 5

    class Slow(BoxMasker):  # same name, same output as in the killed process
        pass

    monkeypatch.setitem(MASKERS, "slowbox", lambda cfg: Slow())
    resumed = run(config(dataset, out, masker=MaskerConfig(name="slowbox")))
    assert resumed.units_skipped == len(done) and resumed.units_written == 5 - len(done)
    clean = run(config(dataset, tmp_path / "clean", masker=MaskerConfig(name="slowbox")))
    for table in ("images", "objects"):
        assert read_rows(out, table) == read_rows(tmp_path / "clean", table)
    assert resumed.totals == clean.totals


def test_ray_with_two_workers_writes_the_same_rows_as_local(dataset, tmp_path):
    local = run(config(dataset, tmp_path / "local"))
    ray_run = run(config(dataset, tmp_path / "ray", executor="ray", workers=2))
    assert ray_run.units_written == local.units_written
    for table in ("images", "objects"):
        assert read_rows(tmp_path / "ray", table) == read_rows(tmp_path / "local", table)
