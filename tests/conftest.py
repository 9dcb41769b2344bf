"""Shared helpers for the background task engine tests.

Every engine a test creates is shut down at teardown, and every blocker a
test creates is released first, so a failing test never leaves a worker
thread stuck behind it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from catzilla.background_tasks import BackgroundTasks

# Generous upper bound for any condition a test waits for.
DEADLINE = 10.0


def wait_until(
    cond: Callable[[], Any], timeout: float = DEADLINE, interval: float = 0.005, what: str = ""
) -> Any:
    """Polls ``cond`` until it returns a truthy value, which is returned.

    Fails the test if ``timeout`` seconds pass first. This is the only way the
    tests wait for the engine: never a fixed sleep.
    """
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= end:
            pytest.fail(f"timed out after {timeout} s waiting for {what or cond}")
        time.sleep(interval)


def wait_for_time(seconds: float) -> None:
    """Lets ``seconds`` of wall-clock time pass, for behaviour that depends on
    elapsed time itself (ageing, TTLs), not as synchronisation."""
    end = time.monotonic() + seconds
    wait_until(lambda: time.monotonic() >= end, timeout=seconds + DEADLINE)


class Blocker:
    """A task body that holds its worker until released.

    ``started`` is set when a worker runs it. It gives up (raising) after
    ``limit`` seconds so that a broken test can never hang the session.
    """

    def __init__(self, limit: float = DEADLINE) -> None:
        self.started = threading.Event()
        self.released = threading.Event()
        self.limit = limit
        self.calls = 0

    def __call__(self, value: Any = None) -> Any:
        self.calls += 1
        self.started.set()
        if not self.released.wait(self.limit):
            raise RuntimeError("blocker was never released")
        return value

    def wait_started(self, timeout: float = DEADLINE) -> None:
        assert self.started.wait(timeout), "the blocking task never started"

    def release(self) -> None:
        self.released.set()


class Recorder:
    """A thread-safe list of what tasks did, in order."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._lock = threading.Lock()

    def append(self, item: Any) -> Any:
        with self._lock:
            self.items.append(item)
        return item

    def snapshot(self) -> list[Any]:
        with self._lock:
            return list(self.items)

    def __len__(self) -> int:
        with self._lock:
            return len(self.items)


@pytest.fixture
def _blockers() -> Iterator[list[Blocker]]:
    blockers: list[Blocker] = []
    yield blockers
    for b in blockers:
        b.release()


@pytest.fixture
def make_blocker(_blockers: list[Blocker]) -> Callable[..., Blocker]:
    """Creates blockers that are released at teardown."""

    def make(limit: float = DEADLINE) -> Blocker:
        b = Blocker(limit)
        _blockers.append(b)
        return b

    return make


@pytest.fixture
def blocker(make_blocker: Callable[..., Blocker]) -> Blocker:
    return make_blocker()


@pytest.fixture
def make_engine(_blockers: list[Blocker]) -> Iterator[Callable[..., BackgroundTasks]]:
    """Creates engines (small retry backoff by default) and shuts every one
    down at teardown, after releasing the test's blockers."""
    engines: list[BackgroundTasks] = []

    def make(**options: Any) -> BackgroundTasks:
        options.setdefault("retry_backoff_ms", 1)
        options.setdefault("retry_backoff_cap_ms", 5)
        engine = BackgroundTasks(**options)
        engines.append(engine)
        return engine

    yield make
    for b in _blockers:
        b.release()
    for engine in engines:
        engine.shutdown(wait_for_completion=False, timeout=1)


@pytest.fixture
def engine(make_engine: Callable[..., BackgroundTasks]) -> BackgroundTasks:
    """A general-purpose engine with a few workers."""
    return make_engine(workers=4)


@pytest.fixture
def single(make_engine: Callable[..., BackgroundTasks]) -> BackgroundTasks:
    """One worker, never more: tasks run strictly one at a time, in queue order."""
    return make_engine(workers=1, max_workers=1, enable_auto_scaling=False)
