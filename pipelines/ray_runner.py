"""Ray executor: unit numbers -> a pool of UnitWorker actors -> results to the driver.

By default Ray starts a private local cluster (`address="local"`), sized to the machine, with no
dashboard: neither RAY_ADDRESS nor the `ray_current_cluster` file that a `ray start` head leaves
behind (it stays when the head dies) is honoured, so a plain run never joins or waits on a cluster
it was not told about. `ray_address` joins a cluster (whose nodes must have this package installed,
e.g. the image in docker/); `auto` means the one running on this machine. The GCS port is probed
first (a closed port or a dead host is an error in at most 5 s) and the connect makes one attempt
only (a port that accepts but never answers: 42 s measured), where Ray itself retries a dead
address for ~14 minutes. The joined cluster is logged with its CPUs and GPUs.

Stopping: SIGTERM is raised as KeyboardInterrupt in the driver (sigterm_as_interrupt), so Ctrl-C and
`kill` both shut Ray down in a finally and leave no raylet, gcs_server or worker behind. After a
SIGKILL of the driver Ray's reaper kills gcs_server and raylet at once and the workers exit within
1 s, but the node's DashboardAgent and RuntimeEnvAgent live on for 60 s (measured here: they time
out on the dead raylet); nothing in the driver runs after a SIGKILL to stop them sooner.

Workers share all CPUs but one, which stays for the driver's writes and Ray's own processes (on a
2-core box a pool that claims every CPU also deadlocks Ray Data pipelines: ENV.md). On a cluster
with GPUs each worker gets its share of a GPU and models resolve `device=auto` to CUDA.

Plain actors rather than Ray Data: the work is already cut into units, and on 2 cores the same
workers under Ray Data's streaming executor reached 1.48x the single-process loop against 1.77x as
plain actors, with 3.3 s instead of 1.3 s of start-up per run (bench/pipeline_throughput.py).
The actors are started before the driver plans, so they build their models while it does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

from pipelines.captioners import CaptionerConfig
from pipelines.maskers import MaskerConfig
from pipelines.plan import read_unit
from pipelines.stages import UnitWorker, WorkerSpec

MAX_RETRIES = 3
STALL_WARNING_S = 60.0  # say so while no worker has finished its first unit
PROBE_TIMEOUT_S = 5.0  # TCP connect to a cluster's GCS port: answers in ms when it is up
# Images per Ray worker below which `--executor auto` runs in-process. Measured on this 2-core box
# (bench/pipeline_throughput.py, cost part): a Ray run costs 3.6-4.5 s more wall time than an
# in-process one when the box is quiet (Ray start 2.3 s, first unit 0.9 s, shutdown 1.1 s; 8-13 s
# under load), while grabcut + template costs ~110 ms of CPU per 320x240 image, of which 2 workers
# save at most half: break-even at ~80 images, more under load. So fewer than 64 per worker (128 on
# 2 workers) runs in-process.
AUTO_MIN_IMAGES_PER_WORKER = 64

log = logging.getLogger(__name__)


def init_ray(address: str | None) -> bool:
    """Start or join Ray; return True when this call started it (so the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    # Ray's own INFO/WARNING lines (execution plans, deprecation notes) drown the engine's progress.
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with _keep_sigterm_handler():
        if address in (None, "local"):
            # A private local cluster: no token auth prompt, no dashboard, no log spam.
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(
                address="local", include_dashboard=False, log_to_driver=False,
                configure_logging=False,
            )
        else:
            join_cluster(address)
    return True


def join_cluster(address: str) -> None:
    """Join the cluster at `address` (host:port, ray://host:port or auto) or raise ValueError."""
    import ray

    target = _resolve(address)
    _probe(target, address)
    # One connect attempt instead of Ray's 20 (each up to ~40 s against a port that accepts
    # connections but does not answer as a GCS).
    saved = os.environ.get("RAY_gcs_server_port_wait_time_s")
    os.environ["RAY_gcs_server_port_wait_time_s"] = "1"
    try:
        ray.init(address=target, log_to_driver=False)
    except (ConnectionError, RuntimeError, TimeoutError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"could not join the Ray cluster at {address}: {first}") from None
    finally:
        if saved is None:
            os.environ.pop("RAY_gcs_server_port_wait_time_s", None)
        else:
            os.environ["RAY_gcs_server_port_wait_time_s"] = saved
    res = ray.cluster_resources()
    log.warning(
        "joined Ray cluster at %s (%d CPUs, %d GPUs)",
        target, int(res.get("CPU", 0)), int(res.get("GPU", 0)),
    )


def _resolve(address: str) -> str:
    """`auto` -> the host:port of the cluster running here (RAY_ADDRESS, then Ray's address file,
    then a running GCS process); anything else as given."""
    if address != "auto":
        return address
    from ray._private import services

    try:
        return services.canonicalize_bootstrap_address_or_die("auto")
    except ConnectionError as exc:
        raise ValueError(f"--ray-address auto: {str(exc).splitlines()[0]}") from None


def _probe(target: str, address: str) -> None:
    hostport = target.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray-address {address!r}: expected host:port, ray://host:port or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ValueError(
            f"Ray cluster at {address} does not answer ({exc.strerror or exc}); is it running?"
        ) from None


@contextlib.contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """ray.init installs its own SIGTERM handler (sys.exit, which skips our cleanup path)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM takes the KeyboardInterrupt path (finally blocks shut Ray down, the CLI exits 130),
    so `kill` stops a run as promptly and as cleanly as Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def pool_size(workers: int, ray_address: str | None) -> int | None:
    """The pool a local Ray would get (as worker_resources sizes it), or None on a cluster."""
    if ray_address not in (None, "local"):
        return None
    return workers or max(1, os.cpu_count() or 1)


def starts_early(executor: str, ray_address: str | None) -> bool:
    """Whether Ray is needed whatever the plan holds, so it can start before planning."""
    return executor == "ray" or (executor == "auto" and pool_size(0, ray_address) is None)


def choose_executor(images: int, workers: int, ray_address: str | None) -> tuple[str, str]:
    """`--executor auto`: ("local" | "ray", why). Jobs too small to pay for Ray's fixed cost run
    in-process; a cluster named by --ray-address is always used."""
    size = pool_size(workers, ray_address)
    if size is None:
        return "ray", f"{images} images: running on the Ray cluster at {ray_address}"
    if images < AUTO_MIN_IMAGES_PER_WORKER * size:
        return "local", (
            f"{images} images: running in-process (too small for {size} Ray workers); "
            "--executor ray to force"
        )
    return "ray", f"{images} images: running on {size} Ray workers"


def worker_resources(
    workers: int, uses_gpu: bool, gpus_per_worker: float = 0.0
) -> tuple[int, float, float]:
    """(pool size, CPUs per worker, GPUs per worker) from the cluster's resources.

    GPUs: `gpus_per_worker` > 0 gives each worker that share (0.5: two workers per GPU, each
    holding its masker and captioner; with workers=0 the pool fills the cluster's GPUs at that
    share); 0 splits the cluster's GPUs evenly over the pool (workers=0: one worker per GPU)."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 1.0), resources.get("GPU", 0.0)
    if workers == 0:
        if uses_gpu and gpus > 0 and gpus_per_worker > 0:
            workers = max(1, int(gpus / gpus_per_worker + 1e-9))
        elif uses_gpu and gpus >= 1:
            workers = int(gpus)
        else:
            workers = max(1, int(cpus))
    spare = max(cpus - 1.0, cpus / 2)  # keep one CPU (or half of a tiny box) for the driver
    cpu_each = min(1.0, spare / workers)
    gpu_each = 0.0
    if uses_gpu and gpus > 0:
        gpu_each = gpus_per_worker if gpus_per_worker > 0 else min(1.0, gpus / workers)
    return workers, cpu_each, gpu_each


def wants_gpu(masker: MaskerConfig, captioner: CaptionerConfig) -> bool:
    return (
        masker.device != "cpu"
        and masker.name not in ("box", "grabcut")
        or (captioner.device != "cpu" and captioner.name not in ("template", "none"))
    )


def bound_worker(masker: MaskerConfig, captioner: CaptionerConfig, threads: int) -> type:
    """UnitWorker with its model configs bound in the class itself: Ray ships the class with the
    actor definition, so a restarted actor rebuilds its models from the same configs."""

    class BoundUnitWorker(UnitWorker):
        def __init__(self) -> None:
            super().__init__(masker, captioner, threads)

    return BoundUnitWorker


class RayPool:
    """Ray (started or joined) plus a pool of actors that each build their models once, in
    `__init__`, as soon as the pool is made: before the driver has planned the units."""

    def __init__(
        self,
        masker: MaskerConfig,
        captioner: CaptionerConfig,
        workers: int,
        address: str | None,
        gpus_per_worker: float = 0.0,
    ):
        import ray

        t0 = time.monotonic()
        self.placement: dict[int, dict] = {}  # unit -> the worker that made it (host, node, pid)
        self.started = init_ray(address)
        try:
            size, cpu_each, gpu_each = worker_resources(
                workers, wants_gpu(masker, captioner), gpus_per_worker
            )
            log.info("ray: started in %.2f s; %d workers x %.2f CPU, %.2f GPU",
                     time.monotonic() - t0, size, cpu_each, gpu_each)
            actor_cls = ray.remote(
                num_cpus=cpu_each,
                num_gpus=gpu_each,
                max_restarts=MAX_RETRIES,
                max_task_retries=MAX_RETRIES,
                scheduling_strategy="SPREAD",  # one node lost costs the fewest workers
            )(bound_worker(masker, captioner, max(1, int(cpu_each) or 1)))
            self.actors = [actor_cls.remote() for _ in range(size)]
        except BaseException:
            self.close()
            raise

    def results(self, spec: WorkerSpec, pending: list[int]) -> Iterator[tuple]:
        """Yield (unit, images table, objects table) for every pending unit, in completion order.

        Each actor takes one unit at a time. An actor that dies (an out-of-memory kill, a segfault
        in a native library) is restarted and its unit retried; a unit that kills its actor
        MAX_RETRIES times stops the run, which a rerun then resumes. The wait wakes every second so
        that Ctrl-C / SIGTERM are handled promptly."""
        import ray

        for extra in self.actors[len(pending):]:  # a resume with fewer units than workers
            ray.kill(extra)
        idle = self.actors[: len(pending)]
        spec_ref = ray.put(spec)
        queue = list(reversed(pending))
        running: dict = {}
        t0, first, waited = time.monotonic(), True, 0.0
        while queue or running:
            while idle and queue:
                actor = idle.pop()
                unit = queue.pop()
                # the records travel with the task: other nodes need no access to the run folder
                records = read_unit(spec.plan_path, unit, spec.source)
                running[actor.run_unit.remote(spec_ref, unit, records)] = actor
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            if first and not ready and time.monotonic() - t0 > waited + STALL_WARNING_S:
                waited += STALL_WARNING_S
                log.warning(
                    "no unit back after %.0f s: workers still loading models, or the cluster has "
                    "no room for them (free: %s)", waited, ray.available_resources(),
                )
            for ref in ready:
                idle.append(running.pop(ref))
                unit, images, objects, where = ray.get(ref)
                self.placement[unit] = where
                if first:
                    log.info("ray: first unit back after %.2f s", time.monotonic() - t0)
                    first = False
                yield unit, images, objects

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.started:
            import ray

            t0 = time.monotonic()
            ray.shutdown()
            self.started = False
            log.info("ray: shut down in %.2f s", time.monotonic() - t0)
