"""Multi-node Ray on one machine: 1 worker node vs 2 (ray.cluster_utils.Cluster), same scenes.

Each configuration runs `engine synthesize` (grabcut + template, unit 4) against a fresh local
cluster whose head holds no CPU and whose worker nodes hold 1 CPU each, in its own subprocess, and
reports wall time, objects/s, units per node (from the unit log's `worker` field), the driver's
peak RSS and the object store's peak use while running. Baseline: the 1-node cluster, in the same
run. On this 2-core box two 1-CPU nodes are the most that can show scaling.

    .venv/bin/python bench/multinode.py [--quick]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from _common import REPO, check, parser, print_table, write_results

CASE = r"""
import json, sys, threading, time
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
from pipelines.captioners import CaptionerConfig
from pipelines.maskers import MaskerConfig
from pipelines.sources import SourceConfig
from pipelines.synthesize import SynthesizeConfig, run

def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

nodes, ann, out = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
for _ in range(nodes):
    c.add_node(num_cpus=1)
c.wait_for_nodes()
store = {"peak": 0}
stop = threading.Event()
def sample():
    while not stop.wait(0.5):
        if ray.is_initialized():
            try:
                used = ray.cluster_resources().get("object_store_memory", 0) - \
                    ray.available_resources().get("object_store_memory", 0)
                store["peak"] = max(store["peak"], used)
            except Exception:
                pass
threading.Thread(target=sample, daemon=True).start()
cfg = SynthesizeConfig(SourceConfig("coco", ann.parent, ann, "val"), out,
                       masker=MaskerConfig(name="grabcut"), captioner=CaptionerConfig(),
                       unit_size=4, executor="ray", workers=nodes, ray_address=c.address)
t0 = time.perf_counter()
summary = run(cfg)
wall = time.perf_counter() - t0
stop.set()
entries = [json.loads(l)["entry"] for l in (out / "_units.jsonl").read_text().splitlines()]
c.shutdown()
print(json.dumps({"wall_s": wall, "objects": summary.totals["objects"],
                  "units": len(entries), "nodes": [e["worker"]["node"] for e in entries],
                  "driver_peak_rss": vm("VmHWM:"), "object_store_peak": store["peak"]}))
"""


def run_case(nodes: int, ann: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CASE, str(nodes), str(ann), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    check(proc.returncode == 0, f"{nodes} nodes failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    import _data

    n = 32 if args.quick else 96
    ann = _data.scenes(args.data_dir, n)
    work = args.data_dir / "multinode"
    results, rows = {}, []
    for nodes in (1, 2):
        out = work / f"n{nodes}-{int(time.time())}"
        r = run_case(nodes, ann, out)
        per_node = Counter(r.pop("nodes"))
        r["units_per_node"] = sorted(per_node.values(), reverse=True)
        r["objects_per_s"] = r["objects"] / r["wall_s"]
        results[nodes] = r
        spread = "/".join(map(str, r["units_per_node"]))
        rows.append([nodes, r["wall_s"], r["objects_per_s"], spread,
                     r["driver_peak_rss"] / 2**20, r["object_store_peak"] / 2**20])
    check(results[1]["objects"] == results[2]["objects"], "the two runs wrote different counts")
    speedup = results[2]["objects_per_s"] / results[1]["objects_per_s"]
    print_table(f"{n} scenes, grabcut + template, unit 4",
                ["worker nodes", "wall s", "objects/s", "units per node", "driver peak MB",
                 "object store peak MB"], rows)
    print(f"2 nodes / 1 node: {speedup:.2f}x objects/s")
    write_results("multinode", args, {"scenes": n, "unit_size": 4},
                  {"runs": results, "speedup_2_vs_1": speedup})


if __name__ == "__main__":
    main()
