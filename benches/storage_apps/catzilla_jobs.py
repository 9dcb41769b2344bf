"""The task function of benches/bench_storage.py, importable as durable tasks must be."""

from __future__ import annotations


def noop() -> None:
    return None
