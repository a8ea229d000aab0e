"""Session-wide test settings."""

import importlib.util
import os


def pytest_configure(config):
    # One intra-op torch thread: on a shared, busy 2-core box OpenMP spin-waiting made 2 threads
    # ~50x slower than 1 for the tiny tensors of these tests (measured by the model tests).
    # OMP_NUM_THREADS also keeps the model stages (pipelines.devices.configure_threads) at one
    # thread, so no test module has to reset it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(1)
