"""Session-wide test settings."""

import importlib.util


def pytest_configure(config):
    # One intra-op torch thread: on a shared, busy 2-core box OpenMP spin-waiting made 2 threads
    # ~50x slower than 1 for the tiny tensors of these tests (measured by the model tests).
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(1)
