"""Checkpoint files: sha256 sidecar written with every checkpoint, and truncated, empty, random
or malicious files refused with one error naming the file (nothing in them is ever executed)."""

from __future__ import annotations

import hashlib
import os
import pickle

import pytest
import torch

from model.checkpoint import load_checkpoint_file, save_checkpoint, sidecar


def _state():
    return {"model": {"w": torch.arange(1000.0)}, "config": {"model_size": "tiny"}, "step": 3}


class RunsShell:
    """A pickle whose loading would run a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_save_writes_a_sidecar_that_sha256sum_agrees_with(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state())
    digest, name = sidecar(path).read_text().split()
    assert name == "last.pt" and digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(load_checkpoint_file(path)["model"]["w"], torch.arange(1000.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]


def test_kill_between_the_two_renames_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state())
    old_sum = sidecar(path).read_text()
    state = dict(_state(), step=6)
    save_checkpoint(path, state)
    new_sum = sidecar(path).read_text()
    # as if killed after renaming the checkpoint: the old sidecar, the new one still a temp file
    sidecar(path).write_text(old_sum)
    (tmp_path / f".{sidecar(path).name}.tmp-12345").write_text(new_sum)
    assert load_checkpoint_file(path)["step"] == 6


@pytest.mark.parametrize("damage", ["truncated", "zero bytes", "random bytes", "one bit"])
def test_damaged_checkpoint_is_one_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state())
    data = path.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "zero bytes": b"",
               "random bytes": os.urandom(len(data)),
               "one bit": data[:100] + bytes([data[100] ^ 1]) + data[101:]}[damage]
    path.write_bytes(damaged)
    with pytest.raises(ValueError, match=rf"^{path}: checksum mismatch") as err:
        load_checkpoint_file(path)
    assert "\n" not in str(err.value)
    # without the sidecar (a checkpoint copied alone), the load itself fails cleanly
    if damage != "one bit":  # a flipped bit inside tensor data is only caught by the checksum
        sidecar(path).unlink()
        with pytest.raises(ValueError, match=rf"^{path}: not a readable checkpoint") as err:
            load_checkpoint_file(path)
        assert "\n" not in str(err.value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the probe
@pytest.mark.parametrize("form", ["raw pickle", "torch.save archive"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, form):
    marker = tmp_path / "pwned"
    path = tmp_path / "last.pt"
    evil = {"model": RunsShell(marker), "config": {}}
    with open(path, "wb") as f:
        if form == "raw pickle":
            pickle.dump(evil, f)
        else:
            torch.save(evil, f)
    # even with a matching sidecar (an attacker can write one), the load refuses the pickle
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    sidecar(path).write_text(f"{digest}  last.pt\n")
    with pytest.raises(ValueError, match=rf"^{path}: not a readable checkpoint") as err:
        load_checkpoint_file(path)
    assert "\n" not in str(err.value)
    assert "set to `False`" not in str(err.value)  # torch's advice to load it unsafely is dropped
    assert not marker.exists()
    pickle.loads(pickle.dumps(evil))  # the same object unpickled unsafely does run: a real probe
    assert marker.exists()


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        load_checkpoint_file(tmp_path / "none.pt")
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, path)  # a plain state dict, not a training checkpoint
    with pytest.raises(ValueError, match=rf"^{path}: not an `engine train` checkpoint"):
        load_checkpoint_file(path)
