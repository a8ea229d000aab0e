"""Checkpoint files: written atomically with a sha256 sidecar, verified and loaded safely.

    save_checkpoint(Path("runs/mq/last.pt"), state)   # last.pt + last.pt.sha256
    state = load_checkpoint_file(Path("runs/mq/last.pt"))

The sidecar `<name>.sha256` holds the hex digest of the checkpoint's bytes (sha256sum's format, so
`sha256sum -c last.pt.sha256` checks it too). Write order: checkpoint and sidecar to temporary
names, then rename the checkpoint, then the sidecar. A kill between the two renames leaves the new
checkpoint beside the old sidecar and the new sidecar's temporary file; loading accepts a digest
from either, so no kill ever makes a good checkpoint unreadable.

Loading always uses torch.load(weights_only=True): a checkpoint is data, and a pickle that would
run code (os.system...) is refused, never executed. Every failure (missing, truncated, zero bytes,
random bytes, checksum mismatch, foreign pickle) is one ValueError/FileNotFoundError naming the
file, which `engine` prints as one line (exit code 2).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".sha256"
REQUIRED_KEYS = ("model", "config")


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_synced(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(path: Path, state: dict) -> None:
    """Write `state` to `path` and its sidecar; a kill at any point leaves a loadable pair."""
    path = Path(path)
    tmp, tmp_sum = _tmp(path), _tmp(sidecar(path))
    try:
        _write_synced(tmp, lambda f: torch.save(state, f))
        line = f"{sha256_file(tmp)}  {path.name}\n".encode()
        _write_synced(tmp_sum, lambda f: f.write(line))
        os.replace(tmp, path)
        os.replace(tmp_sum, sidecar(path))
    finally:
        for leftover in (tmp, tmp_sum):
            leftover.unlink(missing_ok=True)


def _recorded_digests(path: Path) -> list[str]:
    """Digests the sidecar (and a sidecar left mid-rename by a kill) record for `path`."""
    found = [sidecar(path)] + sorted(path.parent.glob(f".{sidecar(path).name}.tmp-*"))
    digests = []
    for file in found:
        if file.is_file():
            text = file.read_text(errors="replace").split()
            digests += text[:1]
    return digests


def verify_checkpoint(path: Path) -> None:
    """Raise ValueError when `path`'s bytes do not match its sidecar. A checkpoint without a
    sidecar (copied alone, or written before sidecars existed) is loaded with a warning: the
    weights_only load still refuses anything but tensors and plain data."""
    digests = _recorded_digests(path)
    if not digests:
        log.warning("%s: no %s beside it; loading without a checksum", path, sidecar(path).name)
        return
    actual = sha256_file(path)
    if actual not in digests:
        raise ValueError(f"{path}: checksum mismatch (sha256 {actual[:12]}..., "
                         f"{sidecar(path).name} says {digests[0][:12]}...): the file is "
                         "truncated or damaged; use another checkpoint")


def _reason(exc: Exception) -> str:
    """One short line for a failed torch.load. torch's weights-only message advises retrying with
    weights_only=False, the one thing never to do with a file that may run code: keep only the
    unpickler's own reason (the text between that advice and the pointer to the docs)."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and text.startswith("Weights only load failed"):
        detail = text.split("Check the documentation")[0]
        detail = detail.split("WeightsUnpickler error:")[-1] if "WeightsUnpickler error:" in \
            detail else detail.split("trusted source.")[-1]
        detail = " ".join(detail.split()).rstrip(".") or "unsafe content"
        return (f"the weights-only loader refused it: {detail}; a checkpoint holds only tensors "
                "and plain data, and nothing in this file was run")
    first = " ".join(text.split()).split(". ")[0]
    return f"{type(exc).__name__}: {first[:160]}" if first else type(exc).__name__


def load_checkpoint_file(path: Path, map_location: str = "cpu") -> dict:
    """The state dict of an `engine train` checkpoint, verified; one-line errors naming `path`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    verify_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises a dozen types for bad bytes
        raise ValueError(f"{path}: not a readable checkpoint (the file cannot be read as one: "
                         f"{_reason(exc)})") from exc
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise ValueError(f"{path}: not an `engine train` checkpoint (no model/config entries)")
    return state


def training_vocabulary(state: dict) -> tuple[list[str], list[bool]] | None:
    """(category names, isthing per name) the checkpoint's run trained on, as `engine train`
    stores them in config["data"]["vocabulary"]; None for a checkpoint written before it did."""
    vocab = state.get("config", {}).get("data", {}).get("vocabulary")
    if vocab is None:
        return None
    return list(vocab["names"]), [bool(t) for t in vocab["isthing"]]
