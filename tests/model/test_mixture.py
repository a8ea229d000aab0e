"""mix.yaml parsing: defaults, paths, and errors that name the file and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from model.mixture import load_mixture, sampling_probs

REPO = Path(__file__).resolve().parents[2]


def shard_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"source": {"root": str(path)}}))
    return path


def write(tmp_path: Path, doc) -> Path:
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_defaults_and_relative_paths(tmp_path):
    shard_dir(tmp_path / "runs" / "demo")
    shard_dir(tmp_path / "runs" / "val")
    doc = {
        "datasets": [{"path": "runs/demo", "tasks": ["instance", "referring"]}],
        "eval_sets": ["runs/val"],
        "exclude": [],  # an empty list is allowed
    }
    mix = load_mixture(write(tmp_path, doc), base_dir=tmp_path)
    (d,) = mix.datasets
    assert d.path == (tmp_path / "runs" / "demo").resolve()
    assert (d.weight, d.tasks, d.masks, d.keep_only, d.captions, d.name) == (
        1.0,
        ["instance", "referring"],
        ["gt", "synthesized"],
        True,
        None,
        "demo",
    )
    assert mix.exclude == [(tmp_path / "runs" / "val").resolve()]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"weight": -1}, "mix.yaml: datasets[1].weight must be > 0, got -1"),
        ({"weight": "heavy"}, "datasets[1].weight must be a number"),
        ({"tasks": ["instance", "depth"]}, "datasets[1].tasks has unknown value(s) ['depth']"),
        ({"tasks": []}, "datasets[1].tasks must be a non-empty list"),
        ({"masks": ["sam"]}, "datasets[1].masks has unknown value(s) ['sam']"),
        ({"keep_only": "yes"}, "datasets[1].keep_only must be true or false"),
        ({"wieght": 2}, "datasets[1] has unknown key(s) ['wieght']"),
    ],
)
def test_errors_name_the_key(tmp_path, entry, message):
    shard_dir(tmp_path / "a")
    good = {"path": str(tmp_path / "a"), "tasks": ["instance"]}
    doc = {"datasets": [good, {**good, **entry}]}
    with pytest.raises(ValueError) as err:
        load_mixture(write(tmp_path, doc))
    assert message in str(err.value)


def test_missing_shard_folder_and_required_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"datasets\[0\].path .*nowhere"):
        load_mixture(
            write(tmp_path, {"datasets": [{"path": "nowhere", "tasks": ["instance"]}]}),
            base_dir=tmp_path,
        )
    shard_dir(tmp_path / "a")
    with pytest.raises(ValueError, match=r"datasets\[0\].tasks is required"):
        load_mixture(write(tmp_path, {"datasets": [{"path": str(tmp_path / "a")}]}))
    with pytest.raises(ValueError, match="has unknown key"):
        load_mixture(write(tmp_path, {"dataset": []}))
    with pytest.raises(ValueError, match="both trained on and excluded"):
        load_mixture(
            write(
                tmp_path,
                {
                    "datasets": [{"path": str(tmp_path / "a"), "tasks": ["foreground"]}],
                    "exclude": [str(tmp_path / "a")],
                },
            )
        )


def test_example_mix_yaml_is_valid(tmp_path):
    doc = yaml.safe_load((REPO / "examples" / "mix.yaml").read_text())
    for entry in doc["datasets"]:  # the example's folders exist once the README commands ran
        shard_dir(tmp_path / entry["path"])
    for path in doc.get("exclude", []) + doc.get("eval_sets", []):
        shard_dir(tmp_path / path)
    mix = load_mixture(REPO / "examples" / "mix.yaml", base_dir=tmp_path)
    assert len(mix.datasets) == len(doc["datasets"])


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (["1.0e+308", "1.0e+308"], "mix.yaml: datasets[1].weight 1e+308 makes the sum of the "
                                   "weights overflow"),
        (["1e308", "1e308"], "mix.yaml: datasets[1].weight 1e+308 makes the sum"),  # YAML text
        ([".inf", "1"], "mix.yaml: datasets[0].weight must be a number, got inf"),
        (["1", ".nan"], "mix.yaml: datasets[1].weight must be a number, got nan"),
        (["-2", "1"], "mix.yaml: datasets[0].weight must be > 0, got -2"),
        (["0", "0"], "mix.yaml: datasets[0].weight must be > 0, got 0"),
        (["1.0e+300", "1.0e-300"], "mix.yaml: datasets[1].weight 1e-300 is so small next to the "
                                   "others that this dataset would never be drawn"),
    ],
)
def test_weights_that_break_sampling_name_the_key(tmp_path, weights, message):
    shard_dir(tmp_path / "a")
    lines = "".join(f"  - {{path: {tmp_path / 'a'}, tasks: [instance], weight: {w}}}\n"
                    for w in weights)
    path = tmp_path / "mix.yaml"
    path.write_text(f"datasets:\n{lines}")
    with pytest.raises(ValueError) as err:
        load_mixture(path)
    assert message in str(err.value)


def test_numbers_yaml_reads_as_text_are_weights(tmp_path):
    shard_dir(tmp_path / "a")
    path = tmp_path / "mix.yaml"
    path.write_text(f"datasets:\n  - {{path: {tmp_path / 'a'}, tasks: [instance], weight: 1e-3}}\n"
                    f"  - {{path: {tmp_path / 'a'}, tasks: [instance], weight: 3e-3}}\n")
    probs = sampling_probs(load_mixture(path))
    assert probs.tolist() == pytest.approx([0.25, 0.75])


def test_root_key_is_resolved_and_checked(tmp_path):
    shard_dir(tmp_path / "a")
    (tmp_path / "moved").mkdir()
    doc = {"datasets": [{"path": "a", "tasks": ["instance"], "root": "moved"}]}
    mix = load_mixture(write(tmp_path, doc), base_dir=tmp_path)
    assert mix.datasets[0].root == (tmp_path / "moved").resolve()
    assert load_mixture(write(tmp_path, {"datasets": [{"path": "a", "tasks": ["instance"]}]}),
                        base_dir=tmp_path).datasets[0].root is None
    doc["datasets"][0]["root"] = "gone"
    with pytest.raises(FileNotFoundError, match=r"mix.yaml: datasets\[0\].root .*gone is not a"):
        load_mixture(write(tmp_path, doc), base_dir=tmp_path)
    doc["datasets"][0]["root"] = 3
    with pytest.raises(ValueError, match=r"datasets\[0\].root must be a folder path string"):
        load_mixture(write(tmp_path, doc), base_dir=tmp_path)
