"""The template captioner on hand-drawn scenes whose colours and geometry are known exactly."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from pipelines.captioners import Caption, CaptionerConfig, build_captioner
from pipelines.captioners.colors import dominant_color, exposure_gain
from pipelines.captioners.template import (
    TemplateCaptioner,
    names_a_color,
    normalize_category,
    position_phrase,
    size_word,
    with_article,
)
from pipelines.maskers.box import box_masks

BROWN, RED, BLUE, YELLOW, GRAY = (
    (139, 69, 19),
    (220, 20, 30),
    (0, 0, 255),
    (200, 200, 40),
    (128,) * 3,
)


def scene(height, width, objects, background=230):
    """objects: (category, XYXY int box, rgb) painted in order -> image, boxes, box masks, cats."""
    image = np.full((height, width, 3), background, np.uint8)
    for _, (x0, y0, x1, y1), rgb in objects:
        image[y0:y1, x0:x1] = rgb
    boxes = np.array([box for _, box, _ in objects], dtype=np.float64)
    return image, boxes, box_masks(height, width, boxes), [c for c, _, _ in objects]


def texts(captions: list[Caption]) -> list[str]:
    return [c.text for c in captions]


def small_conf(area):  # the documented size confidences
    return 0.5 + 0.5 * min(math.log(0.02 / area) / math.log(4), 1.0)


def large_conf(area):
    return 0.5 + 0.5 * min(math.log(area / 0.25) / math.log(2), 1.0)


def pos_conf(u):  # centre u in [0, 1] along one axis
    return 0.5 + min(3 * min(abs(u - 1 / 3), abs(u - 2 / 3)), 0.5)


@pytest.fixture
def table_scene():
    return scene(200, 300, [
        ("dining_table", (50, 100, 250, 190), BROWN),
        ("Cup", (120, 70, 150, 102), RED),
        ("kite", (200, 20, 260, 60), BLUE),
    ])  # fmt: skip


def test_red_apple_from_its_mask():
    image = np.full((200, 300, 3), 230, np.uint8)
    mask = np.zeros((200, 300), np.uint8)
    cv2.circle(mask, (150, 100), 30, 1, -1)
    image[mask.astype(bool)] = RED
    rows, cols = np.nonzero(mask)
    box = np.array([[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]], np.float64)
    [caps] = TemplateCaptioner()(image, box, mask[None].astype(bool), ["apple"])
    centred = round(pos_conf(150.5 / 300) * pos_conf(100.5 / 200), 4)  # box centre (150.5, 100.5)
    assert [(c.text, c.score) for c in caps] == [
        ("an apple", 1.0),
        ("a red apple", 1.0),  # every masked pixel is red
        ("an apple in the center", centred),
        ("a red apple in the center", centred),
        ("the apple is red", 1.0),
    ]
    assert all(c.provenance == "template" for c in caps)
    # With the box as mask, the white corners count too: the dominance drops to the disk's share.
    [box_caps] = TemplateCaptioner()(image, box, box_masks(200, 300, box), ["apple"])
    red_share = mask.sum() / ((box[0, 2] - box[0, 0]) * (box[0, 3] - box[0, 1]))
    assert ("a red apple", round(red_share, 4)) in [(c.text, c.score) for c in box_caps]


def test_empty_mask_falls_back_to_the_box_pixels():
    image, boxes, masks, cats = scene(100, 100, [("ball", (40, 40, 60, 60), BLUE)])
    [caps] = TemplateCaptioner()(image, boxes, np.zeros_like(masks), cats)
    assert ("a blue ball", 1.0) in [(c.text, c.score) for c in caps]


def test_cup_on_a_table_and_the_inverse(table_scene):
    table, cup, kite = TemplateCaptioner()(*table_scene)
    on = round(1 - 0.5 * 2 / (0.35 * 90), 4)  # full overlap, the cup's bottom 2 px into the table
    above = round(50 / 60 * (1 - 0.5 * 40 / 90), 4)  # kite: 50 of 60 px over it, 40 px gap
    assert [(c.text, c.score) for c in cup][:4] == [
        ("a cup", 1.0),
        ("a red cup", 1.0),
        ("a cup on a dining table", on),
        ("a red cup on a dining table", on),
    ]
    assert texts(cup)[4] == "a small cup in the center"
    assert cup[4].score == round(
        small_conf(30 * 32 / 60000) * pos_conf(135 / 300) * pos_conf(86 / 200), 4
    )
    assert [(c.text, c.score) for c in table] == [
        ("a dining table", 1.0),
        ("a brown dining table", 1.0),  # the cup's pixels in the table box are left out
        ("a dining table with a cup on it", on),
        ("a brown dining table with a cup on it", on),
        ("a dining table below a kite", above),
    ]
    assert texts(kite) == [
        "a kite",
        "a blue kite",
        "a kite at the top right",
        "a blue kite at the top right",
        "a kite above a dining table",
    ]
    assert kite[2].score == round(pos_conf(230 / 300) * pos_conf(40 / 200), 4)


def test_dog_in_a_basket_next_to_a_cat():
    image, boxes, masks, cats = scene(240, 320, [
        ("basket", (20, 80, 180, 220), YELLOW),
        ("dog", (50, 110, 140, 200), BROWN),
        ("cat", (200, 90, 300, 220), GRAY),
    ])  # fmt: skip
    basket, dog, cat = TemplateCaptioner()(image, boxes, masks, cats)
    assert texts(dog)[:4] == [
        "a dog",
        "a brown dog",
        "a dog in a basket",
        "a brown dog in a basket",
    ]
    assert dog[2].score == 1.0  # fully contained
    assert texts(basket)[:5] == [
        "a basket",
        "a yellow basket",
        "a basket with a dog",
        "a yellow basket with a dog",
        "a basket next to a cat",
    ]
    assert basket[4].score == round(1.0 * (1 - 0.5 * 20 / 50), 4)  # 20 px gap of 50 allowed
    assert "a gray cat" in texts(cat) and "a cat next to a basket" in texts(cat)


def test_size_and_position_words():
    image, boxes, masks, cats = scene(240, 300, [
        ("dog", (0, 20, 150, 220), BROWN),
        ("kite", (260, 10, 280, 30), BLUE),
    ])  # fmt: skip
    dog, kite = TemplateCaptioner(max_captions=10)(image, boxes, masks, cats)
    place = {c.text: c.score for c in dog + kite}
    # The dog is 83% of the image tall: no vertical word.
    assert place["a large dog on the left"] == round(large_conf(150 * 200 / 72000) * 0.75, 4)
    assert place["a small kite at the top right"] == round(small_conf(400 / 72000), 4)
    assert size_word(np.array([0, 0, 100, 100.0]), 240, 300) == (None, 1.0)  # 14%: medium
    assert position_phrase(np.array([0, 0, 300, 240.0]), 240, 300) == (None, 1.0)
    assert position_phrase(np.array([100, 0, 200, 240.0]), 240, 300) == (
        "in the center",
        pytest.approx(1.0),
    )


def test_same_category_partner_is_another_and_repeated_phrases_are_merged():
    image, boxes, masks, cats = scene(200, 400, [
        ("table", (20, 100, 380, 190), BROWN),
        ("cup", (60, 70, 90, 102), RED),
        ("cup", (300, 70, 330, 102), RED),
        ("dog", (100, 120, 140, 160), GRAY),
        ("dog", (150, 120, 190, 160), GRAY),
    ])  # fmt: skip
    table, cup1, cup2, dog1, dog2 = TemplateCaptioner(max_captions=10)(image, boxes, masks, cats)
    assert texts(table).count("a table with a cup on it") == 1  # two cups, one phrase
    assert "a dog next to another dog" in texts(dog1) and "a dog next to another dog" in texts(dog2)
    for caps in (table, cup1, cup2, dog1, dog2):
        assert len(texts(caps)) == len(set(texts(caps)))


def test_max_captions_truncates_the_same_ranking(table_scene):
    full = TemplateCaptioner(max_captions=20)(*table_scene)
    assert max(len(c) for c in full) > 5
    for k in range(1, 8):
        got = TemplateCaptioner(max_captions=k)(*table_scene)
        assert got == [caps[:k] for caps in full]
        assert all(caps[0].text in ("a dining table", "a cup", "a kite") for caps in got)
    for caps in full:
        scores = [c.score for c in caps[:-1]]  # the statement "the x is c" goes last by design
        assert scores == sorted(scores, reverse=True)


def test_object_order_and_call_order_do_not_change_captions(table_scene):
    image, boxes, masks, cats = table_scene
    captioner = TemplateCaptioner(max_captions=20)
    reference = captioner(image, boxes, masks, cats)
    for perm in ([2, 0, 1], [1, 2, 0], [2, 1, 0]):
        got = captioner(image, boxes[perm], masks[perm], [cats[k] for k in perm])
        assert got == [reference[k] for k in perm]
    other = scene(100, 100, [("ball", (10, 10, 30, 30), BLUE)])
    first = captioner(*other)
    assert captioner(image, boxes, masks, cats) == reference
    assert captioner(*other) == first
    assert TemplateCaptioner(max_captions=20)(image, boxes, masks, cats) == reference


def test_noise_image_gets_no_colour_and_scores_stay_in_range():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    xy = rng.uniform(0, 100, (8, 2))
    boxes = np.concatenate([xy, np.minimum(xy + rng.uniform(5, 60, (8, 2)), [160, 120])], axis=1)
    cats = ["thing"] * 8
    out = TemplateCaptioner(max_captions=20)(image, boxes, box_masks(120, 160, boxes), cats)
    colours = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "gray")
    for caps in out:
        assert caps[0] == Caption("a thing", "template", 1.0)
        assert all(0.0 <= c.score <= 1.0 and isinstance(c.score, float) for c in caps)
        assert not any(word in c.text.split() for c in caps for word in colours)


def test_category_text_is_normalised_and_articles_follow_the_sound():
    assert normalize_category("  Traffic_Light ", 0) == "traffic light"
    image, boxes, masks, _ = scene(50, 50, [("x", (10, 10, 20, 20), BLUE)])
    [caps] = TemplateCaptioner()(image, boxes, masks, ["Traffic_Light"])
    assert caps[0].text == "a traffic light"
    an = ["apple", "orange cup", "umbrella", "hour glass"]
    a = ["dog", "unicorn", "european bison", "one-way sign", "hot dog"]
    for phrase, art in [(p, "an") for p in an] + [(p, "a") for p in a]:
        assert with_article(phrase) == f"{art} {phrase}"


@pytest.mark.parametrize("bad", [None, "", "   ", "__"])
def test_missing_category_names_the_object(bad):
    image, boxes, masks, _ = scene(
        50, 50, [("a", (0, 0, 10, 10), BLUE), ("b", (20, 20, 30, 30), RED)]
    )
    with pytest.raises(ValueError, match="object 1"):
        TemplateCaptioner()(image, boxes, masks, ["cup", bad])


def test_bad_inputs_are_rejected_with_the_shape():
    image, boxes, masks, cats = scene(50, 50, [("a", (0, 0, 10, 10), BLUE)])
    with pytest.raises(ValueError, match="uint8"):
        TemplateCaptioner()(image.astype(np.float32), boxes, masks, cats)
    with pytest.raises(ValueError, match="boxes"):
        TemplateCaptioner()(image, boxes[:, :3], masks, cats)
    with pytest.raises(ValueError, match="masks"):
        TemplateCaptioner()(image, boxes, masks[:, :10], cats)
    with pytest.raises(ValueError, match="max_captions"):
        TemplateCaptioner(max_captions=0)
    assert TemplateCaptioner()(image, np.zeros((0, 4)), np.zeros((0, 50, 50), bool), []) == []


def test_registry_builds_the_template_captioner():
    captioner = build_captioner(CaptionerConfig(name="template", captions_per_object=3))
    assert isinstance(captioner, TemplateCaptioner) and captioner.max_captions == 3


def test_smaller_objects_in_front_do_not_colour_the_larger_one():
    # A blue laptop covers 30% of the brown table's box (both masks are their boxes).
    image, boxes, masks, cats = scene(200, 300, [
        ("table", (0, 100, 300, 200), BROWN),
        ("laptop", (0, 60, 150, 160), BLUE),
    ])  # fmt: skip
    covered = np.mean(np.all(image[100:200, 0:300] == BLUE, axis=-1))
    assert covered == pytest.approx(0.3)
    table, laptop = TemplateCaptioner(max_captions=10)(image, boxes, masks, cats)
    assert ("a brown table", 1.0) in [(c.text, c.score) for c in table]  # not 0.7
    assert ("a blue laptop", 1.0) in [(c.text, c.score) for c in laptop]


def test_a_dim_photo_is_named_after_exposure_correction():
    # Everything at 60-70% brightness: the brightest pixel is the 178-gray background.
    dim_orange = (153, 84, 0)  # CSS dark orange (255, 140, 0) at 60% value
    image, boxes, masks, cats = scene(100, 100, [("fruit", (30, 30, 70, 70), dim_orange)], 178)
    assert exposure_gain(image) == pytest.approx(255 / 178)
    pixels = image[30:70, 30:70].reshape(-1, 3)
    assert dominant_color(pixels)[0] == "brown"  # judged alone, the swatch is brown...
    [caps] = TemplateCaptioner()(image, boxes, masks, cats)
    assert "an orange fruit" in texts(caps)  # ...but in its dim photo it reads orange
    # A well-exposed image is left alone, and a night scene is brightened at most 1.5x.
    assert exposure_gain(np.full((10, 10, 3), 255, np.uint8)) == 1.0
    assert exposure_gain(np.full((10, 10, 3), 20, np.uint8)) == 1.5


def test_categories_that_name_a_colour_get_no_colour_word():
    assert names_a_color("red cabbage") and names_a_color("orange") and not names_a_color("dog")
    image, boxes, masks, _ = scene(100, 100, [("x", (30, 30, 70, 70), (128, 0, 128))])
    [caps] = TemplateCaptioner()(image, boxes, masks, ["red cabbage"])
    assert texts(caps) == ["a red cabbage", "a red cabbage in the center"]
