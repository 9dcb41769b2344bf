"""Shared helpers for the background task engine tests.

Every engine a test creates is shut down at teardown, and every blocker a
test creates is released first, so a failing test never leaves a worker
thread stuck behind it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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


# Subprocess servers (the HTTP tests and the documentation examples)

SERVING = "catzilla serving on"


class ServerProcess:
    """A Python program run as a subprocess, its stdout and stderr read line by
    line on background threads so that tests can wait for, and later assert,
    what it printed. ``close`` kills it if it is still running."""

    def __init__(self, args: list[str], cwd: str | None = None) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for t in self._readers:
            t.start()

    def _read(self, stream: Any, into: list[str]) -> None:
        for line in stream:
            with self._cond:
                into.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        """Everything printed so far, stdout then stderr."""
        with self._cond:
            return "\n".join(self.stdout) + "\n--- stderr ---\n" + "\n".join(self.stderr)

    def lines(self) -> list[str]:
        with self._cond:
            return list(self.stdout)

    def _finished_reading(self) -> bool:
        return self.proc.poll() is not None and not any(t.is_alive() for t in self._readers)

    def wait_for(
        self, text: str, timeout: float = DEADLINE, stream: str = "stdout", count: int = 1
    ) -> str:
        """Waits until ``count`` lines of ``stream`` contain ``text``; returns the
        last of them. Fails at the deadline or when the process ended first."""
        lines = self.stdout if stream == "stdout" else self.stderr
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [line for line in lines if text in line]
                if len(found) >= count:
                    return found[count - 1]
                left = end - time.monotonic()
                if left <= 0 or self._finished_reading():
                    break
                self._cond.wait(min(left, 0.1))
        state = "timed out" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        pytest.fail(
            f"{state} after waiting for {count} x {text!r} on {stream} of {self.args}:\n"
            f"{self.output()}"
        )

    def wait_serving(self, timeout: float = 30.0) -> tuple[str, int]:
        """Waits for the ``catzilla serving on http://HOST:PORT`` line."""
        line = self.wait_for(SERVING, timeout)
        host, _, port = line.split(SERVING, 1)[1].strip().removeprefix("http://").rpartition(":")
        return host, int(port)

    def stop(self, sig: int = signal.SIGINT, timeout: float = DEADLINE) -> int:
        """Sends ``sig`` and waits for the exit; returns the exit code. Fails
        (after killing it) if the process outlives ``timeout``."""
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            pytest.fail(
                f"{self.args} still running {timeout} s after signal {sig}:\n{self.output()}"
            )
        self.join_readers()
        return code

    def join_readers(self) -> None:
        for t in self._readers:
            t.join(5)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.join_readers()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def spawn() -> Iterator[Callable[..., ServerProcess]]:
    """Starts subprocesses; every one still running at teardown is killed."""
    procs: list[ServerProcess] = []

    def start(args: list[str], cwd: str | None = None) -> ServerProcess:
        p = ServerProcess(args, cwd)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.close()
