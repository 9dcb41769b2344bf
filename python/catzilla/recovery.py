"""Finding a stored task's function again by its import name, in any
process on the shared store."""

from __future__ import annotations

import importlib
import sys
from typing import Any

#: Modules that stand for ``__main__``: a task a script (``python app.py``)
#: queued is stored as ``__main__.fn``; a worker that imported the script as
#: module ``app`` finds it there.
_main_aliases: list[str] = []


def register_main_alias(module_name: str) -> None:
    """Lets import names under ``__main__`` resolve in ``module_name`` too
    (the worker command registers the app module it imported)."""
    if module_name not in _main_aliases:
        _main_aliases.append(module_name)


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
    if parts[0] == "__main__" and len(parts) > 1:
        for alias in _main_aliases:
            try:
                return resolve(".".join([alias, *parts[1:]]))
            except LookupError:
                continue
    raise LookupError(f"cannot import {name!r}")
