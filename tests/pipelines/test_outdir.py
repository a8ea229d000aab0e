"""The user's files are sacred: --out never overlaps the data, a foreign folder is refused,
--overwrite deletes only the run's own files, one writer at a time, temp files never outlive a
failure, and inputs changed between a kill and its resume are noticed."""

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.query import connect
from pipelines import shards
from pipelines.captioners import CaptionerConfig
from pipelines.maskers import MaskerConfig
from pipelines.sources import SourceConfig
from pipelines.synthesize import SynthesizeConfig, run
from tests.helpers.coco_fixture import write_coco

ROOT = Path(__file__).parents[2]


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data"
    return root, write_coco(root, n_images=7, objects_per_image=2)


def config(dataset, out, **over):
    root, ann = dataset
    kw = dict(
        source=SourceConfig("coco", root, ann, "val"),
        out=out,
        masker=MaskerConfig(name="box"),
        captioner=CaptionerConfig(name="none"),
        unit_size=3,
        executor="local",
    )
    kw.update(over)
    return SynthesizeConfig(**kw)


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("where", ["root", "inside", "containing", "annotation folder"])
def test_out_overlapping_the_dataset_is_refused_and_nothing_is_written(dataset, tmp_path, where):
    root, ann = dataset
    before = listing(tmp_path)
    out = {
        "root": root,
        "inside": root / "images" / "run",
        "containing": tmp_path,
        "annotation folder": root,
    }[where]
    cfg = config(dataset, out)
    if where == "annotation folder":  # coco with no --root: images live beside the JSON
        cfg.source.root = None
    with pytest.raises(ValueError, match="overlaps the"):
        run(cfg)
    assert listing(tmp_path) == before
    assert not (root / "images" / "run").exists()


def test_a_non_empty_folder_without_a_run_is_refused(dataset, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="not empty and holds no engine run.*thesis.tex"):
        run(config(dataset, out))
    assert listing(out) == {"thesis.tex": b"years of work"}


def test_an_empty_folder_is_adopted(dataset, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert run(config(dataset, out)).units_written == 3


def test_overwrite_deletes_only_files_the_run_recorded(dataset, tmp_path):
    out = tmp_path / "out"
    run(config(dataset, out))
    (out / "images" / "holiday.jpg").write_bytes(b"user photo")
    (out / "objects" / "part-00099.parquet").write_bytes(b"not listed by the manifest")
    (out / "notes.txt").write_text("mine")
    summary = run(config(dataset, out, masker=MaskerConfig(name="grabcut"), overwrite=True))
    assert summary.units_written == 3
    assert (out / "images" / "holiday.jpg").read_bytes() == b"user photo"
    assert (out / "objects" / "part-00099.parquet").read_bytes() == b"not listed by the manifest"
    assert (out / "notes.txt").read_text() == "mine"
    # ...and readers read only what the new manifest lists, not the stray part file.
    n = connect(out).execute("SELECT count(*) FROM objects").fetchone()[0]
    assert n == summary.totals["objects"] == 14


def test_readers_read_only_the_parts_the_manifest_lists(dataset, tmp_path):
    out = tmp_path / "out"
    run(config(dataset, out))
    (out / "manifest.json").unlink()
    (out / "_units.jsonl").unlink()
    small = run(config(dataset, out, limit=2))  # a new plan: 1 unit; parts 1 and 2 are stale
    assert small.units_total == 1
    n = connect(out).execute("SELECT count(*) FROM objects").fetchone()[0]
    assert n == small.totals["objects"] == 4


HOLD_LOCK = """
import sys, time
from pathlib import Path
from pipelines.outdir import OutputLock
OutputLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_naming_the_holder(dataset, tmp_path):
    out = tmp_path / "out"
    run(config(dataset, out, limit=3))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=f"in use by another engine run \\(pid {holder.pid} "):
            run(config(dataset, out, masker=MaskerConfig(name="grabcut"), overwrite=True))
        assert (out / "manifest.json").exists()  # the holder's run is untouched
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's lock: the next run goes ahead.
    assert run(config(dataset, out, limit=3)).units_written == 0


def test_disk_full_is_one_line_leaves_no_temp_files_and_resumes_identically(
    dataset, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    real_write = shards.pq.write_table
    calls = {"n": 0}

    def fill_disk(table, where, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # unit 1's images file
            Path(where).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(table, where, **kw)

    monkeypatch.setattr(shards.pq, "write_table", fill_disk)
    with pytest.raises(shards.DiskFullError, match="images/part-00001.parquet: no space left"):
        run(config(dataset, out))
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    monkeypatch.setattr(shards.pq, "write_table", real_write)
    resumed = run(config(dataset, out))
    assert resumed.units_skipped == 1 and resumed.units_written == 2
    clean = run(config(dataset, tmp_path / "clean"))
    for table in ("images", "objects"):
        a = connect(out).execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall()
        b = connect(tmp_path / "clean").execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall()
        assert a == b
    assert resumed.totals == clean.totals


def test_an_edited_annotation_file_is_refused_naming_it(dataset, tmp_path):
    root, ann = dataset
    out = tmp_path / "out"
    run(config(dataset, out))
    data = json.loads(ann.read_text())
    data["annotations"][0]["bbox"][2] += 5
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"an input file changed.*{ann.name}"):
        run(config(dataset, out))


def test_a_touched_but_unchanged_annotation_file_resumes(dataset, tmp_path):
    root, ann = dataset
    out = tmp_path / "out"
    run(config(dataset, out))
    os.utime(ann, (time.time() + 100, time.time() + 100))
    assert run(config(dataset, out)).units_written == 0


def test_an_image_changed_before_resume_is_redone(dataset, tmp_path):
    root, _ = dataset
    out = tmp_path / "out"
    run(config(dataset, out))
    before = dict(connect(out).execute("SELECT file_path, sha256 FROM images").fetchall())
    image = root / "images" / "img_004.png"
    pixels = cv2.imread(str(image))
    cv2.imwrite(str(image), np.ascontiguousarray(255 - pixels))
    resumed = run(config(dataset, out))
    assert resumed.units_written == 1 and resumed.units_skipped == 2  # only img_004's unit
    after = dict(connect(out).execute("SELECT file_path, sha256 FROM images").fetchall())
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"images/img_004.png"}


def test_a_wrong_root_stops_before_any_work(dataset, tmp_path):
    root, ann = dataset
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    message = f"--root {elsewhere}: none of the first 7 images of the plan exist there"
    with pytest.raises(ValueError, match=message):
        run(config(dataset, out, source=SourceConfig("coco", elsewhere, ann, "val")))
    assert not out.exists()  # the folder this run created is gone again
    with pytest.raises(FileNotFoundError, match="no such folder"):
        run(config(dataset, out, source=SourceConfig("coco", tmp_path / "nope", ann, "val")))
    with pytest.raises(NotADirectoryError, match="not a folder"):
        run(config(dataset, out, source=SourceConfig("coco", ann, ann, "val")))
    assert not out.exists()


def test_auto_unit_size_keeps_workers_busy_on_small_inputs(dataset, tmp_path):
    summary = run(config(dataset, tmp_path / "out", unit_size=None))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["plan"]["unit_size"] == 1 and summary.units_total == 7  # 7 images < 16 units
    assert manifest["config"]["unit_size"] == "auto"


def test_a_unit_of_images_without_annotations_finishes_and_resumes(tmp_path):
    root = tmp_path / "data"
    ann = write_coco(root, n_images=4, objects_per_image=2)
    data = json.loads(ann.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] > 2]
    ann.write_text(json.dumps(data))
    cfg = config((root, ann), tmp_path / "out", unit_size=2)
    first = run(cfg)
    assert first.units_written == 2 and first.totals["objects"] == 4
    assert run(cfg).units_written == 0  # the empty unit counts as done


def test_a_failed_run_leaves_no_temporary_files_anywhere(dataset, tmp_path):
    """A malformed annotation file fails mid-scan: one line, exit 2, and neither the annotation
    index (under TMPDIR) nor a plan/manifest temp file nor the new --out folder is left behind."""
    root, ann = dataset
    bad = root / "broken.json"
    bad.write_text(ann.read_text()[:-40])  # truncated mid-annotation
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    out = tmp_path / "out"
    args = ["synthesize", "--source", "coco", "--root", str(root), "--annotations", str(bad),
            "--out", str(out), "--executor", "local", "--captioner", "none"]
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "TMPDIR": str(tmpdir)}, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "broken.json" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmpdir.iterdir()) == []
    assert not out.exists()


def test_embedded_hf_images_are_written_into_the_run_never_into_the_dataset(tmp_path):
    """An hf dataset with embedded image bytes: the engine writes those images under the run's
    own _images/ (recorded relative to the run), the dataset folder is left byte for byte, and a
    run folder moved elsewhere still finds its images."""
    import shutil

    from pipelines.reader import RunDataset
    from schemas import open_run
    from tests.pipelines.sources.test_hf import _coco_like

    ds, rows = _coco_like()
    data = tmp_path / "saved"
    ds.save_to_disk(str(data))
    before = listing(data)
    out = tmp_path / "out"
    cfg = SynthesizeConfig(SourceConfig("hf", data), out, masker=MaskerConfig(name="box"),
                           captioner=CaptionerConfig(name="none"), executor="local")
    summary = run(cfg)
    assert summary.totals["images_ok"] == len(rows)
    assert listing(data) == before
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["root"] == "_images"
    assert len(list((out / "_images").iterdir())) == len(rows)
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    sample = RunDataset(open_run(moved), where="true")[0]
    assert sample["image"].shape == (30, 40, 3)
    assert run(cfg).units_written == summary.units_total  # the old --out is gone: a fresh run


def test_a_missing_annotation_file_is_named_before_anything_else(dataset, tmp_path):
    root, _ = dataset
    cfg = config(dataset, tmp_path / "out", source=SourceConfig("coco", None, root / "nope.json"))
    with pytest.raises(FileNotFoundError, match="--annotations .*nope.json: no such file"):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_new_weights_at_the_same_path_are_a_new_run_not_a_resume(dataset, tmp_path, monkeypatch):
    """A masker's checkpoint is an input like the annotation file: replacing it is refused (its
    masks would carry the old model's provenance), naming the file."""
    from pipelines.maskers import MASKERS
    from pipelines.maskers.box import BoxMasker

    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"version 1")
    monkeypatch.setitem(MASKERS, "fake", lambda cfg: BoxMasker())
    masker = MaskerConfig(name="fake", sam_checkpoint=weights)
    run(config(dataset, tmp_path / "out", masker=masker))
    weights.write_bytes(b"version 2")
    with pytest.raises(ValueError, match="an input file changed.*weights.pt"):
        run(config(dataset, tmp_path / "out", masker=masker))


def test_ctrl_c_while_planning_leaves_nothing(dataset, tmp_path, monkeypatch):
    """Interrupted while the plan is being written (index built, plan half done): the folder this
    run created is removed again, scaffolding and all, and the same command then runs cleanly."""
    import pipelines.synthesize as synth

    def interrupted(*args, **kwargs):
        (tmp_path / "out" / "_plan" / "half-built").mkdir(parents=True, exist_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "write_index_plan", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(config(dataset, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    assert run(config(dataset, tmp_path / "out")).units_written == 3
