"""Fixtures for the tests; the plain helpers they use live in ``helpers.py``.

Every engine a test creates is shut down at teardown, and every blocker a
test creates is released first, so a failing test never leaves a worker
thread stuck behind it. Every subprocess ``spawn`` starts is killed at
teardown if it is still running.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from catzilla import Catzilla
from catzilla.background_tasks import BackgroundTasks
from helpers import DEADLINE, Blocker, Client, ServerProcess, free_port, wait_until


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


@pytest.fixture
def spawn() -> Iterator[Callable[..., ServerProcess]]:
    """Starts subprocesses (``ServerProcess``); every one still running at
    teardown is killed."""
    procs: list[ServerProcess] = []

    def start(args: list[str], cwd: str | None = None) -> ServerProcess:
        p = ServerProcess(args, cwd)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.close()


@pytest.fixture
def serve_app(_blockers: list[Blocker]) -> Iterator[Callable[[Catzilla], Client]]:
    """Serves apps in this process (``listen`` on a thread, on a free port of
    127.0.0.1), as test_http.py's in-process tests do, and returns a
    ``Client`` once the port answers. At teardown every app is stopped (after
    releasing the test's blockers) and its ``listen`` must return, which also
    shuts its task engine down."""
    served: list[tuple[Catzilla, threading.Thread]] = []

    def serve(app: Catzilla) -> Client:
        port = free_port()
        t = threading.Thread(target=app.listen, kwargs={"port": port}, daemon=True)
        t.start()
        served.append((app, t))

        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=DEADLINE).close()
            except OSError:
                assert t.is_alive(), "listen ended before serving"
                return False
            return app._server is not None  # so that app.stop() reaches it

        wait_until(up, what="the in-process server")
        return Client("127.0.0.1", port)

    yield serve
    for b in _blockers:
        b.release()
    for app, t in served:
        app.stop()
        t.join(DEADLINE)
        if app.tasks is not None and not app.tasks.is_shutdown:
            app.tasks.shutdown(wait_for_completion=False, timeout=1)
    assert not any(t.is_alive() for _, t in served), "listen did not return after app.stop()"
