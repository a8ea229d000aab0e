"""The bundled demo source: real photos with hand-drawn boxes plus generated scenes."""

import json
from pathlib import Path

import cv2
import pytest
from pycocotools.coco import COCO

from pipelines.sources import SourceConfig, open_source
from pipelines.sources.demo import DEMO_DIR, scenes_gt_file


@pytest.fixture(scope="module")
def all_records():
    return list(open_source(SourceConfig("demo")).records())


def test_all_split_is_photos_then_scenes_with_unique_ids(all_records):
    photos = list(open_source(SourceConfig("demo", split="photos")).records())
    scenes = list(open_source(SourceConfig("demo", split="scenes")).records())
    assert 6 <= len(photos) <= 10 and len(scenes) == 12
    assert [r.image_id for r in all_records] == [r.image_id for r in photos + scenes]
    assert len({r.image_id for r in all_records}) == len(all_records)
    assert all(r.file.startswith("photos/") for r in photos)
    assert all(r.file.startswith("scenes/") for r in scenes)


def test_records_point_at_real_images_and_boxes_lie_inside_them(all_records):
    source = open_source(SourceConfig("demo"))
    assert source.name == "demo" and source.split == "all" and source.root == DEMO_DIR
    for record in all_records:
        assert record.error is None
        image = cv2.imread(str(DEMO_DIR / record.file))
        assert image is not None, record.file
        assert image.shape[:2] == (record.height, record.width), record.file
        assert image.shape[1] <= 640 and image.shape[0] <= 640
        assert record.objects, record.file
        for obj in record.objects:
            x, y, w, h = obj.box_raw
            assert obj.error is None and obj.category, (record.file, obj)
            assert w > 0 and h > 0 and x >= 0 and y >= 0, (record.file, obj)
            assert x + w <= record.width and y + h <= record.height, (record.file, obj)


def test_photos_have_several_objects_and_documented_origins():
    photos = list(open_source(SourceConfig("demo", split="photos")).records())
    sources_md = (DEMO_DIR / "SOURCES.md").read_text()
    for record in photos:
        assert len(record.objects) >= 3, record.file
        assert f"| {Path(record.file).name} |" in sources_md, record.file  # a row of the table
    assert len({o.category for r in photos for o in r.objects}) >= 15


def test_scene_boxes_match_the_ground_truth_file():
    scenes = list(open_source(SourceConfig("demo", split="scenes")).records())
    gt = COCO(str(scenes_gt_file()))
    for record in scenes:
        ann_ids = gt.getAnnIds(imgIds=[int(record.image_id)])
        assert [o.box_raw for o in record.objects] == [gt.anns[i]["bbox"] for i in ann_ids]
        assert [o.category for o in record.objects] == [
            gt.cats[gt.anns[i]["category_id"]]["name"] for i in ann_ids
        ]
        assert all(o.gt_mask is None for o in record.objects)  # masks are for measuring only


def test_bad_demo_options_raise():
    with pytest.raises(ValueError, match="unknown demo split 'val'"):
        open_source(SourceConfig("demo", split="val"))
    with pytest.raises(ValueError, match="drop --annotations"):
        open_source(SourceConfig("demo", annotations=DEMO_DIR / "photos.json"))


def test_root_can_point_at_a_copy(tmp_path):
    (tmp_path / "photos.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "photos/x.jpg", "width": 10, "height": 8}],
                "annotations": [
                    {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "iscrowd": 0}
                ],
                "categories": [{"id": 1, "name": "thing"}],
            }
        )
    )
    source = open_source(SourceConfig("demo", root=tmp_path, split="photos"))
    [record] = list(source.records())
    assert source.root == tmp_path and record.objects[0].category == "thing"
