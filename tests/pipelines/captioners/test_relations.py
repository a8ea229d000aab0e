"""Geometric relations between boxes: each holds exactly where its documented rule says."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.captioners.relations import (
    PRECEDENCE,
    above_scores,
    in_scores,
    next_to_scores,
    on_scores,
    pair_relations,
    relation_matrices,
    relation_phrase,
)

TABLE = [50.0, 100.0, 250.0, 190.0]  # 200 x 90


def B(*rows):
    return np.array(rows, dtype=np.float64)


def test_cup_on_table_with_strength_from_the_documented_formula():
    boxes = B([120, 70, 150, 102], TABLE)  # the cup's bottom is 2 px below the table's top
    on = on_scores(boxes)
    assert on[0, 1] == pytest.approx(1.0 * (1 - 0.5 * 2 / (0.35 * 90)))
    assert on[1, 0] == 0.0 and on[0, 0] == 0.0


@pytest.mark.parametrize(
    "cup",
    [
        [120, 20, 150, 60],  # floating 40 px above the table: not resting on it
        [120, 140, 150, 170],  # bottom in the lower half of the table box
        [240, 70, 300, 102],  # only 10 of 60 px of width over the table
    ],
)
def test_not_on_when_the_geometry_fails(cup):
    assert on_scores(B(cup, TABLE))[0, 1] == 0.0


def test_in_needs_containment_and_a_larger_container():
    boxes = B([50, 110, 140, 200], [20, 80, 180, 220], [0, 0, 100, 100], [10, 10, 105, 100])
    inside = in_scores(boxes)
    assert inside[0, 1] == pytest.approx(1.0)  # dog fully inside the basket
    assert inside[1, 0] == 0.0
    # 81% inside, but the "container" is not twice as large: no relation.
    assert inside[2, 3] == 0.0
    # 85% inside a box 4x larger: holds with strength 0.85 (computed by hand).
    partial = B([0, 20, 20, 40], [3, 0, 43, 40])
    assert in_scores(partial)[0, 1] == pytest.approx(17 * 20 / 400)
    # Fully inside but high up (bottom edge in the top half): a part, not contents.
    assert in_scores(B([10, 0, 30, 19], [0, 0, 40, 40]))[0, 1] == 0.0
    assert in_scores(B([10, 1, 30, 20], [0, 0, 40, 40]))[0, 1] == 1.0


def test_next_to_is_symmetric_and_falls_off_with_the_gap():
    boxes = B([0, 0, 100, 100], [120, 10, 220, 110], [400, 0, 500, 100])
    nxt = next_to_scores(boxes)
    assert np.array_equal(nxt, nxt.T)
    # y overlap 90 of 100; gap 20 of the allowed 50.
    assert nxt[0, 1] == pytest.approx(0.9 * (1 - 0.5 * 20 / 50))
    assert nxt[0, 2] == 0.0  # 300 px away


def test_above_and_its_transpose():
    boxes = B([100, 0, 160, 40], [80, 60, 200, 160])  # a lamp 20 px above a table
    above = above_scores(boxes)
    assert above[0, 1] == pytest.approx(1.0 * (1 - 0.5 * 20 / 100))
    assert above[1, 0] == 0.0
    assert relation_matrices(boxes)["below"][1, 0] == above[0, 1]


def test_precedence_gives_one_relation_per_pair_on_before_above():
    boxes = B([120, 70, 150, 102], TABLE)
    assert above_scores(boxes)[0, 1] > 0  # "above" also holds geometrically...
    rels = pair_relations(boxes, ["cup", "table"])
    assert [(r.kind, r.other) for r in rels[0]] == [("on", 1)]  # ...but "on" wins
    assert [(r.kind, r.other) for r in rels[1]] == [("has_on", 0)]


def test_relations_do_not_depend_on_object_order():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 300, (12, 2))
    wh = rng.uniform(10, 120, (12, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    labels = [f"thing{k % 4}" for k in range(12)]
    rels = pair_relations(boxes, labels)
    assert sum(len(r) for r in rels) > 0
    perm = rng.permutation(12)
    rels_p = pair_relations(boxes[perm], [labels[k] for k in perm])
    for new_i, old_i in enumerate(perm):
        got = [(r.kind, int(perm[r.other]), r.score) for r in rels_p[new_i]]
        assert got == [(r.kind, r.other, r.score) for r in rels[old_i]]


def test_phrases_cover_every_kind():
    assert relation_phrase("on", "a table") == "on a table"
    assert relation_phrase("has_in", "a dog") == "with a dog"
    assert {k for k, _ in PRECEDENCE} == set(relation_matrices(B(TABLE)))


def test_degenerate_boxes_relate_to_nothing():
    boxes = B([10, 10, 10, 50], TABLE, [60, 120, 60, 120])
    for scores in relation_matrices(boxes).values():
        assert np.isfinite(scores).all()
    assert pair_relations(boxes, ["a", "b", "c"])[0] == []
