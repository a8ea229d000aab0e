"""The box masker, slowed down, for interruption tests: a unit takes long enough (0.4 s per image)
that a signal can arrive mid-run. Importable by Ray workers as `tests.helpers.slow_box:build`."""

from __future__ import annotations

import time

from pipelines.maskers.box import BoxMasker


class SlowBox(BoxMasker):
    def __call__(self, image, boxes):
        time.sleep(0.4)
        return super().__call__(image, boxes)


def build(cfg) -> SlowBox:
    return SlowBox()


def build_slowly(cfg) -> SlowBox:
    """A masker whose loading takes 3 s, as a model checkpoint's would."""
    time.sleep(3)
    return SlowBox()
