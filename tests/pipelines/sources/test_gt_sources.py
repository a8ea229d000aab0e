"""Ground-truth sources (COCO panoptic, ADE20K semantic, RefCOCO, foreground) on fixtures written
here in each dataset's exact layout; masks are checked against the arrays the fixtures drew."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipelines.sources import SourceConfig, open_source
from pipelines.sources.refcoco import read_refs
from schemas import masks as mask_codec

H, W = 24, 32


def decode(value) -> np.ndarray:
    return mask_codec.decode([value])[0].astype(bool)


def write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((H, W, 3), 100, dtype=np.uint8))


# ------------------------------------------------------------------------------- COCO panoptic
def write_panoptic(tmp_path: Path) -> tuple[Path, np.ndarray]:
    ann_dir = tmp_path / "annotations"
    png_dir = ann_dir / "panoptic_val2017"
    png_dir.mkdir(parents=True)
    ids = np.zeros((H, W), dtype=np.int64)
    ids[2:10, 3:12] = 1001  # person (thing)
    ids[12:20, 3:12] = 70000 + 5  # person crowd, an id that needs all three channels
    ids[:, 20:] = 300  # sky (stuff)
    ids[0, 0] = 42  # a segment with an unknown category
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    cv2.imwrite(str(png_dir / "000000000001.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    write_image(tmp_path / "val2017" / "000000000001.jpg")
    doc = {
        "images": [
            {"id": 1, "file_name": "000000000001.jpg", "width": W, "height": H},
            {"id": 2, "file_name": "000000000002.jpg", "width": W, "height": H},
            {"id": 3, "file_name": "000000000003.jpg", "width": W, "height": H},
        ],
        "annotations": [
            {
                "image_id": 1,
                "file_name": "000000000001.png",
                "segments_info": [
                    {"id": 1001, "category_id": 1, "iscrowd": 0, "bbox": [3, 2, 9, 8], "area": 72},
                    {
                        "id": 70005,
                        "category_id": 1,
                        "iscrowd": 1,
                        "bbox": [3, 12, 9, 8],
                        "area": 72,
                    },
                    {
                        "id": 300,
                        "category_id": 187,
                        "iscrowd": 0,
                        "bbox": [20, 0, 12, 24],
                        "area": 288,
                    },
                    {"id": 42, "category_id": 999, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1},
                ],
            },
            {"image_id": 2, "file_name": "000000000002.png", "segments_info": []},
        ],
        "categories": [
            {"id": 1, "name": "person", "isthing": 1, "supercategory": "person"},
            {"id": 187, "name": "sky-other-merged", "isthing": 0, "supercategory": "sky"},
        ],
    }
    path = ann_dir / "panoptic_val2017.json"
    path.write_text(json.dumps(doc))
    return path, ids


def test_coco_panoptic_segments(tmp_path):
    path, ids = write_panoptic(tmp_path)
    source = open_source(SourceConfig("coco_panoptic", tmp_path / "val2017", path))
    records = list(source.records())
    assert source.split == "val2017"
    assert [r.image_id for r in records] == ["1", "2", "3"]
    first = records[0]
    assert (first.file, first.width, first.height, first.error) == ("000000000001.jpg", W, H, None)
    objs = {o.ann_id: o for o in first.objects}
    for seg_id, obj in objs.items():
        assert np.array_equal(decode(obj.gt_mask), ids == int(seg_id))
    assert (objs["1001"].category, objs["1001"].attributes, objs["1001"].iscrowd) == (
        "person",
        {"isthing": True},
        False,
    )
    assert objs["70005"].iscrowd and objs["70005"].box_raw == [3, 12, 9, 8]
    assert objs["300"].attributes == {"isthing": False} and objs["300"].category_id == 187
    assert objs["42"].error == "unknown category_id 999" and objs["1001"].error is None
    assert objs["42"].error_code == "category_unknown" and objs["1001"].error_code is None
    assert records[1].error_status == "missing" and "000000000002.png" in records[1].error
    assert records[2].error == "no panoptic annotation for this image"


def test_coco_panoptic_malformed_segments_and_png_names_are_rejected_rows(tmp_path):
    path, ids = write_panoptic(tmp_path)
    doc = json.loads(path.read_text())
    segments = doc["annotations"][0]["segments_info"]
    del segments[0]["category_id"]  # malformed: no category
    segments.append("not a segment")
    doc["annotations"][1]["file_name"] = "../../escape.png"
    path.write_text(json.dumps(doc))
    records = list(open_source(SourceConfig("coco_panoptic", tmp_path / "val2017", path))
                   .records())
    objs = records[0].objects
    assert [o.error_code for o in objs] == ["annotation_invalid", None, None,
                                            "category_unknown", "annotation_invalid"]
    assert "segments_info[0] is malformed: KeyError" in objs[0].error
    assert np.array_equal(decode(objs[1].gt_mask), ids == 70005)  # the rest are unaffected
    assert records[1].error_status == "unsafe_path" and "escape.png" in records[1].error
    doc["annotations"][0]["image_id"] = "one"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"annotations\[0\]: 'image_id' must be an integer"):
        list(open_source(SourceConfig("coco_panoptic", tmp_path / "val2017", path)).records())


def test_coco_panoptic_needs_the_png_folder(tmp_path):
    path = tmp_path / "panoptic_train2017.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(FileNotFoundError, match="panoptic_train2017"):
        open_source(SourceConfig("coco_panoptic", tmp_path, path))


# ------------------------------------------------------------------------------------- ADE20K
def test_ade_semantic_regions(tmp_path):
    classes = tmp_path / "objectInfo150.csv"
    classes.write_text(
        "Idx,Ratio,Train,Val,Name\n1,0.15,1,1,wall\n2,0.1,1,1,building;edifice\n3,0.09,1,1,sky\n"
    )
    labels = np.zeros((H, W), dtype=np.uint8)
    labels[:10] = 1
    labels[10:20, :16] = 3
    labels[20:, :] = 7  # not in the 3-class list
    (tmp_path / "annotations" / "validation").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "annotations" / "validation" / "ADE_val_00000001.png"), labels)
    write_image(tmp_path / "images" / "validation" / "ADE_val_00000001.jpg")
    source = open_source(SourceConfig("ade_semantic", tmp_path, classes, "validation"))
    (record,) = source.records()
    assert (record.image_id, record.file) == (
        "ADE_val_00000001",
        "images/validation/ADE_val_00000001.jpg",
    )
    assert (record.width, record.height) == (W, H)
    objs = {o.category_id: o for o in record.objects}
    assert sorted(objs) == [1, 3, 7]
    assert objs[1].category == "wall" and objs[1].attributes == {"isthing": False}
    assert objs[3].category == "sky" and objs[3].box_raw == [0, 10, 16, 10]
    for value, obj in objs.items():
        assert np.array_equal(decode(obj.gt_mask), labels == value)
    assert objs[7].category is None and "pixel value 7 not in the class list" in objs[7].error
    assert objs[7].error_code == "category_unknown" and objs[1].error_code is None
    txt = tmp_path / "classes.txt"
    txt.write_text("wall\nbuilding\nsky\n")
    txt_objs = list(
        open_source(SourceConfig("ade_semantic", tmp_path, txt, "validation")).records()
    )
    assert [o.category for o in txt_objs[0].objects] == ["wall", "sky", None]


# ------------------------------------------------------------------------------------ RefCOCO
def write_refcoco(tmp_path: Path) -> Path:
    folder = tmp_path / "refcoco"
    folder.mkdir()
    instances = {
        "images": [
            {"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "width": W, "height": H},
            {"id": 4, "file_name": "COCO_train2014_000000000004.jpg", "width": W, "height": H},
        ],
        "annotations": [
            {
                "id": 100,
                "image_id": 9,
                "category_id": 1,
                "bbox": [2, 2, 10, 10],
                "iscrowd": 0,
                "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]],
            },
            {
                "id": 101,
                "image_id": 4,
                "category_id": 2,
                "bbox": [0, 0, 8, 8],
                "iscrowd": 0,
                "segmentation": [[0, 0, 8, 0, 8, 8, 0, 8]],
            },
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}],
    }
    (folder / "instances.json").write_text(json.dumps(instances))
    refs = [
        {
            "ref_id": 0,
            "ann_id": 100,
            "image_id": 9,
            "split": "val",
            "category_id": 1,
            "sentences": [{"sent": "man on left", "raw": "Man on left."}, {"sent": "guy"}],
        },
        {
            "ref_id": 1,
            "ann_id": 100,
            "image_id": 9,
            "split": "val",
            "category_id": 1,
            "sentences": [{"sent": "guy"}, {"sent": "person in red"}],
        },
        {
            "ref_id": 2,
            "ann_id": 101,
            "image_id": 4,
            "split": "train",
            "category_id": 2,
            "sentences": [{"sent": "small dog"}],
        },
        {
            "ref_id": 3,
            "ann_id": 555,
            "image_id": 4,
            "split": "val",
            "category_id": 2,
            "sentences": [{"sent": "lost"}],
        },
    ]
    with open(folder / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)  # the official files are protocol-2 pickles
    (folder / "refs.json").write_text(json.dumps(refs))
    return folder


@pytest.mark.parametrize("refs_name", ["refs(unc).p", "refs.json"])
def test_refcoco_expressions_become_captions(tmp_path, refs_name):
    folder = write_refcoco(tmp_path)
    source = open_source(SourceConfig("refcoco", tmp_path / "train2014", folder / refs_name, "val"))
    records = list(source.records())
    assert [r.image_id for r in records] == ["4", "9"]  # sorted by image id
    lost = records[0].objects[0]
    assert lost.ann_id == "555" and "ann_id 555 not in" in lost.error
    assert lost.error_code == "annotation_invalid"
    (person,) = records[1].objects
    assert person.captions == ["man on left", "guy", "person in red"]  # merged, deduplicated
    assert (person.category, person.box_raw, person.attributes) == (
        "person",
        [2, 2, 10, 10],
        {"isthing": True},
    )
    expected = mask_codec.decode([mask_codec.from_polygons([[2, 2, 12, 2, 12, 12, 2, 12]], H, W)])
    assert np.array_equal(decode(person.gt_mask), expected[0].astype(bool))
    train = list(
        open_source(SourceConfig("refcoco", tmp_path, folder / refs_name, "train")).records()
    )
    assert [(r.image_id, r.objects[0].captions) for r in train] == [("4", ["small dog"])]


@pytest.mark.parametrize("segmentation, code", [
    ([[2, 2, 12, 2]], "gt_mask_invalid"),  # 2 points
    ({"size": [H, W], "counts": [3, 4]}, "gt_mask_invalid"),  # runs cover 7 of H*W pixels
])
def test_refcoco_bad_segmentation_is_gt_mask_invalid(tmp_path, segmentation, code):
    folder = write_refcoco(tmp_path)
    instances = json.loads((folder / "instances.json").read_text())
    instances["annotations"][0]["segmentation"] = segmentation
    instances["categories"] = instances["categories"][1:]  # ann 100's category is now unknown
    (folder / "instances.json").write_text(json.dumps(instances))
    records = list(open_source(SourceConfig("refcoco", tmp_path, folder / "refs.json", "val"))
                   .records())
    (person,) = records[1].objects
    assert person.error_code == "category_unknown"  # the later, more basic problem wins
    instances["categories"].insert(0, {"id": 1, "name": "person"})
    (folder / "instances.json").write_text(json.dumps(instances))
    records = list(open_source(SourceConfig("refcoco", tmp_path, folder / "refs.json", "val"))
                   .records())
    (person,) = records[1].objects
    assert person.error_code == code and "bad segmentation" in person.error
    assert person.gt_mask is None


def test_refcoco_malformed_annotation_is_a_rejected_object(tmp_path):
    folder = write_refcoco(tmp_path)
    instances = json.loads((folder / "instances.json").read_text())
    instances["annotations"][0]["bbox"] = None
    (folder / "instances.json").write_text(json.dumps(instances))
    records = list(open_source(SourceConfig("refcoco", tmp_path, folder / "refs.json", "val"))
                   .records())
    (person,) = records[1].objects
    assert person.error_code == "annotation_invalid" and "ann 100" in person.error
    assert person.captions == ["man on left", "guy", "person in red"]  # still reported


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_refcoco_pickle_never_runs_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "refs(evil).p"
    path.write_bytes(pickle.dumps([_Exploit()], protocol=2))
    with pytest.raises(ValueError, match="refusing to load global"):
        read_refs(path)
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------------- foreground
def test_foreground_pairs_images_and_masks(tmp_path):
    images, masks = tmp_path / "DUTS-TR-Image", tmp_path / "DUTS-TR-Mask"
    masks.mkdir()
    fg = np.zeros((H, W), dtype=np.uint8)
    fg[4:14, 6:20] = 255
    fg[3, 6] = 100  # an anti-aliased edge pixel below the threshold
    cv2.imwrite(str(masks / "a.png"), fg)
    write_image(images / "a.jpg")
    cv2.imwrite(str(masks / "b.png"), np.zeros((H, W), dtype=np.uint8))
    write_image(images / "b.png")
    cv2.imwrite(str(masks / "c.png"), fg)  # no image
    records = list(open_source(SourceConfig("foreground", images, masks)).records())
    assert [(r.image_id, r.file) for r in records] == [
        ("a", "a.jpg"),
        ("b", "b.png"),
        ("c", "c.jpg"),
    ]
    (obj,) = records[0].objects
    assert np.array_equal(decode(obj.gt_mask), fg > 127)
    assert (obj.category, obj.box_raw, obj.attributes, obj.error) == (
        "foreground",
        [6, 4, 14, 10],
        {"isthing": True},
        None,
    )
    assert "is empty" in records[1].objects[0].error
    assert records[1].objects[0].error_code == "gt_mask_invalid"
    assert records[2].error_status == "missing" and "no image for mask" in records[2].error
