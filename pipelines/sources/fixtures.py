"""Synthetic Objects365-style annotation files (no images) for tests and ingest benchmarks.

The file is written item by item, so a multi-million-box fixture needs no more memory than one item.
Its shape follows the release (see `pipelines.sources.objects365`): v2 `file_name`s under
`images/v{1,2}/patchN/`, `isfake`/`isreflected` flags, float xywh boxes of which some are negative
or run past the image, category names with the release's typos and trailing spaces, and (optionally)
one image from the known-missing list.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# A few real names at their release ids (typos and trailing spaces included) so that normalisation
# is exercised; the other ids get neutral placeholder names. 365 categories, as in both releases.
_V2_NAMES = {1: "Person", 2: "Sneakers", 3: "Chair", 38: "Moniter/TV", 53: "Bakset",
             197: "Cigar/Cigarette ", 292: "Mushroon", 308: "Campel", 309: "Formula 1 ",
             322: "Buttefly", 365: "Table Tennis "}
_V1_NAMES = {1: "person", 2: "sneakers", 3: "chair", 24: "tv", 42: "basket", 187: "tissue ",
             261: "pine apple"}
N_CATEGORIES = 365
KNOWN_MISSING_V2 = "images/v2/patch16/objects365_v2_00908726.jpg"


def categories(version: int) -> list[dict]:
    names = _V2_NAMES if version == 2 else _V1_NAMES
    return [{"id": cid, "name": names.get(cid, f"object class {cid}")}
            for cid in range(1, N_CATEGORIES + 1)]


def _image(version: int, index: int, seed: int, n_images: int, known_missing: bool) -> dict:
    """Image `index`, the same on every call (its own seeded generator), so none are kept."""
    rng = random.Random(seed * 1_000_003 + index)
    width, height = rng.choice([(640, 480), (1024, 683), (512, 768), (800, 600)])
    if version == 2:
        image_id = 100_000 + index
        sub = "v1" if index % 2 == 0 else "v2"
        file_name = f"images/{sub}/patch{index % 51}/objects365_{sub}_{image_id:08d}.jpg"
    else:
        image_id = index + 1
        file_name = f"obj365_train_{image_id:012d}.jpg"
    if known_missing and version == 2 and index == n_images - 1:
        file_name = KNOWN_MISSING_V2
    return {"height": height, "id": image_id, "license": 5, "width": width,
            "file_name": file_name, "url": ""}


def _category_id(version: int, rng: random.Random) -> int:
    """Long-tailed like the release: a third of the boxes go to the few named categories."""
    if rng.random() < 1 / 3:
        return rng.choice(list(_V2_NAMES if version == 2 else _V1_NAMES))
    return rng.randint(1, N_CATEGORIES)


def _annotation(version: int, ann_id: int, image: dict, rng: random.Random) -> dict:
    w_img, h_img = image["width"], image["height"]
    w, h = rng.uniform(4, w_img / 2), rng.uniform(4, h_img / 2)
    x, y = rng.uniform(0, w_img - w), rng.uniform(0, h_img - h)
    kind = ann_id % 50
    if kind == 7:  # slightly negative origin, as in the release
        x, y = -rng.uniform(0.001, 2.0), -rng.uniform(0.001, 2.0)
    elif kind == 13:  # runs past the right/bottom edge
        w, h = w_img - x + rng.uniform(0.5, 5), h_img - y + rng.uniform(0.5, 5)
    ann = {"id": ann_id, "iscrowd": 0, "area": w * h, "bbox": [x, y, w, h],
           "image_id": image["id"], "category_id": _category_id(version, rng)}
    if version == 2:
        ann["isfake"] = int(rng.random() < 0.02)
        ann["isreflected"] = int(rng.random() < 0.01)
    return ann


def write_objects365_fixture(path: Path, n_images: int, boxes_per_image: int, version: int = 2,
                             seed: int = 0, include_known_missing: bool = True) -> dict:
    """Write an Objects365-v`version` style annotation JSON to `path`; return its counts.

    Keys come in the release's order (images, annotations, categories last), so a reader that
    needs categories first cannot get away with it.
    Returns {"path", "n_images", "n_boxes", "bytes"}.
    """
    if version not in (1, 2):
        raise ValueError(f"version must be 1 or 2, got {version!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    def images():
        for i in range(n_images):
            yield _image(version, i, seed, n_images, include_known_missing)

    n_boxes = 0
    with open(path, "w") as f:
        f.write('{"info": {"description": "synthetic Objects365-style fixture"}, "licenses": [],\n')
        f.write('"images": [\n')
        for i, image in enumerate(images()):
            f.write(("" if i == 0 else ",\n") + json.dumps(image))
        f.write('\n],\n"annotations": [\n')
        first = True
        for image in images():
            for _ in range(boxes_per_image):
                ann = _annotation(version, n_boxes + (1 if version == 2 else 0), image, rng)
                f.write(("" if first else ",\n") + json.dumps(ann))
                first = False
                n_boxes += 1
        f.write('\n],\n"categories": ')
        f.write(json.dumps(categories(version)))
        f.write("}\n")
    return {"path": str(path), "n_images": n_images, "n_boxes": n_boxes,
            "bytes": path.stat().st_size}
