"""Samples of a run for code that trains other models: image, masks, boxes, categories, captions.

    from schemas import open_run
    from pipelines.reader import RunDataset
    run = open_run("runs/demo")                        # exactly the parts its manifest lists
    ds = RunDataset(run, where="keep AND box_iou > 0.8")  # a torch-style map dataset of images
    s = ds[0]   # s["image"] (H, W, 3) uint8, s["masks"] (N, H, W) bool, s["boxes"] (N, 4) xywh,
                # s["categories"], s["captions"] (N lists of {text, provenance, score})

`where` is one SQL condition on the `objects` view (docs/schema.md), checked like `engine export
--where`. Images with no selected object are not samples. Reading goes through DuckDB one image at a
time (an index of image ids is all that is held), so a run of any size costs the same memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from schemas import masks as rle
from schemas.runs import Run, open_run

COLUMNS = "object_id, category, box, mask, mask_origin, captions, status, reject_code"


def _image(root: Path, relative: str) -> np.ndarray:
    from pipelines.images import load_image

    loaded = load_image(root, relative, None, None)
    if loaded.pixels is None:
        raise FileNotFoundError(f"{root / relative}: {loaded.error}")
    return loaded.pixels


class RunDataset:
    """Map-style dataset over the images of `run` that have objects matching `where`."""

    def __init__(self, run: Run | Path | str, where: str = "keep", masks: bool = True):
        from pipelines.export_select import check_where

        self.run = run if isinstance(run, Run) else open_run(Path(run))
        self.con = self.run.connect()
        import duckdb

        self.where = check_where(where)
        self.with_masks = masks
        try:
            ids = self.con.execute(
                f"SELECT DISTINCT image_id FROM objects WHERE ({self.where}) ORDER BY image_id"
            ).fetchall()
        except duckdb.Error as exc:
            first = str(exc).splitlines()[0]
            raise ValueError(f"where {where!r} is not a condition on objects: {first}") from exc
        self.image_ids = [r[0] for r in ids]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.image_ids[index]
        file_path, height, width = self.con.execute(
            "SELECT file_path, height, width FROM images WHERE image_id = ?", [image_id]
        ).fetchone()
        cursor = self.con.execute(
            f"SELECT {COLUMNS} FROM objects WHERE image_id = ? AND ({self.where}) "
            "ORDER BY object_id",
            [image_id],
        )
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]
        sample = {
            "image_id": image_id,
            "file_path": file_path,
            "image": _image(self.run.root, file_path),
            "object_ids": [r["object_id"] for r in rows],
            "boxes": np.array([r["box"] or [np.nan] * 4 for r in rows], np.float64).reshape(-1, 4),
            "categories": [r["category"] for r in rows],
            "captions": [r["captions"] or [] for r in rows],
            "mask_origins": [r["mask_origin"] for r in rows],
        }
        if self.with_masks:
            sample["masks"] = _masks([r["mask"] for r in rows], height, width)
        return sample

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]


def _masks(values: list[dict | None], height: int, width: int) -> np.ndarray:
    """(N, H, W) bool; an object without a mask (box-only, rejected) is all False."""
    out = np.zeros((len(values), height, width), bool)
    present = [i for i, v in enumerate(values) if v is not None]
    if present:
        out[present] = rle.decode([values[i] for i in present]).astype(bool)
    return out
