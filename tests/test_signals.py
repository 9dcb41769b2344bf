"""SIGINT and SIGTERM stop a serving app gracefully every time, whatever
handler the program installed: one that returns, one that calls
``sys.exit``, one that raises, or ``SIG_IGN``."""

from __future__ import annotations

import signal
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import DEADLINE, Client, ServerProcess, wait_for_time, wait_until

APP = textwrap.dedent(
    """
    import os, signal, sys, time
    from catzilla import Catzilla

    mode, release = sys.argv[1], sys.argv[2]
    app = Catzilla()
    app.enable_background_tasks(workers=1)

    def slow(name):
        print(f"task {name} started", flush=True)
        time.sleep(0.3)
        print(f"task {name} completed", flush=True)

    @app.get("/ping")
    def ping(request):
        return {"pid": os.getpid()}

    @app.post("/work")
    def work(request):
        for name in ("a", "b"):
            app.add_task(slow, name)
        return {"queued": 2}

    def handler(signum, frame):
        print(f"handler ran for {signal.Signals(signum).name}", flush=True)
        if mode == "exit":
            # The doc's pattern: wait a while, then exit. The test releases the
            # wait once it has seen the server answer meanwhile.
            end = time.monotonic() + 30
            while not os.path.exists(release) and time.monotonic() < end:
                time.sleep(0.01)
            print("handler exiting", flush=True)
            sys.exit(0)
        if mode == "raise":
            raise RuntimeError("the handler broke")

    if mode in ("returns", "exit", "raise"):
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
    elif mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        app.listen(port=0)
    except SystemExit as exc:
        print(f"listen raised SystemExit({exc.code})", flush=True)
        raise
    print("listen returned", flush=True)
    """
)


STOP_SIGNALS = [
    pytest.param(signal.SIGINT, id="SIGINT"),
    pytest.param(signal.SIGTERM, id="SIGTERM"),
]


@pytest.fixture
def start(spawn: Callable[..., ServerProcess], tmp_path: Path) -> Callable[[str], tuple]:
    script = tmp_path / "app.py"
    script.write_text(APP)
    release = tmp_path / "release"

    def run(mode: str) -> tuple[ServerProcess, Client, Path]:
        p = spawn([str(script), mode, str(release)])
        host, port = p.wait_serving()
        return p, Client(host, port), release

    return run


def finish(p: ServerProcess) -> int:
    return p.wait_exit(DEADLINE * 2, "a stop signal")


def assert_drained(p: ServerProcess) -> None:
    out = "\n".join(p.lines())
    for name in ("a", "b"):
        assert f"task {name} completed" in out, f"task {name} was lost:\n{p.output()}"


@pytest.mark.parametrize("sig", STOP_SIGNALS)
def test_without_a_handler_the_signal_stops_the_server(start, sig: int):
    p, client, _ = start("none")
    assert client.post("/work").status == 200
    p.proc.send_signal(sig)
    assert finish(p) == 0, p.output()
    assert_drained(p)
    assert "listen returned" in p.output()


@pytest.mark.parametrize("sig", STOP_SIGNALS)
def test_a_handler_that_returns_runs_then_the_server_stops(start, sig: int):
    p, client, _ = start("returns")
    assert client.post("/work").status == 200
    p.proc.send_signal(sig)
    assert finish(p) == 0, p.output()
    out = p.output()
    assert f"handler ran for {signal.Signals(sig).name}" in out
    assert out.index("handler ran") < out.index("listen returned")
    assert_drained(p)
    assert "Traceback" not in out


@pytest.mark.parametrize("sig", STOP_SIGNALS)
def test_a_handler_that_exits_keeps_serving_while_it_waits_then_stops(start, sig: int):
    p, client, release = start("exit")
    assert client.post("/work").status == 200
    p.proc.send_signal(sig)
    p.wait_for("handler ran")
    # The handler is still waiting: the server answers meanwhile.
    assert client.get("/ping").json() == {"pid": p.pid}
    release.touch()
    assert finish(p) == 0, p.output()
    out = p.output()
    assert "handler exiting" in out
    assert "listen raised SystemExit(0)" in out
    assert "listen returned" not in out
    assert_drained(p)


@pytest.mark.parametrize("sig", STOP_SIGNALS)
def test_a_handler_that_raises_is_logged_and_the_stop_proceeds(start, sig: int):
    p, client, _ = start("raise")
    assert client.post("/work").status == 200
    p.proc.send_signal(sig)
    assert finish(p) == 0, p.output()
    wait_until(lambda: "the handler broke" in p.output(), what="the logged error")
    out = p.output()
    assert f"handler for {signal.Signals(sig).name} raised" in out
    assert "RuntimeError: the handler broke" in out  # with its traceback
    assert "listen returned" in out
    assert_drained(p)


def test_an_ignored_signal_stays_ignored(start):
    p, client, _ = start("ignore-term")
    p.proc.send_signal(signal.SIGTERM)
    # A handled SIGTERM stops the server within one 50 ms signal check; a
    # second on, it is still serving.
    wait_for_time(1.0)
    assert p.proc.poll() is None, p.output()
    assert client.get("/ping").status == 200
    p.proc.send_signal(signal.SIGINT)  # not ignored: stops as usual
    assert finish(p) == 0, p.output()
    assert "listen returned" in p.output()
