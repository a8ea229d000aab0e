"""Shared helpers of the benchmarks: flags, timing, peak memory of a subprocess, tables, JSON.

Every bench is run as `.venv/bin/python bench/<name>.py [--quick]`; it measures its baseline in the
same run, prints a rich table and writes `bench/results/<name>.json` (figures + machine context).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_DATA_DIR = Path("/tmp/mqengine-bench")
# Wide enough for the tables when the output is a file or a pipe (rich would fold them to 80).
console = Console(width=None if sys.stdout.isatty() else 160)


class BenchError(RuntimeError):
    """A bench's self-check failed: its figures cannot be trusted."""


def check(condition: bool, message: str) -> None:
    """Fail loudly (not an assert: benches run with -O too) when a result is inconsistent."""
    if not condition:
        raise BenchError(message)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small configuration (< 2 minutes)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help=f"where generated inputs are cached (default {DEFAULT_DATA_DIR})")
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of the JSON results")
    return p


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(wall seconds, return value) of one call."""
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def median_of(fn: Callable[[], object], repeats: int) -> tuple[float, list[float], object]:
    """Median wall seconds over `repeats` calls (the machine is shared: the median resists a
    neighbour's burst), all the times, and the last return value."""
    times, value = [], None
    for _ in range(max(1, repeats)):
        t, value = timed(fn)
        times.append(t)
    return statistics.median(times), times, value


def run_measured(argv: list[str], interval: float = 0.1, env: dict | None = None,
                 cwd: Path | None = None) -> dict:
    """Run `argv` to completion; return wall seconds, exit code, output and memory figures (MB).

    peak_rss_mb: the kernel's peak RSS of the process itself or of its largest reaped descendant
        (wait4 rusage: exact, no sampling).
    peak_tree_rss_mb: the largest sum of RSS over the process and all its descendants, sampled every
        `interval` s (this is what counts for Ray, whose raylet/workers are descendants).
    """
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=cwd)
    out_chunks: list[str] = []
    peak_tree = 0
    ps = psutil.Process(proc.pid)
    os.set_blocking(proc.stdout.fileno(), False)
    while proc.poll() is None:
        peak_tree = max(peak_tree, _tree_rss(ps))
        _drain(proc, out_chunks)
        time.sleep(interval)
    _drain(proc, out_chunks)
    wall = time.perf_counter() - start
    return {"argv": argv, "rc": proc.returncode, "wall_s": wall, "output": "".join(out_chunks),
            "peak_tree_rss_mb": peak_tree / 2**20}


def _tree_rss(ps: psutil.Process) -> int:
    total = 0
    try:
        procs = [ps, *ps.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _drain(proc: subprocess.Popen, chunks: list[str]) -> None:
    try:
        data = proc.stdout.read()
    except (BlockingIOError, TypeError):
        return
    if data:
        chunks.append(data)


# A wrapper run in its own interpreter: it runs the measured command as its only child and reports
# that child's exact peak RSS (ru_maxrss of RUSAGE_CHILDREN covers only the one child it waited on).
_WRAPPER = (
    "import json, resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[1:])\n"
    "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print('@@RUSAGE ' + json.dumps({'rc': rc, 'maxrss_kb': ru.ru_maxrss,"
    " 'cpu_s': ru.ru_utime + ru.ru_stime}), flush=True)\n"
)


def measure(argv: list[str], env: dict | None = None, cwd: Path | None = None,
            interval: float = 0.1) -> dict:
    """run_measured + the exact kernel peak RSS (MB) and CPU seconds of the command's processes.

    peak_rss_mb is the largest single process among the command and the descendants it reaped
    (for a Python driver, the driver itself). Raises BenchError when the command fails.
    """
    result = run_measured([sys.executable, "-c", _WRAPPER, *argv], interval, env, cwd)
    lines = result["output"].splitlines()
    tail = [ln for ln in lines if ln.startswith("@@RUSAGE ")]
    check(bool(tail), f"no rusage line from {argv}; output:\n{result['output'][-3000:]}")
    ru = json.loads(tail[-1].split(" ", 1)[1])
    result["output"] = "\n".join(ln for ln in lines if not ln.startswith("@@RUSAGE "))
    check(ru["rc"] == 0, f"command failed (exit {ru['rc']}): {' '.join(map(str, argv))}\n"
                         f"{result['output'][-3000:]}")
    result.update(rc=ru["rc"], peak_rss_mb=ru["maxrss_kb"] / 1024, cpu_s=ru["cpu_s"])
    result["argv"] = argv
    return result


def machine() -> dict:
    """Context that a reader of the figures needs: the box was shared with other jobs."""
    load1, load5, load15 = os.getloadavg()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "loadavg_at_end": [round(load1, 2), round(load5, 2), round(load15, 2)],
        "git_rev": _git_rev(),
    }


def _git_rev() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_results(name: str, args: argparse.Namespace, config: dict, results: dict) -> Path:
    """bench/results/<name>.json (or <name>.quick.json for --quick, so a quick run never
    overwrites the full figures)."""
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{name}{'.quick' if args.quick else ''}.json"
    data = {"bench": name, "quick": bool(args.quick), "machine": machine(), "config": config,
            "results": results}
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    console.print(f"wrote {path}")
    return path


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*(_fmt(v) for v in r))
    console.print(table)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0 or abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def du(path: Path, pattern: str = "**/*") -> int:
    """Total bytes of the files under `path` matching `pattern`."""
    return sum(p.stat().st_size for p in Path(path).glob(pattern) if p.is_file())
