"""The box masker, slowed down, for interruption tests: a unit takes long enough (0.4 s per image)
that a signal can arrive mid-run. Importable by Ray workers as `tests.helpers.slow_box:build`."""

from __future__ import annotations

import os
import time

from pipelines.maskers.box import BoxMasker


class SlowBox(BoxMasker):
    def __call__(self, image, boxes):
        time.sleep(0.4)
        return super().__call__(image, boxes)


def build(cfg) -> SlowBox:
    return SlowBox()


def build_slowly(cfg) -> SlowBox:
    """A masker whose loading takes 3 s, as a model checkpoint's would; each build appends its
    process id to the file named by MQENGINE_BUILD_LOG."""
    with open(os.environ["MQENGINE_BUILD_LOG"], "a") as log:
        log.write(f"{os.getpid()}\n")
    time.sleep(3)
    return SlowBox()
