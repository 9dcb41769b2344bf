"""Helpers the test modules share: waiting for a condition, task bodies that
block or record, subprocess servers, one HTTP client and one subprocess
runner.

Fixtures live in ``conftest.py``; plain functions, classes and constants live
here and are imported by name (``from helpers import ...``).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

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


# Task bodies


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
        where = line.split(SERVING, 1)[1].split()[0]  # a supervisor adds "with N process(es)"
        host, _, port = where.removeprefix("http://").rpartition(":")
        return host, int(port)

    def stop(self, sig: int = signal.SIGINT, timeout: float = DEADLINE) -> int:
        """Sends ``sig`` and waits for the exit; returns the exit code. Fails
        (after killing it) if the process outlives ``timeout``."""
        self.proc.send_signal(sig)
        return self.wait_exit(timeout, f"signal {sig}")

    def wait_exit(self, timeout: float = DEADLINE, after: str = "") -> int:
        """Waits for the exit (of a process already told to stop, ``after``
        saying how) and for everything it printed; returns the exit code.
        Fails (after killing it) if the process outlives ``timeout``."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            pytest.fail(
                f"{self.args} still running {timeout} s after {after or 'the wait began'}:\n"
                f"{self.output()}"
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


# HTTP

# Generous upper bound for one HTTP exchange.
HTTP_TIMEOUT = 30.0


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type") == "application/json", self.headers
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


class Client:
    """A plain HTTP/1.1 client for a server on this machine; it never goes
    through a proxy, whatever the environment says (``http_proxy`` & co.).

    Every status comes back as a ``Reply`` (a 404 is not an exception). A
    request without ``conn`` has a connection of its own, closed after it."""

    def __init__(self, host: str, port: int, timeout: float = HTTP_TIMEOUT) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        conn: http.client.HTTPConnection | None = None,
        **kwargs: Any,
    ) -> Reply:
        """One exchange. A POST, PUT or PATCH without ``body`` is sent with
        ``Content-Length: 0``, as ``curl -X POST URL`` sends it."""
        own = conn is None
        c = conn or self.connection()
        try:
            c.request(method, path, body=body, headers=headers or {}, **kwargs)
            r = c.getresponse()
            return Reply(r.status, r.headers, r.read())
        finally:
            if own:
                c.close()

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: bytes | str | None = None, **kwargs: Any) -> Reply:
        return self.request("POST", path, body=body, **kwargs)


# Programs that run to their end


def run_python(
    source: str | Path,
    *args: str,
    timeout: float = 60.0,
    cwd: str | None = None,
    what: str = "",
) -> subprocess.CompletedProcess[str]:
    """Runs ``source`` in a fresh interpreter with ``args`` and returns what it
    did: ``source`` is code (a ``str``, dedented) or a script (a ``Path``).

    A process still running after ``timeout`` seconds is killed, with every
    process it started (its own session), and fails the test as a hang, with
    ``what`` it was and what it printed so far. If the test is interrupted
    while it waits (Ctrl-C, the suite's per-test timeout), the process and
    its session are killed too, never left behind."""
    program = [str(source)] if isinstance(source, Path) else ["-c", textwrap.dedent(source)]
    argv = [sys.executable, *program, *args]
    with subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(
                f"{what or 'the process'} hung: still running after {timeout} s\n"
                f"stdout:\n{out}\nstderr:\n{err}"
            )
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def panic_probe() -> Callable[[str], None]:
    """``_panic_probe(message)``: a Rust panic on demand. It exists only in
    builds with the ``test-hooks`` cargo feature, as the README's test command
    makes (``MATURIN_PEP517_ARGS="--features test-hooks"``)."""
    try:
        from catzilla._catzilla import _panic_probe  # type: ignore[attr-defined]
    except ImportError:
        pytest.fail(
            "catzilla was built without the test-hooks feature; build it as the "
            "README's test command does: MATURIN_PEP517_ARGS='--features test-hooks' "
            "pip install '.[test]' (or maturin develop --features test-hooks)"
        )
    probe: Callable[[str], None] = _panic_probe
    return probe


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """A real ``redis-server`` (the Debian package) on 127.0.0.1 at a free
    port, its data in ``directory``; ``restart`` stops it (saving, with
    ``appendonly``) and starts it again on the same port and data."""

    def __init__(self, directory: Path, appendonly: bool = False) -> None:
        self.directory = directory
        self.appendonly = appendonly
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--dir", str(self.directory), "--save", ""]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.answers, what=f"redis-server on port {self.port}")

    def answers(self) -> bool:
        try:
            return self.command("PING") == "+PONG"
        except OSError:
            return False

    def command(self, *words: str) -> str:
        """Sends one command; returns the first line of the reply."""
        import socket

        with socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE) as s:
            parts = [f"*{len(words)}\r\n"] + [f"${len(w.encode())}\r\n{w}\r\n" for w in words]
            s.sendall("".join(parts).encode())
            return s.makefile("rb").readline().decode().rstrip("\r\n")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # saves the append-only file, then exits
            self.proc.wait(DEADLINE)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")
