"""The task functions of benches/bench_scaleout.py (no catzilla import, so the
bench can time ``spin`` in its own process)."""

from __future__ import annotations

import os
import time


def spin(iterations: int) -> int:
    """Pure-Python work that holds the GIL throughout; names the process that did it."""
    total = 0
    for i in range(iterations):
        total = (total + i * i) % 1_000_003
    return os.getpid() if total >= 0 else -1


def whoami(seconds: float) -> int:
    """Takes ``seconds``, then names the worker process that ran it."""
    time.sleep(seconds)
    return os.getpid()
