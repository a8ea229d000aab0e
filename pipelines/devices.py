"""Where model stages run: resolve `--device auto|cpu|cuda`, pick a compute dtype, set CPU threads;
and the check every model folder given on the command line goes through.

Model classes call `resolve_device` once in their constructor and keep the result (`uses_gpu` tells
whether it is a GPU). Nothing here imports a model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """ "auto" -> cuda when a GPU is visible, else cpu; "cuda" without a GPU is a user error."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; choose one of: {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} was asked for but no CUDA GPU is visible; pass --device cpu"
        )
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Compute dtype for autocast: "auto" -> bf16 on GPUs that support it, fp32 on CPU.

    bf16 on CPU is not the default: on CPUs without AMX it is slower than fp32.
    """
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


@contextlib.contextmanager
def inference(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """`torch.inference_mode` plus autocast to `dtype` when it is not fp32."""
    with torch.inference_mode():
        if dtype == torch.float32:
            yield
        else:
            with torch.autocast(device_type=device.type, dtype=dtype):
                yield


def configure_threads(device: torch.device) -> None:
    """On CPU, use every core this process may run on, unless OMP_NUM_THREADS says otherwise.

    Ray sets OMP_NUM_THREADS to an actor's num_cpus, so inside an actor pool this keeps actors
    from oversubscribing the machine; outside Ray, torch's default (physical cores) can be lower
    than the affinity mask allows in containers, so we widen it.
    """
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    if torch.get_num_threads() != cores:
        torch.set_num_threads(cores)
        log.debug("torch threads set to %d", cores)


def place_model(
    model: torch.nn.Module, device: str, dtype: str
) -> tuple[torch.nn.Module, torch.device, torch.dtype]:
    """Resolve `--device`/`--dtype`, set CPU threads, move `model` there in eval mode."""
    resolved = resolve_device(device)
    configure_threads(resolved)
    return model.to(resolved).eval(), resolved, resolve_dtype(dtype, resolved)


def read_model_type(folder: Path | None, needed_by: str, flag: str) -> tuple[Path, str]:
    """Check `folder` is a saved transformers model; return it and its config's model_type.

    needed_by / flag name the options in the errors, e.g. ("--masker sam2", "--mask-model")."""
    if folder is None:
        raise ValueError(f"{needed_by} needs {flag} DIR (a saved transformers model)")
    folder = Path(folder)
    if not folder.is_dir():
        what = flag.removeprefix("--").replace("-", " ")
        raise FileNotFoundError(f"{what} folder {folder} does not exist")
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"{folder} is not a transformers model folder (no config.json)")
    try:
        return folder, str(json.loads(config.read_text()).get("model_type"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config} is not valid JSON: {e}") from None


@contextlib.contextmanager
def loading(what: str, folder: Path) -> Iterator[None]:
    """Turn any failure while loading a model folder into one ValueError naming it.

    Broken folders fail in many libraries' own error types (OSError, KeyError, safetensors and
    tokenizers errors...), so everything is caught; the first line of the reason is kept."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - see the docstring
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot load {what} from {folder}: {reason}") from None
