"""Helpers the test modules share: one HTTP client, one subprocess runner.

Fixtures live in ``conftest.py``; plain functions and classes live here and
are imported by name.
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

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
    through a proxy, whatever the environment says."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=HTTP_TIMEOUT)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        conn: http.client.HTTPConnection | None = None,
        **kwargs: Any,
    ) -> Reply:
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


def run_python(
    code: str, *args: str, timeout: float = 60.0, cwd: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` in a fresh interpreter and returns what it did. A process
    still running after ``timeout`` seconds is killed, with every process it
    started (its own session), and fails the test as a hang, with what it
    printed so far."""
    argv = [sys.executable, "-c", textwrap.dedent(code), *args]
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
            pytest.fail(f"hung: still running after {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
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
