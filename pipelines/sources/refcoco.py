"""RefCOCO / RefCOCO+ / RefCOCOg expressions -> ImageRecords whose objects carry `gt` captions.

Layout (the official release, e.g. refcoco/):
    refs(unc).p or refs(google).p   a pickle: list of {ref_id, ann_id, image_id, split, category_id,
                                    sentences: [{sent, raw, ...}], ...}; the common JSON conversion
                                    (the same list as refs.json) is read too
    instances.json                  COCO-format images/annotations/categories, next to the refs file
    <root>/<file_name>              the COCO train2014 images (SourceConfig.root)

The pickle is read with a restricted Unpickler that refuses every global (class, function), so only
plain lists/dicts/strings/numbers load: a crafted file cannot run code. One record per image of the
requested split (ref["split"]: train, val, testA, testB, test); its objects are the referred
annotations, each with its mask (from the COCO polygons), box, category and the expressions as
captions.
"""

from __future__ import annotations

import json
import pickle
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from pipelines.records import ImageRecord, SourceObject
from pipelines.sources import SourceConfig
from schemas import masks as mask_codec


class _NoGlobalsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D401 - pickle hook
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (data only)")


def read_refs(path: Path) -> list[dict]:
    """A refs file (pickle or JSON) -> the list of ref dicts, without running any pickled code."""
    if not path.is_file():
        raise FileNotFoundError(f"refcoco: refs file {path} not found")
    if path.suffix.lower() == ".json":
        with open(path) as f:
            refs = json.load(f)
    else:
        try:
            with open(path, "rb") as f:
                # latin1: the official files are Python 2 pickles whose str are bytes.
                refs = _NoGlobalsUnpickler(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise ValueError(f"{path}: not a plain-data refs pickle: {e}") from e
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ValueError(f"{path}: expected a list of ref dicts, got {type(refs).__name__}")
    return refs


def _captions(ref: dict) -> list[str]:
    texts = [s.get("sent") or s.get("raw") or "" for s in ref.get("sentences", [])]
    return [t.strip() for t in texts if t and t.strip()]


class RefCocoSource:
    """Source over one split of a RefCOCO-family refs file; records sorted by image id."""

    name = "refcoco"

    def __init__(self, cfg: SourceConfig):
        if cfg.annotations is None or cfg.root is None:
            raise ValueError("refcoco: needs root (COCO image folder) and annotations (refs file)")
        self.root = Path(cfg.root)
        self.annotation_file = Path(cfg.annotations)
        self.split = cfg.split or "train"
        self.instances_file = self.annotation_file.parent / "instances.json"
        if not self.instances_file.is_file():
            raise FileNotFoundError(
                f"refcoco: {self.instances_file} not found next to the refs file"
            )

    def records(self) -> Iterator[ImageRecord]:
        refs = [r for r in read_refs(self.annotation_file) if r.get("split") == self.split]
        with open(self.instances_file) as f:
            instances = json.load(f)
        images = {int(i["id"]): i for i in instances.get("images", [])}
        anns = {int(a["id"]): a for a in instances.get("annotations", [])}
        cats = {int(c["id"]): c["name"] for c in instances.get("categories", [])}
        by_image: dict[int, dict[int, list[str]]] = defaultdict(dict)
        for ref in refs:  # several refs may name one annotation: their expressions are merged
            texts = by_image[int(ref["image_id"])].setdefault(int(ref["ann_id"]), [])
            texts.extend(t for t in _captions(ref) if t not in texts)
        for image_id in sorted(by_image):
            yield self._record(image_id, images.get(image_id), by_image[image_id], anns, cats)

    def _record(self, image_id, info, ann_texts, anns, cats) -> ImageRecord:
        if info is None:
            return ImageRecord(
                str(image_id),
                "",
                None,
                None,
                error=f"image_id {image_id} not in {self.instances_file}",
            )
        record = ImageRecord(
            str(image_id), str(info.get("file_name") or ""), info.get("width"), info.get("height")
        )
        for ann_id, texts in ann_texts.items():
            ann = anns.get(ann_id)
            if ann is None:
                record.objects.append(
                    SourceObject(
                        str(ann_id),
                        None,
                        [float("nan")] * 4,
                        captions=texts,
                        error=f"ann_id {ann_id} not in {self.instances_file}",
                        error_code="annotation_invalid",
                    )
                )
                continue
            record.objects.append(self._object_or_error(ann_id, ann, texts, info, cats))
        return record


    def _object_or_error(self, ann_id, ann, texts, info, cats) -> SourceObject:
        """One referred annotation, or a rejected object naming what is malformed in it."""
        try:
            return self._object(ann_id, ann, texts, info, cats)
        except (KeyError, TypeError, ValueError) as e:
            return SourceObject(str(ann_id), None, [], captions=texts,
                                error=f"ann {ann_id} in {self.instances_file} is malformed: "
                                      f"{type(e).__name__}: {e}",
                                error_code="annotation_invalid")

    def _object(self, ann_id, ann, texts, info, cats) -> SourceObject:
        cat = cats.get(int(ann["category_id"]))
        obj = SourceObject(
            ann_id=str(ann_id),
            category=cat,
            box_raw=[float(v) for v in ann["bbox"]],
            category_id=int(ann["category_id"]),
            category_name=cat,
            iscrowd=bool(ann.get("iscrowd", 0)),
            attributes={"isthing": True},
            captions=texts,
        )
        try:
            obj.gt_mask = mask_codec.from_segmentation(
                ann["segmentation"], int(info["height"]), int(info["width"])
            )
        except (KeyError, TypeError, ValueError) as e:  # validated before pycocotools sees it
            obj.error = f"ann {ann_id}: bad segmentation ({e})"
            obj.error_code = "gt_mask_invalid"
        if cat is None:
            obj.error = f"unknown category_id {ann['category_id']}"
            obj.error_code = "category_unknown"
        return obj


def open_source(cfg: SourceConfig) -> RefCocoSource:
    return RefCocoSource(cfg)
