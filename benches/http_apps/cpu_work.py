"""The pure-Python work behind GET /cpu in every app of benches/bench_processes.py.

One function, imported by each app, so that every server runs the very same
work: a loop over a fixed range (``ITERATIONS``) that holds the GIL throughout,
sized to about 200 us on the 2-core machine the bench was written on, with the
Python 3.11 that makes its venvs. It imports nothing but the standard library,
so every venv can import it from this directory, and the bench can time it.
"""

from __future__ import annotations

ITERATIONS = 3_600


def cpu_work(iterations: int = ITERATIONS) -> int:
    """A checksum of ``range(iterations)``: about 200 us of bytecode, GIL held."""
    total = 0
    for i in range(iterations):
        total = (total + i * i) % 1_000_003
    return total
