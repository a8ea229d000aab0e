"""Ray that never hangs: which cluster a run uses, a cluster that does not answer, SIGTERM/Ctrl-C
mid-run (prompt exit, no Ray processes left, resumable), and `--executor auto` for small jobs."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from pipelines.captioners import CaptionerConfig
from pipelines.maskers import MaskerConfig
from pipelines.ray_runner import AUTO_MIN_IMAGES_PER_WORKER, choose_executor
from pipelines.sources import SourceConfig
from pipelines.synthesize import SynthesizeConfig, run
from tests.helpers.coco_fixture import write_coco

ROOT = Path(__file__).parents[2]
SLOW = "tests.helpers.slow_box:build"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    return root, write_coco(root, n_images=10, objects_per_image=3, bad=True)


@pytest.fixture
def ray_tmp():
    """A private Ray temp dir (short: Ray's socket paths must fit in 107 bytes), so these tests
    neither read nor clobber the machine's /tmp/ray."""
    with tempfile.TemporaryDirectory(prefix="rt", dir="/tmp") as d:
        yield Path(d)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(dataset, out: Path, *extra: str) -> list[str]:
    root, ann = dataset
    return [sys.executable, "-m", "engine.cli", "synthesize", "--source", "coco", "--root",
            str(root), "--annotations", str(ann), "--split", "val", "--out", str(out),
            "--captioner", "none", "--unit-size", "3", *extra]


def env(ray_tmp: Path, **extra: str) -> dict:
    e = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    e.update(PYTHONPATH=str(ROOT), RAY_TMPDIR=str(ray_tmp), **extra)
    return e


def read_rows(out: Path, table: str) -> list[str]:
    rows = pq.read_table(out / table).to_pylist()
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in rows)


def config(dataset, out, **over):
    root, ann = dataset
    kw = dict(source=SourceConfig("coco", root, ann, "val"), out=out,
              masker=MaskerConfig(name="box"), captioner=CaptionerConfig(name="none"),
              unit_size=3, executor="local")
    kw.update(over)
    return SynthesizeConfig(**kw)


def test_plain_run_ignores_a_dead_clusters_address_file_and_RAY_ADDRESS(dataset, tmp_path, ray_tmp):
    # What a `ray start` head that died leaves behind, plus RAY_ADDRESS pointing at it: Ray's own
    # ray.init() retries that address for ~14 minutes.
    dead = f"127.0.0.1:{closed_port()}"
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(dead)
    out = tmp_path / "out"
    done = subprocess.run(cli(dataset, out, "--masker", "box", "--executor", "ray",
                              "--workers", "1"),
                          cwd=ROOT, env=env(ray_tmp, RAY_ADDRESS=dead), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "joined Ray cluster" not in done.stderr
    # The private cluster really ran (its session is under our temp dir) and wrote every row.
    assert list((ray_tmp / "ray").glob("session_2*"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["objects"] == manifest["plan"]["objects"] > 0


def test_a_ray_address_that_does_not_answer_is_one_error_line_within_60s(
    dataset, tmp_path, ray_tmp
):
    address = f"127.0.0.1:{closed_port()}"
    start = time.monotonic()
    done = subprocess.run(cli(dataset, tmp_path / "out", "--masker", "box", "--ray-address",
                              address),
                          cwd=ROOT, env=env(ray_tmp), capture_output=True, text=True,
                          timeout=120)
    elapsed = time.monotonic() - start
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert elapsed < 60
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and address in errors[0] and "does not answer" in errors[0]
    assert "Traceback" not in output


HEAD_SCRIPT = """
import os, sys, time
os.environ["RAY_AUTH_MODE"] = "disabled"
import ray
ray.init(address="local", num_cpus=2, include_dashboard=False)
print(ray.get_runtime_context().gcs_address, flush=True)
time.sleep(300)
"""


def test_joins_only_a_named_cluster_and_says_so(dataset, tmp_path, ray_tmp):
    with tempfile.TemporaryDirectory(prefix="rh", dir="/tmp") as head_tmp:
        head = subprocess.Popen([sys.executable, "-c", HEAD_SCRIPT], cwd=ROOT,
                                env=env(Path(head_tmp)), stdout=subprocess.PIPE, text=True)
        try:
            address = head.stdout.readline().strip()
            assert address, "the test's Ray head did not start"
            # A live cluster in RAY_ADDRESS is not joined by a plain run ...
            plain = subprocess.run(cli(dataset, tmp_path / "plain", "--masker", "box",
                                       "--executor", "ray", "--workers", "1"),
                                   cwd=ROOT, env=env(ray_tmp, RAY_ADDRESS=address),
                                   capture_output=True, text=True, timeout=120)
            assert plain.returncode == 0, plain.stdout + plain.stderr
            assert "joined Ray cluster" not in plain.stderr
            # ... only one named by --ray-address, which the run reports with its resources.
            joined = subprocess.run(cli(dataset, tmp_path / "joined", "--masker", "box",
                                        "--ray-address", address, "--workers", "1"),
                                    cwd=ROOT, env=env(ray_tmp), capture_output=True, text=True,
                                    timeout=120)
            assert joined.returncode == 0, joined.stdout + joined.stderr
            assert "joined Ray cluster at " in joined.stderr and "(2 CPUs, 0 GPUs)" in joined.stderr
        finally:
            head.terminate()  # Ray's SIGTERM handler exits, its atexit hook shuts the head down
            head.wait(timeout=60)
    for table in ("images", "objects"):
        assert read_rows(tmp_path / "plain", table) == read_rows(tmp_path / "joined", table)


def driver_tree(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_ray_run_stops_promptly_leaves_no_ray_processes_and_resumes(
    dataset, tmp_path, ray_tmp, sig
):
    out = tmp_path / "stopped"
    # SIGINT as a terminal's process gets it: a test run started in the background (nohup, CI
    # runners) inherits SIGINT ignored, and Python keeps an ignored SIGINT ignored
    proc = subprocess.Popen(cli(dataset, out, "--masker", SLOW, "--executor", "ray",
                                "--workers", "2"),
                            cwd=ROOT, env=env(ray_tmp), stdout=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            stderr=subprocess.STDOUT, text=True)
    unit_log = out / "_units.jsonl"  # the resume marker, written right after each unit
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if unit_log.exists() and unit_log.read_text().strip():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run ended before it could be stopped: " + proc.stdout.read()
    helpers = driver_tree(proc.pid)
    assert any("raylet" in p.name() for p in alive(helpers))  # it really runs on local Ray
    sent = time.monotonic()
    proc.send_signal(sig)
    try:
        output, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"driver still running 30 s after {sig.name}")
    stopped_in = time.monotonic() - sent
    assert proc.returncode in (130, 143), output
    assert stopped_in < 10, f"took {stopped_in:.1f} s to stop"
    assert "Traceback" not in output
    left = alive(helpers)
    assert not left, [f"{p.pid} {p.name()}" for p in left]
    done = (out / "_units.jsonl").read_text().splitlines()
    assert 1 <= len(done) < 5

    resumed = run(config(dataset, out, masker=MaskerConfig(name=SLOW)))
    assert resumed.units_skipped == len(done) and resumed.units_written == 5 - len(done)
    clean = run(config(dataset, tmp_path / "clean", masker=MaskerConfig(name=SLOW)))
    for table in ("images", "objects"):
        assert read_rows(out, table) == read_rows(tmp_path / "clean", table)
    assert resumed.totals == clean.totals


def test_auto_runs_a_small_job_in_process_and_says_so(dataset, tmp_path, caplog):
    import ray

    with caplog.at_level(logging.WARNING, logger="pipelines.synthesize"):
        summary = run(config(dataset, tmp_path / "auto", executor="auto", workers=2))
    assert not ray.is_initialized()
    assert "13 images: running in-process (too small for 2 Ray workers)" in caplog.text
    assert summary.units_written == 5
    local = run(config(dataset, tmp_path / "local"))
    assert read_rows(tmp_path / "auto", "objects") == read_rows(tmp_path / "local", "objects")
    assert local.totals == summary.totals


def test_workers_build_their_models_once_and_a_wait_on_them_is_reported(
    dataset, tmp_path, caplog, monkeypatch
):
    import pipelines.ray_runner as ray_runner

    builds = tmp_path / "builds"
    monkeypatch.setattr(ray_runner, "STALL_WARNING_S", 1.0)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # Ray workers import the test masker
    monkeypatch.setenv("MQENGINE_BUILD_LOG", str(builds))
    with caplog.at_level(logging.WARNING, logger="pipelines.ray_runner"):
        summary = run(config(dataset, tmp_path / "out", executor="ray", workers=2, limit=12,
                             masker=MaskerConfig(name="tests.helpers.slow_box:build_slowly")))
    assert summary.units_written == 4
    # One build in the driver (the up-front check) and one per worker, for 4 units on 2 workers.
    pids = builds.read_text().split()
    assert len(pids) == len(set(pids)) == 3 and str(os.getpid()) in pids
    assert "no unit back after 1 s: workers still loading models" in caplog.text


def test_auto_threshold_and_a_named_cluster():
    n = AUTO_MIN_IMAGES_PER_WORKER * 2
    assert choose_executor(n - 1, 2, None)[0] == "local"
    assert choose_executor(n, 2, None)[0] == "ray"
    assert choose_executor(n - 1, 2, "local")[0] == "local"
    # workers=0 sizes the pool from the machine, as the Ray executor does.
    cpus = os.cpu_count() or 1
    assert choose_executor(AUTO_MIN_IMAGES_PER_WORKER * cpus - 1, 0, None)[0] == "local"
    assert choose_executor(AUTO_MIN_IMAGES_PER_WORKER * cpus, 0, None)[0] == "ray"
    # A cluster the user named is used however small the job.
    assert choose_executor(1, 2, "10.0.0.1:6379")[0] == "ray"
    assert choose_executor(1, 0, "auto")[0] == "ray"


@pytest.mark.parametrize(
    "resources, workers, share, expected",
    [
        ({"CPU": 16, "GPU": 1}, 0, 0.0, (1, 1.0, 1.0)),  # one worker per GPU
        ({"CPU": 16, "GPU": 1}, 0, 0.5, (2, 1.0, 0.5)),  # two workers share the GPU
        ({"CPU": 16, "GPU": 2}, 0, 0.25, (8, 1.0, 0.25)),
        ({"CPU": 16, "GPU": 2}, 4, 0.0, (4, 1.0, 0.5)),  # an even split over a given pool
        ({"CPU": 2}, 0, 0.5, (2, 0.5, 0.0)),  # no GPU: the share is moot
    ],
)
def test_gpu_share_per_worker(monkeypatch, resources, workers, share, expected):
    import ray

    from pipelines.ray_runner import worker_resources

    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    assert worker_resources(workers, True, share) == expected


def test_an_unsupported_out_scheme_is_one_clear_error(dataset, tmp_path):
    # file:// and s3:// are supported (tests/pipelines/test_objstore.py); others are refused early
    with pytest.raises(ValueError, match="unknown scheme 'gs'; choose one of: file, s3"):
        config(dataset, "gs://bucket/run")
