"""Name -> builder lookup shared by the masker and captioner choices.

A name is either a key of the plain dict (`grabcut`, `sam`, ...) or, to bring your own model without
editing this package, an import path `package.module:builder` whose builder takes the config and
returns the callable (it must be importable on every Ray worker).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def resolve(registry: dict[str, Callable], name: str, kind: str) -> Callable[[Any], Any]:
    """The builder for `name`, or ValueError listing the valid choices."""
    if name in registry:
        return registry[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import {kind} builder {name!r}: {exc}") from exc
    raise ValueError(
        f"unknown {kind} {name!r}; choose one of: {', '.join(registry)} "
        "(or give an import path module:builder)"
    )
