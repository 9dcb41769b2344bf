"""What recovery needs from Python: finding a stored task's function again
by its import name. The native core does the rest in one call."""

from __future__ import annotations

import importlib
import sys
from typing import Any


def resolve(name: str) -> Any:
    """The object at import name ``module.qualname`` (longest module first)."""
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            module = (
                sys.modules["__main__"]
                if module_name == "__main__"
                else importlib.import_module(module_name)
            )
        except ImportError:
            continue
        obj: Any = module
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        return obj
    raise LookupError(f"cannot import {name!r}")
