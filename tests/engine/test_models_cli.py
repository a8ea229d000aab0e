"""Model-backed synthesis through the CLI: tiny random SAM and BLIP saved in their release formats,
loaded through the real flags, run on Ray with 1 and 2 workers; up-front checkpoint errors; a worker
that dies mid-unit is restarted and its unit retried."""

import json
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from engine.cli import main
from tests.helpers.tiny_models import save_blip, save_sam_checkpoint

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return save_sam_checkpoint(d / "sam_tiny.pth", "tiny"), save_blip(d / "blip-tiny")


def synth(out: Path, *extra: str) -> int:
    return main(["synthesize", "--source", "demo", "--split", "scenes", "--limit", "6",
                 "--unit-size", "2", "--out", str(out), *extra])


def rows(out: Path, drop=("run_id",)) -> list[str]:
    table = pq.read_table(out / "objects")
    return sorted(json.dumps({k: v for k, v in r.items() if k not in drop}, sort_keys=True)
                  for r in table.to_pylist())


def test_sam_and_hf_captioner_on_ray_give_the_same_rows_with_1_and_2_workers(models, tmp_path):
    sam, blip = models
    flags = ["--masker", "sam", "--sam-checkpoint", str(sam), "--sam-model", "tiny",
             "--captioner", "hf", "--caption-model", str(blip), "--captions-per-object", "3",
             "--device", "cpu", "--executor", "ray"]
    assert synth(tmp_path / "w1", *flags, "--workers", "1") == 0
    assert synth(tmp_path / "w2", *flags, "--workers", "2") == 0
    assert rows(tmp_path / "w1", drop=()) == rows(tmp_path / "w2", drop=())
    con = duckdb.connect()
    objects = f"read_parquet('{tmp_path}/w1/objects/*.parquet')"
    origins = con.execute(f"SELECT DISTINCT mask_origin FROM {objects}").fetchall()
    assert origins == [("sam:tiny",)]
    n, scored = con.execute(
        f"SELECT count(*), count(*) FILTER (pred_iou BETWEEN 0 AND 1 AND stability BETWEEN 0 AND 1)"
        f" FROM {objects}").fetchone()
    assert n > 0 and scored == n
    caps = con.execute(
        f"SELECT len(captions), list_distinct(list_transform(captions, lambda c: c.provenance)), "
        f"list_min(list_transform(captions, lambda c: c.score)), "
        f"list_max(list_transform(captions, lambda c: c.score)) FROM {objects}").fetchall()
    for count, provenance, low, high in caps:
        assert 1 <= count <= 3 and provenance == ["hf:blip-tiny"] and 0 <= low <= high <= 1


@pytest.mark.parametrize("content, needle", [(b"not a checkpoint", "not a readable PyTorch"),
                                             (None, "does not exist")])
def test_bad_checkpoint_is_one_error_before_any_work(tmp_path, capsys, content, needle):
    ckpt = tmp_path / "sam.pth"
    if content is not None:
        ckpt.write_bytes(content)
    out = tmp_path / "out"
    assert synth(out, "--masker", "sam", "--sam-checkpoint", str(ckpt)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert needle in err and str(ckpt) in err and "Traceback" not in err
    assert not out.exists()  # nothing planned, nothing written


def test_a_worker_killed_mid_unit_is_restarted_and_counts_add_up(tmp_path, monkeypatch):
    monkeypatch.setenv("MQENGINE_CRASH_MARKER", str(tmp_path / "crashed"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # Ray workers import the test masker
    assert synth(tmp_path / "crash", "--masker", "tests.helpers.crash_once:build",
                 "--captioner", "none", "--executor", "ray", "--workers", "1") == 0
    assert (tmp_path / "crashed").exists()  # the worker really died once
    assert synth(tmp_path / "clean", "--masker", "box", "--captioner", "none",
                 "--executor", "local") == 0
    assert rows(tmp_path / "crash") == rows(tmp_path / "clean")
    totals = json.loads((tmp_path / "crash" / "manifest.json").read_text())["totals"]
    assert totals["objects"] == totals["kept"] + totals["filtered"] + totals["rejected"] > 0
