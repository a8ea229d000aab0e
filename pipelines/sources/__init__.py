"""Bounding-box datasets -> ImageRecords, one module per source format.

Contract of a source:
    open_source(cfg: SourceConfig) -> Source
    Source.name: the source's name ("coco", "objects365", ...), Source.split: the split name,
    Source.root: the folder that image `file` paths are relative to,
    Source.annotation_file: the annotation file read (None for sources without one),
    Source.records(): yields ImageRecords in a deterministic order (the same order on every
        call), with bounded memory: a source must not hold a whole large annotation file in memory.
A malformed annotation file raises ValueError naming the file, the position and the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pipelines.records import ImageRecord


@dataclass
class SourceConfig:
    name: str
    root: Path | None = None
    annotations: Path | None = None
    split: str | None = None
    bbox_format: str = "auto"  # hf only: xywh, xyxy, or auto (decide from the data)


class Source(Protocol):
    name: str
    split: str
    root: Path
    annotation_file: Path | None

    def records(self) -> Iterator[ImageRecord]: ...


def _demo(cfg: SourceConfig) -> Source:
    from pipelines.sources.demo import open_source

    return open_source(cfg)


def _coco(cfg: SourceConfig) -> Source:
    from pipelines.sources.coco import open_source

    return open_source(cfg)


def _objects365(cfg: SourceConfig) -> Source:
    from pipelines.sources.objects365 import open_source

    return open_source(cfg)


def _hf(cfg: SourceConfig) -> Source:
    from pipelines.sources.hf import open_source

    return open_source(cfg)


def _coco_panoptic(cfg: SourceConfig) -> Source:
    from pipelines.sources.coco_panoptic import open_source

    return open_source(cfg)


def _ade_semantic(cfg: SourceConfig) -> Source:
    from pipelines.sources.ade_semantic import open_source

    return open_source(cfg)


def _refcoco(cfg: SourceConfig) -> Source:
    from pipelines.sources.refcoco import open_source

    return open_source(cfg)


def _foreground(cfg: SourceConfig) -> Source:
    from pipelines.sources.foreground import open_source

    return open_source(cfg)


SOURCES: dict[str, Callable[[SourceConfig], Source]] = {
    "demo": _demo,
    "coco": _coco,
    "objects365": _objects365,
    "hf": _hf,
    "coco_panoptic": _coco_panoptic,
    "ade_semantic": _ade_semantic,
    "refcoco": _refcoco,
    "foreground": _foreground,
}


def open_source(cfg: SourceConfig) -> Source:
    if cfg.name not in SOURCES:
        raise ValueError(f"unknown source {cfg.name!r}; choose one of: {', '.join(SOURCES)}")
    return SOURCES[cfg.name](cfg)
