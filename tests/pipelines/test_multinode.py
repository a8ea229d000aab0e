"""Two Ray nodes on this machine (ray.cluster_utils.Cluster, as Ray's own fault-tolerance tests use
it): work spreads over both, and removing one node mid-run loses nothing: the run finishes with
exactly the rows of a single-process run."""

import json
import threading
import time

import pytest

from pipelines.captioners import CaptionerConfig
from pipelines.maskers import MaskerConfig
from pipelines.sources import SourceConfig
from pipelines.synthesize import SynthesizeConfig, run
from schemas import open_run
from tests.helpers.coco_fixture import write_coco

SLOW = "tests.helpers.slow_box:build"  # 0.4 s per image: the run is still going when a node dies


@pytest.fixture
def cluster(monkeypatch):
    from ray.cluster_utils import Cluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head runs no worker
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    yield c, nodes
    c.shutdown()


def config(root, ann, out, **over):
    kw = dict(source=SourceConfig("coco", root, ann, "val"), out=out,
              masker=MaskerConfig(name=SLOW), captioner=CaptionerConfig(name="none"),
              unit_size=1)
    kw.update(over)
    return SynthesizeConfig(**kw)


def rows(out, table):
    con = open_run(out).connect()
    return con.execute(f"SELECT * EXCLUDE (run_id) FROM {table} ORDER BY ALL").fetchall()


def unit_log(out):
    path = out / "_units.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["entry"] for line in path.read_text().splitlines() if line.strip()]


def test_a_node_lost_mid_run_loses_nothing_and_work_spread_over_both(cluster, tmp_path):
    c, nodes = cluster
    root = tmp_path / "data"
    ann = write_coco(root, n_images=12, objects_per_image=2)
    out = tmp_path / "out"
    killed = {}

    def kill_a_node_after_three_units():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(unit_log(out)) < 3:
            time.sleep(0.05)
        victim = nodes[1]
        killed["node"] = victim.node_id
        killed["units_before"] = len(unit_log(out))
        c.remove_node(victim)

    killer = threading.Thread(target=kill_a_node_after_three_units)
    killer.start()
    summary = run(config(root, ann, out, executor="ray", workers=2, ray_address=c.address))
    killer.join()
    assert 3 <= killed["units_before"] < summary.units_total  # the node died mid-run
    entries = unit_log(out)
    assert sorted(e["images_file"] for e in entries) == [
        f"images/part-{k:05d}.parquet" for k in range(12)]  # every unit once: no hole, no twin
    nodes_used = {e["worker"]["node"] for e in entries}
    assert len(nodes_used) == 2 and killed["node"] in nodes_used  # both worked before the loss
    clean = run(config(root, ann, tmp_path / "clean", executor="local",
                       masker=MaskerConfig(name="box")))
    assert summary.totals == clean.totals
    for table in ("images", "objects"):
        assert rows(out, table) == rows(tmp_path / "clean", table)
