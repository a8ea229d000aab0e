"""`--out` as a URI: `file://` and S3 (moto's server on loopback), through pyarrow.fs.

What must hold there as on a local folder: readers see exactly the committed units (read back by
DuckDB through `engine query`/`stats` and by pyarrow), a killed run resumes to the rows of a clean
run, the orphan parts of a killed attempt are never read and are removed on resume, --overwrite
deletes only the run's own objects, one writer at a time, and every storage error is one line."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
from moto.server import ThreadedMotoServer

from engine.cli import main
from engine.query import run_query, stats
from pipelines.store import LOCK, RunStore, StoreLock
from schemas.location import open_location
from schemas.runs import open_run
from tests.helpers.coco_fixture import write_coco

ROOT = Path(__file__).parents[2]
SQL = ("SELECT o.object_id, o.image_id, o.category, o.status, o.box_iou, i.file_path "
       "FROM objects o JOIN images i USING (image_id) ORDER BY o.object_id")


@pytest.fixture(scope="module")
def moto_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(moto_endpoint, monkeypatch, request):
    """A fresh bucket on the loopback server, with the AWS variables a user would set."""
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto_endpoint,
           "AWS_EC2_METADATA_DISABLED": "true"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bucket = "mq-" + request.node.name.lower().replace("_", "-")[:40].strip("-[]")
    client = boto3.client("s3", endpoint_url=moto_endpoint)
    client.create_bucket(Bucket=bucket)
    return client, bucket, env


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data"
    return root, write_coco(root, n_images=7, objects_per_image=2)


def synth_args(dataset, out: str, *extra: str) -> list[str]:
    root, ann = dataset
    return ["synthesize", "--source", "coco", "--annotations", str(ann), "--root", str(root),
            "--out", out, "--masker", "box", "--captioner", "none", "--unit-size", "3",
            "--executor", "local", *extra]


def pyarrow_rows(location, table: str) -> list[dict]:
    """Every row of `table` read by pyarrow from the part files open_run lists."""
    run = open_run(location)
    rows: list[dict] = []
    for part in run.parts[table]:
        rows += pq.read_table(str(part), filesystem=run.fs).to_pylist()
    return sorted(rows, key=lambda r: r.get("object_id", r["image_id"]))


def keys(client, bucket: str, prefix: str) -> list[str]:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"][len(prefix):] for o in listed)


def test_file_uri_run_equals_a_local_run_through_engine_query(dataset, tmp_path, capsys):
    assert main(synth_args(dataset, str(tmp_path / "local"))) == 0
    uri = f"file://{tmp_path}/uri"
    assert main(synth_args(dataset, uri)) == 0
    capsys.readouterr()
    assert main(["query", uri, SQL, "--format", "json"]) == 0
    via_cli = json.loads(capsys.readouterr().out)
    assert len(via_cli) == 14
    assert run_query(uri, SQL) == run_query(tmp_path / "local", SQL)
    assert stats(uri) == stats(tmp_path / "local")
    for table in ("images", "objects"):
        assert pyarrow_rows(uri, table) == pyarrow_rows(tmp_path / "local", table)
    names = sorted(p.relative_to(tmp_path / "uri").as_posix()
                   for p in (tmp_path / "uri").rglob("*") if p.is_file())
    assert [n for n in names if n.startswith("_units/")] == [
        f"_units/unit-{k:05d}.json" for k in range(3)]
    assert LOCK not in names  # released


def test_a_run_on_shared_storage_reads_from_another_mount_point(dataset, tmp_path):
    """Shared storage (NFS, a cluster file system) is the local-path code: the driver writes every
    file, and the run records part names relative to its folder, so a process on another node
    that mounts it elsewhere (here: another path to the same folder, in another process) reads
    the same rows, as a path and as a file:// URI."""
    out = tmp_path / "shared" / "run"
    assert main(synth_args(dataset, str(out))) == 0
    (tmp_path / "node2").mkdir()
    (tmp_path / "node2" / "mnt").symlink_to(tmp_path / "shared")
    elsewhere = tmp_path / "node2" / "mnt" / "run"
    code = ("import json, sys; from engine.query import run_query; "
            "print(json.dumps([run_query(a, sys.argv[1])[1] for a in sys.argv[2:]], default=str))")
    proc = subprocess.run([sys.executable, "-c", code, SQL, str(elsewhere), f"file://{elsewhere}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    from_mount, from_uri = json.loads(proc.stdout)
    expected = json.loads(json.dumps(run_query(out, SQL)[1], default=str))
    assert from_mount == expected and from_uri == expected and len(expected) == 14


def test_a_run_is_resumed_only_in_the_layout_it_was_written_in(dataset, tmp_path, capsys):
    """A local-path run (unit log) and a URI run (commit objects) of one folder do not mix: each
    is refused in the other's form, naming the form to use, and nothing is written."""
    local, uri_dir = tmp_path / "local", tmp_path / "uri"
    assert main(synth_args(dataset, str(local))) == 0
    assert main(synth_args(dataset, f"file://{uri_dir}")) == 0
    before = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    capsys.readouterr()
    assert main(synth_args(dataset, f"file://{local}")) == 2
    assert f"resume it as --out {local}" in capsys.readouterr().err
    assert main(synth_args(dataset, str(uri_dir))) == 2
    assert f"resume it as --out file://{uri_dir}" in capsys.readouterr().err
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == before


def test_s3_run_on_loopback_reads_back_with_query_stats_export_show_report(dataset, tmp_path, s3,
                                                                   capsys):
    client, bucket, _ = s3
    uri = f"s3://{bucket}/runs/a"
    assert main(synth_args(dataset, uri)) == 0
    assert main(synth_args(dataset, str(tmp_path / "local"))) == 0
    capsys.readouterr()
    assert main(["stats", uri, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["images by status"] == [
        {"status": "ok", "images": 7}]
    assert run_query(uri, SQL) == run_query(tmp_path / "local", SQL)
    for table in ("images", "objects"):
        assert pyarrow_rows(uri, table) == pyarrow_rows(tmp_path / "local", table)
    assert main(["export", uri, "--to", str(tmp_path / "coco.json")]) == 0
    assert main(["export", str(tmp_path / "local"), "--to", str(tmp_path / "local.json")]) == 0
    exported = json.loads((tmp_path / "coco.json").read_text())
    assert exported["annotations"] == json.loads((tmp_path / "local.json").read_text())[
        "annotations"]
    for run_dir, png in ((uri, "s3.png"), (str(tmp_path / "local"), "local.png")):
        assert main(["show", run_dir, "--to", str(tmp_path / png)]) == 0
    assert (tmp_path / "s3.png").read_bytes() == (tmp_path / "local.png").read_bytes()
    assert main(["report", uri]) == 2  # no local folder to write beside: --out is needed
    assert main(["report", uri, "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "index.html").is_file()
    listed = keys(client, bucket, "runs/a/")
    assert "manifest.json" in listed and ".mqengine-run" in listed and LOCK not in listed
    assert sum(k.startswith("_units/unit-") for k in listed) == 3


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


def kill_after_first_commit(args: list[str], commits, env: dict | None = None) -> int:
    """Run `engine` with a slow masker in a child process; SIGKILL it once `commits()` (the
    number of commit objects) is at least 1, while the run is still going. Returns its pid."""
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, *args], cwd=ROOT,
                            env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and commits() < 1:
        time.sleep(0.05)
    assert proc.poll() is None, "run ended before it was killed: " + proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_killed_run_never_reads_orphans_and_resumes_to_the_clean_rows(
    dataset, tmp_path, request, monkeypatch, kind
):
    from pipelines.maskers import MASKERS
    from pipelines.maskers.box import BoxMasker

    if kind == "s3":
        client, bucket, env = request.getfixturevalue("s3")
        uri = f"s3://{bucket}/run"

        def commits():
            return len(keys(client, bucket, "run/_units/"))
    else:
        env, uri = {}, f"file://{tmp_path}/run"

        def commits():
            return len(list((tmp_path / "run" / "_units").glob("unit-*.json")))

    args = synth_args(dataset, uri)
    args[args.index("box")] = "slowbox"
    pid = kill_after_first_commit(args, commits, env)
    scratch = Path(tempfile.gettempdir()).glob(f"mqengine-plan-{pid}-*")
    assert list(scratch), "the killed driver's plan folder is expected to be left behind"
    done = commits()
    assert 1 <= done < 3
    store = RunStore(open_location(uri))
    assert store.exists(LOCK)  # a killed writer cannot remove its lock object
    # A killed attempt's part (the run's naming, no commit) and two objects not of its naming.
    committed = open_run(uri, require_parts=False).parts["images"][0]
    orphan = "images/part-00002-deadbeef.parquet"
    store.write_atomic(orphan, store.read(f"images/{Path(str(committed)).name}"))
    store.write_atomic("images/notes.txt", b"mine")
    store.write_atomic("images/part-2.parquet", b"not the engine's naming")
    before = open_run(uri)
    assert all("deadbeef" not in str(p) for p in before.parts["images"])
    assert run_query(uri, "SELECT count(*) FROM images")[1] == [(3 * done,)]

    class Slow(BoxMasker):  # same output as the killed process's masker
        pass

    monkeypatch.setitem(MASKERS, "slowbox", lambda cfg: Slow())
    assert main(args) == 0  # the dead holder's lock is taken over (same host, pid gone)
    assert not store.exists(orphan)
    assert not list(Path(tempfile.gettempdir()).glob(f"mqengine-plan-{pid}-*"))  # dead: removed
    assert store.read("images/notes.txt") == b"mine"
    assert store.exists("images/part-2.parquet")
    clean = synth_args(dataset, str(tmp_path / "clean"))
    clean[clean.index("box")] = "slowbox"  # the same configuration: the same run_id in rows
    assert main(clean) == 0
    assert run_query(uri, SQL) == run_query(tmp_path / "clean", SQL)
    for table in ("images", "objects"):
        assert pyarrow_rows(uri, table) == pyarrow_rows(tmp_path / "clean", table)
    manifest = json.loads(store.read("manifest.json"))
    assert manifest["totals"]["images"] == 7 and len(manifest["units"]) == 3


def test_an_endpoint_lost_mid_run_is_one_line_and_the_run_resumes(dataset, tmp_path, s3,
                                                                  monkeypatch):
    """The S3 server goes away after the first commit: the writer stops with one line (exit 2,
    bounded retries), and the same command against the server back (another port, same data)
    resumes to the rows of a clean run."""
    from pipelines.maskers import MASKERS
    from pipelines.maskers.box import BoxMasker

    client, bucket, env = s3
    own = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # moto keeps its
    own.start()  # data in the process, so a second server on another port serves the same bucket
    host, port = own.get_host_and_port()
    args = synth_args(dataset, f"s3://{bucket}/run")
    args[args.index("box")] = "slowbox"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, *args], cwd=ROOT,
                            env={**os.environ, "AWS_ENDPOINT_URL": f"http://{host}:{port}"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not keys(client, bucket, "run/_units/"):
        time.sleep(0.05)
    own.stop()
    started = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and time.monotonic() - started < 90
    error = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "cannot reach the endpoint" in error[0], err
    assert "Traceback" not in err

    class Slow(BoxMasker):
        pass

    monkeypatch.setitem(MASKERS, "slowbox", lambda cfg: Slow())
    assert main(args) == 0  # the shared fixture's server: the same bucket, another endpoint
    clean = synth_args(dataset, str(tmp_path / "clean"))
    clean[clean.index("box")] = "slowbox"
    assert main(clean) == 0
    assert run_query(f"s3://{bucket}/run", SQL) == run_query(tmp_path / "clean", SQL)


def test_overwrite_on_s3_deletes_only_the_runs_own_objects(dataset, tmp_path, s3, capsys):
    client, bucket, _ = s3
    uri = f"s3://{bucket}/run"
    assert main(synth_args(dataset, uri)) == 0
    client.put_object(Bucket=bucket, Key="run/images/keep.txt", Body=b"x")
    client.put_object(Bucket=bucket, Key="run/notes.md", Body=b"x")
    client.put_object(Bucket=bucket, Key="beside/part-00000-aaaaaaaa.parquet", Body=b"x")
    first = set(keys(client, bucket, "run/"))
    assert main(synth_args(dataset, uri, "--unit-size", "2")) == 2  # changed: refused
    assert f"{uri} holds a run with a different configuration" in capsys.readouterr().err
    assert main(synth_args(dataset, uri, "--unit-size", "2", "--overwrite")) == 0
    now = set(keys(client, bucket, "run/"))
    assert {"images/keep.txt", "notes.md"} <= now
    old_parts = {k for k in first if k.startswith(("images/part-", "objects/part-"))}
    assert not old_parts & now
    assert sum(k.startswith("_units/") for k in now) == 4  # 7 images in units of 2
    assert keys(client, bucket, "beside/") == ["part-00000-aaaaaaaa.parquet"]
    assert run_query(uri, "SELECT count(*) FROM objects")[1] == [(14,)]


def test_a_foreign_prefix_is_refused_and_left_alone(dataset, s3, capsys):
    client, bucket, _ = s3
    client.put_object(Bucket=bucket, Key="theirs/data.csv", Body=b"x")
    assert main(synth_args(dataset, f"s3://{bucket}/theirs")) == 2
    err = capsys.readouterr().err
    assert "not empty and holds no engine run (data.csv)" in err and len(err.splitlines()) == 1
    assert keys(client, bucket, "theirs/") == ["data.csv"]


def test_the_lock_is_a_conditional_create_and_names_a_live_holder(dataset, s3, capsys):
    client, bucket, _ = s3
    store = RunStore(open_location(f"s3://{bucket}/run"))
    first = StoreLock(store).acquire()
    try:
        with pytest.raises(ValueError, match=r"in use by another engine run \(pid \d+ on host"):
            StoreLock(RunStore(open_location(f"s3://{bucket}/run"))).acquire()
        store.write_atomic(".mqengine-run", b"{}\n")
        assert main(synth_args(dataset, f"s3://{bucket}/run")) == 2
        assert "is in use by another engine run" in capsys.readouterr().err
        first.check()  # the refused writers did not take or touch it
    finally:
        first.release()
    assert not store.exists(LOCK)


def test_a_stale_lock_of_another_host_is_taken_over_and_the_loser_stops(s3, monkeypatch):
    _, bucket, _ = s3
    store = RunStore(open_location(f"s3://{bucket}/run"))
    old = {"token": "t", "pid": 1, "host": "elsewhere", "beat": time.time() - 3600}
    store.write_atomic(LOCK, json.dumps(old).encode())
    lock = StoreLock(store).acquire()
    lock.check()
    # another writer took the lock over (e.g. this one was paused past LOCK_STALE_S)
    store.write_atomic(LOCK, json.dumps({**old, "token": "u", "beat": time.time()}).encode())
    with pytest.raises(ValueError, match="another writer took the run's lock"):
        lock.check()
    lock.release()
    assert json.loads(store.read(LOCK))["token"] == "u"  # not ours: not deleted


def test_missing_s3_credentials_are_one_line_before_any_write(dataset, s3, monkeypatch,
                                                             capsys):
    client, bucket, _ = s3
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    assert main(synth_args(dataset, f"s3://{bucket}/run")) == 2
    err = capsys.readouterr().err
    assert "no AWS credentials found" in err and len(err.splitlines()) == 1
    assert keys(client, bucket, "") == []


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("command", ["synthesize", "query"])
def test_storage_errors_are_one_line_and_bounded(dataset, s3, monkeypatch, capsys, command):
    _, bucket, _ = s3

    def run(uri: str) -> str:
        argv = synth_args(dataset, uri) if command == "synthesize" else ["query", uri, "SELECT 1"]
        started = time.monotonic()
        assert main(argv) == 2
        assert time.monotonic() - started < 60  # bounded timeouts, no hang
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        return err

    assert "unknown scheme 'gs'; choose one of: file, s3" in run("gs://bucket/run")
    assert "the bucket does not exist" in run("s3://no-such-bucket-here/run")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    assert "cannot reach the endpoint" in run(f"s3://{bucket}/run")


def test_a_source_with_embedded_images_is_refused_on_object_storage(tmp_path, s3):
    """Embedded images are written into a local run (_images/); on object storage readers could
    not open them, so such a run is refused in one line and leaves nothing in the bucket."""
    from pipelines.captioners import CaptionerConfig
    from pipelines.maskers import MaskerConfig
    from pipelines.sources import SourceConfig
    from pipelines.synthesize import SynthesizeConfig, run
    from tests.pipelines.sources.test_hf import _coco_like

    client, bucket, _ = s3
    ds, _ = _coco_like()
    ds.save_to_disk(str(tmp_path / "saved"))
    cfg = SynthesizeConfig(SourceConfig("hf", tmp_path / "saved"), f"s3://{bucket}/run",
                           masker=MaskerConfig(name="box"), captioner=CaptionerConfig(name="none"),
                           executor="local")
    with pytest.raises(ValueError, match="embeds its images.*use a local or shared --out"):
        run(cfg)
    assert keys(client, bucket, "") == []
