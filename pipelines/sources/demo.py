"""`demo` source: a small real dataset shipped with the package: the engine runs with no download.

Splits (all under `DEMO_DIR`, image `file` paths relative to it):
- `photos`: 9 freely licensed photographs (scikit-image and OpenCV sample images) with boxes and
  categories drawn by hand (`photos.json`); origins and licences are in `demo_data/SOURCES.md`.
- `scenes`: 12 generated 320x240 scenes (`pipelines/scenes.py`, seed 0) with boxes only
  (`scenes.json`); their exact ground-truth masks are in `scenes_gt.json` (`scenes_gt_file()`), kept
  apart so that the synthesized masks can be measured against them.
- `all` (the default): photos then scenes. Image ids are unique across the two (photos 1..9, scenes
  1001..1012).

Both files are COCO format and are read by `pipelines.sources.coco.CocoSource`.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain
from pathlib import Path

from pipelines.records import ImageRecord
from pipelines.sources import SourceConfig
from pipelines.sources.coco import CocoSource

DEMO_DIR = Path(__file__).parent / "demo_data"
SPLIT_FILES = {"photos": "photos.json", "scenes": "scenes.json"}
SPLITS = (*SPLIT_FILES, "all")


def scenes_gt_file() -> Path:
    """The COCO file with the shipped scenes' ground-truth masks (RLE `segmentation`)."""
    return DEMO_DIR / "scenes_gt.json"


class DemoSource:
    """The shipped demo data: one COCO source per split, chained for `all`."""

    def __init__(self, split: str = "all", root: Path = DEMO_DIR):
        if split not in SPLITS:
            raise ValueError(f"unknown demo split {split!r}; choose one of: {', '.join(SPLITS)}")
        self.name = "demo"
        self.split = split
        self.root = Path(root)
        names = list(SPLIT_FILES) if split == "all" else [split]
        self.parts = [
            CocoSource("demo", name, root=self.root, annotation_file=self.root / SPLIT_FILES[name])
            for name in names
        ]
        # One file for a single split; `all` reads two, so it names none.
        self.annotation_file: Path | None = (
            self.parts[0].annotation_file if split != "all" else None
        )

    def records(self) -> Iterator[ImageRecord]:
        return chain.from_iterable(part.records() for part in self.parts)


def open_source(cfg: SourceConfig) -> DemoSource:
    """`--source demo [--split photos|scenes|all]`; `--root` may point at a copy of demo_data."""
    if cfg.annotations is not None:
        raise ValueError("source 'demo' reads its own bundled files; drop --annotations")
    return DemoSource(cfg.split or "all", Path(cfg.root) if cfg.root is not None else DEMO_DIR)
