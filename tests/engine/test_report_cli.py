"""`engine report` and `engine show` through the CLI, and the drawing rules of pipelines.render
(readable labels that do not overlap, reject codes on non-kept objects, distinct colours)."""

from __future__ import annotations

import itertools
import math
import re

import cv2
import numpy as np
import pytest

from engine.cli import main
from pipelines.render import PALETTE, STATUS_EDGE, draw_objects, render_grid
from schemas import masks as rle
from tests.helpers.runs import read_table, synthesize_photos


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return synthesize_photos(tmp_path_factory.mktemp("cli"))


def test_report_command_writes_a_page_with_the_sample(run_dir, capsys):
    assert main(["report", str(run_dir), "--sample", "4", "--seed", "3"]) == 0
    page = (run_dir / "report" / "index.html").read_text()
    assert len(re.findall(r'<div class=card data-image-id=', page)) == 4
    assert "wrote" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["report", "{tmp}/nope"], "no such folder"),
        (["report", "{run}", "--sample", "0"], "--sample must be at least 1"),
        (["report", "{run}", "--out", "{run}"], "refusing to replace it"),
        (["report", "{run}", "--out", "{run}/.."], "refusing to replace it"),
        (["show", "{run}", "--grid", "-2"], "--grid must be 0"),
        (["show", "{run}", "--image-id", "nosuch"], "no image 'nosuch'"),
    ],
)
def test_user_errors_exit_2_with_one_line(run_dir, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, run=run_dir) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1
    assert (run_dir / "manifest.json").is_file()  # the run is untouched


def test_a_second_report_replaces_the_first(run_dir):
    out = run_dir / "report2"
    assert main(["report", str(run_dir), "--out", str(out), "--sample", "2"]) == 0
    assert main(["report", str(run_dir), "--out", str(out), "--sample", "3"]) == 0
    assert len(list((out / "thumbs").iterdir())) == 3
    own = {".engine.lock", ".mqengine-run"}  # the run's lock and marker (pipelines/outdir.py)
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == sorted(own)


def test_show_grid_draws_a_contact_sheet(run_dir, tmp_path):
    dest = tmp_path / "sheet.png"
    assert main(["show", str(run_dir), "--grid", "9", "--to", str(dest)]) == 0
    sheet = cv2.imread(str(dest))
    tile, strip = 320, 22
    assert sheet.shape == (3 * (tile + strip), 3 * tile, 3)  # 9 images: 3 x 3 cells
    for r, c in itertools.product(range(3), range(3)):
        cell = sheet[r * (tile + strip) : r * (tile + strip) + tile, c * tile : (c + 1) * tile]
        assert cell.std() > 10, f"cell {r},{c} is blank"


def test_show_grid_keeps_an_unreadable_image_as_a_grey_cell(tmp_path):
    dest = render_grid(tmp_path, [("gone", "missing.jpg", [])], tmp_path / "g.png", tile=100)
    cell = cv2.imread(str(dest))[:100, :100]
    assert (cell == 200).mean() > 0.6 and (cell != 200).any()  # grey with the reason written


def test_show_draws_reject_codes_of_the_run(run_dir, tmp_path):
    objects = [o for o in read_table(run_dir, "objects") if o["status"] == "filtered"]
    images = read_table(run_dir, "images")
    image = next(r for r in images if r["image_id"] == objects[0]["image_id"])
    assert main(["show", str(run_dir), "--image-id", image["image_id"],
                 "--to", str(tmp_path / "s.png")]) == 0
    pixels = cv2.cvtColor(cv2.imread(str(tmp_path / "s.png")), cv2.COLOR_BGR2RGB)
    same = [o for o in read_table(run_dir, "objects") if o["image_id"] == image["image_id"]]
    _, labels = draw_objects(np.zeros_like(pixels), sorted(same, key=lambda o: o["object_id"]))
    coded = [lab for lab in labels if lab.text.startswith("[mask_fallback]")]
    assert len(coded) == sum(o["reject_code"] == "mask_fallback" for o in same) > 0
    x0, y0, x1, y1 = coded[0].rect  # the label is really on the written picture
    assert (pixels[y0:y1, x0:x1] == STATUS_EDGE["filtered"]).all(axis=2).mean() > 0.4


# ------------------------------------------------------------------------- drawing rules


def _contrast(a, b) -> float:
    """WCAG 2 contrast ratio of two sRGB colours."""

    def lum(c):
        lin = [(v / 255 / 12.92) if v / 255 <= 0.04045 else ((v / 255 + 0.055) / 1.055) ** 2.4
               for v in c]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    hi, lo = sorted((lum(a), lum(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def _object(box, status="kept", code=None, category="thing", shape=(200, 300)):
    m = np.zeros((1, *shape), np.uint8)
    x, y, w, h = box
    m[0, y : y + h, x : x + w] = 1
    return {"box": list(map(float, box)), "mask": rle.encode(m)[0], "status": status,
            "reject_code": code, "category": category, "captions": []}


@pytest.mark.parametrize("background", [255, 0, 128])
def test_labels_are_readable_on_any_background(background):
    image = np.full((200, 300, 3), background, np.uint8)
    objects = [_object((20 + 50 * k, 60, 40, 40), category=f"object {k}") for k in range(5)]
    objects.append(_object((40, 130, 60, 50), "filtered", "low_box_iou"))
    objects.append(_object((160, 130, 60, 50), "rejected", "box_invalid"))
    drawn, labels = draw_objects(image, objects)
    assert len(labels) == len(objects)
    for label in labels:
        x0, y0, x1, y1 = label.rect
        patch = drawn[y0:y1, x0:x1].reshape(-1, 3)
        # filled: the label's colour covers most of it, whatever the image is
        fill = (patch == label.colour).all(axis=1).mean()
        assert fill > 0.5, (label.text, fill)
        # and the text on it is at least WCAG AA contrast (4.5) against the fill
        best = max(_contrast(label.colour, p) for p in np.unique(patch, axis=0))
        assert best >= 4.5, (label.text, best)


def test_labels_do_not_overlap_even_for_stacked_boxes():
    image = np.full((240, 320, 3), 90, np.uint8)
    objects = [_object((100, 100, 60, 60), category=f"same place {k}", shape=(240, 320))
               for k in range(6)]
    _, labels = draw_objects(image, objects)
    for a, b in itertools.combinations(labels, 2):
        ox = min(a.rect[2], b.rect[2]) - max(a.rect[0], b.rect[0])
        oy = min(a.rect[3], b.rect[3]) - max(a.rect[1], b.rect[1])
        assert ox <= 0 or oy <= 0, (a, b)
    assert all(0 <= lab.rect[0] and lab.rect[2] <= 320 and 0 <= lab.rect[1] and
               lab.rect[3] <= 240 for lab in labels)


def test_non_kept_labels_name_the_reject_code():
    objects = [_object((10, 10, 30, 30), "filtered", "low_box_iou", "cup"),
               _object((60, 60, 30, 30), "rejected", "box_invalid", "dog"),
               _object((120, 60, 30, 30), category="cat")]
    _, labels = draw_objects(np.zeros((200, 300, 3), np.uint8), objects)
    assert [lab.text for lab in labels] == ["[low_box_iou] cup", "[box_invalid] dog", "cat"]


def test_kept_colours_are_far_from_the_status_colours():
    for colour, status in itertools.product(PALETTE, ("filtered", "rejected")):
        assert math.dist(colour, STATUS_EDGE[status]) > 120, (colour, status)
    assert len(set(PALETTE)) == len(PALETTE)
