"""`mix.yaml`: which shard folders to train on, how often, for which tasks, with which annotations.

Shape (docs/mixture.md has the full table, examples/mix.yaml an example):

    datasets:
      - path: runs/demo            # an `engine synthesize` output folder (manifest.json + parts)
        weight: 1.0                # relative sampling weight, > 0
        tasks: [instance, referring]
        masks: [gt, synthesized]   # mask provenance to train on; synthesized = mask_origin != "gt"
        keep_only: true            # only objects with keep = true (status 'kept')
        captions: [gt]             # caption provenances usable as referring prompts (default: all)
        root: /mnt/demo-images     # image root, overriding the manifest's (data moved); optional
    exclude: [runs/refcoco_val]    # evaluation shard folders: their images (by sha256) never train
                                   # (`eval_sets:` is the same key under another name)

Everything is checked up front by `load_mixture`; an error names the file and the key, e.g.
"mix.yaml: datasets[1].weight must be > 0, got -1". Relative paths resolve against `base_dir`
(default: the current directory, so `path: runs/demo` means what it means on the command line).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

TASKS = ("instance", "semantic", "panoptic", "referring", "foreground", "detection")
MASK_KINDS = ("gt", "synthesized")
DATASET_KEYS = ("path", "weight", "tasks", "masks", "keep_only", "captions", "name", "root")
TOP_KEYS = ("datasets", "exclude", "eval_sets")


@dataclass
class DatasetSpec:
    """One entry of `datasets:`, validated. `path` is absolute."""

    path: Path
    weight: float
    tasks: list[str]
    masks: list[str] = field(default_factory=lambda: list(MASK_KINDS))
    keep_only: bool = True
    captions: list[str] | None = None  # None: every caption provenance
    name: str = ""
    root: Path | None = None  # image root overriding the manifest's source.root; absolute


@dataclass
class Mixture:
    """A validated mix.yaml: datasets to sample from and eval shard folders to exclude."""

    datasets: list[DatasetSpec]
    exclude: list[Path] = field(default_factory=list)
    source: Path | None = None


def _fail(where: str, message: str) -> ValueError:
    return ValueError(f"{where} {message}")


def _str_list(value, where: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _fail(where, f"must be a non-empty list of strings, got {value!r}")
    if allowed is not None:
        bad = [v for v in value if v not in allowed]
        if bad:
            raise _fail(where, f"has unknown value(s) {bad}; choose from: {', '.join(allowed)}")
    return list(dict.fromkeys(value))


def _shard_dir(value, where: str, base_dir: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise _fail(where, f"must be a path string, got {value!r}")
    path = Path(value)
    path = path if path.is_absolute() else (base_dir / path)
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"{where} {path} is not a shard folder (no manifest.json)")
    return path.resolve()


def _image_root(value, where: str, base_dir: Path) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _fail(where, f"must be a folder path string, got {value!r}")
    path = Path(value)
    path = path if path.is_absolute() else (base_dir / path)
    if not path.is_dir():
        raise FileNotFoundError(f"{where} {path} is not a folder (the image root)")
    return path.resolve()


def _weight(value, where: str) -> float:
    # YAML 1.1 (PyYAML) reads 1e-3 or 1e308 as text although YAML 1.2 and every user read a number
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _fail(where, f"must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(where, f"must be a number, got {value!r}")
    if value <= 0:
        raise _fail(where, f"must be > 0, got {value}")
    return float(value)


def sampling_probs(mixture: Mixture, where: str = "mix.yaml") -> np.ndarray:
    """Probability of drawing each dataset: weight / sum of weights.

    Checked here rather than left to numpy ("probabilities contain NaN"): every weight a finite
    number > 0, a sum that does not overflow (two weights of 1e308) and no share that rounds to 0
    (a dataset that would never be drawn); the error names the entry.
    """
    where = str(mixture.source.name) if mixture.source is not None else where
    weights, total = [], 0.0
    for i, spec in enumerate(mixture.datasets):
        weights.append(_weight(spec.weight, f"{where}: datasets[{i}].weight"))
        total += weights[-1]
        if not math.isfinite(total):
            raise _fail(f"{where}: datasets[{i}].weight", f"{spec.weight!r} makes the sum of the "
                        "weights overflow; weights are relative, scale them down (e.g. 1 and 3)")
    probs = np.array(weights) / total
    for i, p in enumerate(probs):
        if not p > 0:
            raise _fail(f"{where}: datasets[{i}].weight", f"{weights[i]!r} is so small next to the "
                        "others that this dataset would never be drawn")
    return probs


def _dataset(entry, where: str, base_dir: Path) -> DatasetSpec:
    if not isinstance(entry, dict):
        raise _fail(where, f"must be a mapping with keys {', '.join(DATASET_KEYS)}")
    unknown = [k for k in entry if k not in DATASET_KEYS]
    if unknown:
        raise _fail(where, f"has unknown key(s) {unknown}; valid keys: {', '.join(DATASET_KEYS)}")
    for key in ("path", "tasks"):
        if key not in entry:
            raise _fail(f"{where}.{key}", "is required")
    weight = _weight(entry.get("weight", 1.0), f"{where}.weight")
    keep_only = entry.get("keep_only", True)
    if not isinstance(keep_only, bool):
        raise _fail(f"{where}.keep_only", f"must be true or false, got {keep_only!r}")
    captions = entry.get("captions")
    path = _shard_dir(entry["path"], f"{where}.path", base_dir)
    return DatasetSpec(
        path=path,
        weight=weight,
        tasks=_str_list(entry["tasks"], f"{where}.tasks", TASKS),
        masks=_str_list(entry.get("masks", list(MASK_KINDS)), f"{where}.masks", MASK_KINDS),
        keep_only=keep_only,
        captions=None if captions is None else _str_list(captions, f"{where}.captions"),
        name=str(entry.get("name") or path.name),
        root=_image_root(entry.get("root"), f"{where}.root", base_dir),
    )


def parse_mixture(doc, where: str = "mix.yaml", base_dir: Path | None = None) -> Mixture:
    """A loaded YAML document -> a validated Mixture; errors name `where` and the key."""
    base_dir = Path.cwd() if base_dir is None else Path(base_dir)
    if not isinstance(doc, dict):
        raise _fail(where, f"must be a mapping with a 'datasets' list, got {type(doc).__name__}")
    unknown = [k for k in doc if k not in TOP_KEYS]
    if unknown:
        raise _fail(where, f"has unknown key(s) {unknown}; valid keys: {', '.join(TOP_KEYS)}")
    entries = doc.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise _fail(f"{where}: datasets", "must be a non-empty list")
    datasets = [_dataset(e, f"{where}: datasets[{i}]", base_dir) for i, e in enumerate(entries)]
    exclude: list[Path] = []
    for key in ("exclude", "eval_sets"):
        if doc.get(key) not in (None, []):
            paths = _str_list(doc[key], f"{where}: {key}")
            exclude += [
                _shard_dir(p, f"{where}: {key}[{i}]", base_dir) for i, p in enumerate(paths)
            ]
    overlap = {d.path for d in datasets} & set(exclude)
    if overlap:
        raise _fail(where + ":", f"{sorted(map(str, overlap))} is both trained on and excluded")
    mixture = Mixture(datasets=datasets, exclude=list(dict.fromkeys(exclude)))
    sampling_probs(mixture, where)
    return mixture


def load_mixture(path: str | Path, base_dir: Path | None = None) -> Mixture:
    """Read and validate a mix.yaml file (see the module docstring for its shape)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mixture file {path} not found")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from e
    mixture = parse_mixture(doc, where=path.name, base_dir=base_dir)
    mixture.source = path
    return mixture
