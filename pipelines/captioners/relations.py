"""Spatial relations between the boxes of one image, from geometry alone.

All boxes are (N, 4) float XYXY in absolute pixels, y growing downwards. Each relation is an (N, N)
score matrix S where S[i, j] > 0 means "object i <relation> object j" holds, with a strength in
(0, 1]; the diagonal is 0. Only relations a box can justify are produced:

  on       i's bottom edge lies near the top of j (from 10% of i's height above j's top to 35% of
           j's height below it), i's centre is in j's top quarter, and at least half of i's width
           is over j: "a cup on a table". Strength: horizontal overlap fraction x (1 - 0.5 x
           normalised gap).
  in       at least 80% of i's box lies inside j's box, j is at least twice as large, and i's bottom
           edge is in j's lower half (what is in a container rests on its floor; a box high
           inside another, an eye in a face's box, is more likely a part): "a dog in a basket".
           Strength: the contained fraction.
  next to  vertical extents overlap by half of the shorter one, heights within a factor 2, and the
           boxes are side by side (horizontal overlap at most 30% of the narrower width, gap at most
           half of it). Strength: vertical overlap fraction x (1 - 0.5 x normalised gap).
  above    half of the narrower width overlaps horizontally and i ends above j (overlap at most 10%
           of the shorter height, gap at most the taller height). Strength as for "next to".

Captions read them from one object's side, including the inverses ("a table with a cup on it",
"a basket with a dog", "a table below a lamp"); per pair only the first relation in PRECEDENCE that
holds is used, so a cup on a table is not also "above" it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EPS = 1e-9


def _parts(boxes: np.ndarray) -> tuple[np.ndarray, ...]:
    """Columns x0, y0, x1, y1, width, height as (N,) arrays (a degenerate box gets width 0)."""
    x0, y0, x1, y1 = (boxes[:, k].astype(np.float64) for k in range(4))
    return x0, y0, x1, y1, np.maximum(x1 - x0, 0.0), np.maximum(y1 - y0, 0.0)


def _overlap(a0: np.ndarray, a1: np.ndarray, b0: np.ndarray, b1: np.ndarray) -> np.ndarray:
    """(N, N) length of the overlap of intervals [a0_i, a1_i] and [b0_j, b1_j] (0 when disjoint)."""
    return np.maximum(np.minimum(a1[:, None], b1[None]) - np.maximum(a0[:, None], b0[None]), 0.0)


def _no_diagonal(scores: np.ndarray) -> np.ndarray:
    np.fill_diagonal(scores, 0.0)
    return scores


def on_scores(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) XYXY -> (N, N): S[i, j] > 0 when box i rests on the top part of box j."""
    x0, y0, x1, y1, w, h = _parts(boxes)
    x_frac = _overlap(x0, x1, x0, x1) / np.maximum(w[:, None], _EPS)
    gap = y1[:, None] - y0[None]  # i's bottom minus j's top; > 0 means i's bottom is inside j
    above_tol, below_tol = 0.1 * h[:, None], 0.35 * h[None]
    centre_high = (y0 + y1)[:, None] / 2 <= y0[None] + 0.25 * h[None]
    valid = (x_frac >= 0.5) & (gap >= -above_tol) & (gap <= below_tol) & centre_high
    norm_gap = np.where(
        gap >= 0, gap / np.maximum(below_tol, _EPS), -gap / np.maximum(above_tol, _EPS)
    )
    return _no_diagonal(np.where(valid, np.minimum(x_frac, 1.0) * (1 - 0.5 * norm_gap), 0.0))


def in_scores(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) XYXY -> (N, N): S[i, j] > 0 when box i lies mostly inside the larger box j."""
    x0, y0, x1, y1, w, h = _parts(boxes)
    area = w * h
    inside = _overlap(x0, x1, x0, x1) * _overlap(y0, y1, y0, y1) / np.maximum(area[:, None], _EPS)
    low = y1[:, None] >= y0[None] + 0.5 * h[None]
    valid = (inside >= 0.8) & (area[None] >= 2 * area[:, None]) & (area[:, None] > 0) & low
    return _no_diagonal(np.where(valid, np.minimum(inside, 1.0), 0.0))


def next_to_scores(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) XYXY -> (N, N) symmetric: S[i, j] > 0 when boxes i and j stand side by side."""
    x0, y0, x1, y1, w, h = _parts(boxes)
    min_h = np.minimum(h[:, None], h[None])
    min_w = np.minimum(w[:, None], w[None])
    y_frac = _overlap(y0, y1, y0, y1) / np.maximum(min_h, _EPS)
    similar_h = min_h >= 0.5 * np.maximum(h[:, None], h[None])
    x_gap = np.maximum(x0[None] - x1[:, None], x0[:, None] - x1[None])  # < 0: they overlap
    valid = (y_frac >= 0.5) & similar_h & (x_gap >= -0.3 * min_w) & (x_gap <= 0.5 * min_w)
    norm_gap = np.maximum(x_gap, 0.0) / np.maximum(0.5 * min_w, _EPS)
    return _no_diagonal(np.where(valid, np.minimum(y_frac, 1.0) * (1 - 0.5 * norm_gap), 0.0))


def above_scores(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) XYXY -> (N, N): S[i, j] > 0 when box i is just above box j (S.T is "below")."""
    x0, y0, x1, y1, w, h = _parts(boxes)
    min_w = np.minimum(w[:, None], w[None])
    x_frac = _overlap(x0, x1, x0, x1) / np.maximum(min_w, _EPS)
    y_gap = y0[None] - y1[:, None]  # j's top minus i's bottom; < 0 means they overlap a little
    min_h, max_h = np.minimum(h[:, None], h[None]), np.maximum(h[:, None], h[None])
    valid = (x_frac >= 0.5) & (y_gap >= -0.1 * min_h) & (y_gap <= max_h) & (max_h > 0)
    norm_gap = np.maximum(y_gap, 0.0) / np.maximum(max_h, _EPS)
    return _no_diagonal(np.where(valid, np.minimum(x_frac, 1.0) * (1 - 0.5 * norm_gap), 0.0))


# Relation kinds from the subject's side, in order of precedence, with the phrase that follows the
# subject; "{other}" is the partner's noun phrase ("a table"). The inverses read the matrices
# transposed: "i with j on it" is "j on i".
PRECEDENCE: tuple[tuple[str, str], ...] = (
    ("on", "on {other}"),
    ("in", "in {other}"),
    ("has_on", "with {other} on it"),
    ("has_in", "with {other}"),  # "a basket with a dog"
    ("next_to", "next to {other}"),
    ("above", "above {other}"),
    ("below", "below {other}"),
)


@dataclass(frozen=True)
class Relation:
    """Object `subject` stands in relation `kind` (a PRECEDENCE key) to `other`, with `score`."""

    subject: int
    kind: str
    other: int
    score: float


def relation_matrices(boxes: np.ndarray) -> dict[str, np.ndarray]:
    """(N, 4) XYXY -> {kind: (N, N) score matrix} for every kind in PRECEDENCE."""
    on, inside, above = on_scores(boxes), in_scores(boxes), above_scores(boxes)
    return {
        "on": on,
        "in": inside,
        "has_on": on.T,
        "has_in": inside.T,
        "next_to": next_to_scores(boxes),
        "above": above,
        "below": above.T,
    }


def pair_relations(boxes: np.ndarray, labels: list[str]) -> list[list[Relation]]:
    """(N, 4) XYXY boxes and N labels -> for each box, its relations to the others, strongest first.

    One relation per (subject, other) pair: the first kind in PRECEDENCE that holds. Score ties are
    broken by the partner's area (larger, i.e. more salient, first), then its box coordinates and
    label, never by its index, so a box's relations do not depend on the order of the objects.
    """
    n = len(boxes)
    mats = relation_matrices(boxes)
    stacked = np.stack([mats[kind] for kind, _ in PRECEDENCE])  # (K, N, N)
    holds = stacked > 0
    first = np.argmax(holds, axis=0)  # (N, N) index of the first kind that holds
    any_holds = holds.any(axis=0)
    _, _, _, _, w, h = _parts(boxes)
    out: list[list[Relation]] = []
    for i in range(n):
        rels = [
            Relation(i, PRECEDENCE[first[i, j]][0], j, float(stacked[first[i, j], i, j]))
            for j in np.flatnonzero(any_holds[i])
        ]
        rels.sort(
            key=lambda r: (
                -r.score,
                -w[r.other] * h[r.other],
                *boxes[r.other].tolist(),
                labels[r.other],
            )
        )
        out.append(rels)
    return out


def relation_phrase(kind: str, other_phrase: str) -> str:
    """('on', 'a table') -> 'on a table'."""
    return dict(PRECEDENCE)[kind].format(other=other_phrase)
