"""What sources yield and stages consume: one ImageRecord per image, with its objects.

Sources do not judge pixels: they report what the annotation file says, normalised (box as xywh
floats, category as text) plus any reason the record is unusable (`error`), which the pipeline turns
into a rejected row. Keeping the reason on the record, not raising, is what lets counts add up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SourceObject:
    """One annotation as the source gives it.

    box_raw: [x, y, w, h] in absolute pixels exactly as the source states it (converted to xywh
        if the source uses another convention), before any clipping; NaN allowed (it becomes a
        rejection).
    gt_mask: a mask value of the contract ({counts, height, width}) when the source carries a mask.
    captions: ground-truth texts for this object (e.g. referring expressions), provenance `gt`.
    error: why this object cannot be used (unknown category id, bad box...), or None.
    error_code: the schemas.REJECT_CODES code for `error` (annotation_invalid when not given).
    """

    ann_id: str
    category: str | None
    box_raw: list[float]
    category_id: int | None = None
    category_name: str | None = None
    iscrowd: bool = False
    attributes: dict[str, Any] = field(default_factory=dict)
    gt_mask: dict | None = None
    captions: list[str] = field(default_factory=list)
    error: str | None = None
    error_code: str | None = None


@dataclass
class ImageRecord:
    """One image and its objects.

    image_id: the source's own image id as text (the engine prefixes source and split).
    file: path relative to the source root, as the annotation names it (checked for `..` escapes
        later).
    width, height: as the annotation states them (None if absent); checked against the pixels
        later.
    error: why the whole image cannot be used (duplicate id, known missing file...), or None.
    """

    image_id: str
    file: str
    width: int | None
    height: int | None
    objects: list[SourceObject] = field(default_factory=list)
    error: str | None = None
    error_status: str = "invalid"
    index: int | None = None  # position in the run's plan; set by the planner, not by sources

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ImageRecord:
        objects = [SourceObject(**o) for o in d.get("objects") or []]
        return cls(**{**d, "objects": objects})


def box_from_xyxy(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [float(x0), float(y0), float(x1) - float(x0), float(y1) - float(y0)]
