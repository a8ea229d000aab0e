"""`objects365` source: Objects365 v1 and v2 annotation files, laid out as the official release.

Release layout (where each fact was read; the code below is ours):
- v2 (2020, the one in common use): `zhiyuan_objv2_train.json` (shipped inside
  `zhiyuan_objv2_train.tar.gz`) and `zhiyuan_objv2_val.json`; `file_name` is a path under the
  dataset folder with a patch folder, e.g. `images/v1/patch8/objects365_v1_00419676.jpg` or
  `images/v2/patch45/objects365_v2_02060288.jpg` (ultralytics `cfg/datasets/Objects365.yaml`,
  HF viewer of `jxu124/objects365`; mmdetection `configs/_base_/datasets/objects365v2_detection.py`
  keeps the json under `annotations/`). Annotations carry `isfake` and `isreflected`.
- v1 (2019): `objects365_train.json` / `objects365_val.json` (mmdetection
  `configs/_base_/datasets/objects365v1_detection.py`, under `annotations/`), bare file names such
  as `obj365_train_000000255476.jpg` in a `train/` or `val/` folder. mmdetection notes that the v1
  train and val `categories` lists are inconsistent, which is why categories are matched by name.
- Three v2 images are in the JSON but missing from the archives (mmdetection
  `mmdet/datasets/objects365.py` `objv2_ignore_list`, the same list in alibaba/EasyCV).
- Category names have typos and trailing spaces: v2 'Moniter/TV', 'Bakset', 'Campel', 'Mushroon',
  'Buttefly', 'Cigar/Cigarette ', 'Formula 1 ', 'Table Tennis '...; v1 'tissue ' (class tuples of
  mmdetection's Objects365V1Dataset / Objects365V2Dataset, detectron2-style O365 category lists).
- Boxes can be negative or run past the image (e.g. y = -0.0178 in the HF viewer): they are passed
  through untouched as `box_raw`; the pipeline clips them and keeps the raw box.

Categories are taken by name from the file's own `categories` (never from a fixed id table) and
normalised per version with `category_text`; `category_name` keeps the name exactly as written.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

from pipelines.sources import SourceConfig
from pipelines.sources.coco import CocoSource

log = logging.getLogger(__name__)

# patch folder + file name of the images listed in the JSON but absent from the v2 archives.
KNOWN_MISSING = frozenset({
    "patch16/objects365_v2_00908726.jpg",
    "patch6/objects365_v1_00320532.jpg",
    "patch6/objects365_v1_00320534.jpg",
})
KNOWN_MISSING_REASON = "image is on the known list of Objects365 images missing from the archives"

# Spelling fixes, applied after stripping surrounding spaces. Only unambiguous typos are fixed;
# odd-but-real names ('Skiboard', 'French', 'Hamimelon') are left as they are.
NAME_FIXES = {
    2: {
        "Moniter/TV": "Monitor/TV",
        "Bakset": "Basket",
        "Ballon": "Balloon",
        "Dinning Table": "Dining Table",
        "Billards": "Billiards",
        "Extention Cord": "Extension Cord",
        "Hotair ballon": "Hot-air balloon",
        "Mushroon": "Mushroom",
        "Tape Measur/ Ruler": "Tape Measure/Ruler",
        "Campel": "Camel",
        "Buttefly": "Butterfly",
        "Noddles": "Noodles",
        "Table Teniis paddle": "Table Tennis paddle",
        "Trash bin Can": "Trash bin/Can",
    },
    1: {
        "pine apple": "pineapple",
        "hotair balloon": "hot-air balloon",
    },
}

ANNOTATION_NAMES = {2: "zhiyuan_objv2_{split}.json", 1: "objects365_{split}.json"}


def category_text(name: str, version: int) -> str:
    """The engine's category text for an Objects365 category name of `version` (1 or 2)."""
    stripped = " ".join(name.split())  # trailing and doubled spaces
    return NAME_FIXES[version].get(stripped, stripped)


def known_missing(file_name: str) -> tuple[str, str] | None:
    """(error, status) when `file_name` (any prefix) ends in a known-missing patch/file pair."""
    tail = "/".join(file_name.replace("\\", "/").rsplit("/", 2)[-2:])
    if tail in KNOWN_MISSING:
        return f"{KNOWN_MISSING_REASON} ({tail}; mmdetection objv2_ignore_list)", "missing"
    return None


def detect_version(annotation_file: Path) -> int:
    """2 for `zhiyuan_objv2_*` names, 1 for `objects365_*`; 2 (the common release) otherwise."""
    name = annotation_file.name.lower()
    if name.startswith("zhiyuan_objv2") or "objv2" in name or "obj365v2" in name:
        return 2
    if name.startswith("objects365_") or "v1" in name:
        return 1
    log.info("could not tell the Objects365 version from %s; assuming v2", annotation_file.name)
    return 2


def find_annotations(root: Path, split: str) -> tuple[Path, int]:
    """The annotation file of `split` under `root`, as released (v2 first, then v1)."""
    tried = []
    for version in (2, 1):
        name = ANNOTATION_NAMES[version].format(split=split)
        for folder in (root, root / "annotations", root / split):
            candidate = folder / name
            if candidate.is_file():
                return candidate, version
            tried.append(str(candidate))
    raise FileNotFoundError(
        f"objects365: no annotation file for split {split!r} under {root}; looked for "
        f"{', '.join(tried)} (extract zhiyuan_objv2_train.tar.gz first, or pass --annotations FILE)"
    )


def image_root(root: Path, split: str, version: int) -> Path:
    """v2 `file_name`s are paths under the dataset folder; v1 names are bare, in `<split>/`."""
    if version == 1 and (root / split).is_dir():
        return root / split
    return root


class Objects365Source(CocoSource):
    """An Objects365 v1/v2 file: the COCO reader plus name fixes and the known-missing list."""

    def __init__(self, split: str, root: Path, annotation_file: Path, version: int | None = None,
                 **kwargs):
        self.version = version or detect_version(Path(annotation_file))
        if self.version not in NAME_FIXES:
            raise ValueError(f"objects365: unknown version {self.version!r}; choose one of: 1, 2")
        super().__init__(
            "objects365", split, root=root, annotation_file=annotation_file,
            # partial, not a lambda: the source stays picklable (Ray ships it to workers).
            category_text=partial(category_text, version=self.version), image_check=known_missing,
            **kwargs,
        )


def open_source(cfg: SourceConfig) -> Objects365Source:
    """`--source objects365 --root DIR [--split val] [--annotations FILE]`; split default: train."""
    split = cfg.split or "train"
    if cfg.annotations is not None:
        annotations = Path(cfg.annotations)
        version = detect_version(annotations)
        root = Path(cfg.root) if cfg.root is not None else annotations.parent
    elif cfg.root is not None:
        annotations, version = find_annotations(Path(cfg.root), split)
        root = Path(cfg.root)
    else:
        raise ValueError("source 'objects365' needs --root DIR (the dataset folder) "
                         "or --annotations FILE")
    return Objects365Source(split, image_root(root, split, version), annotations, version)
