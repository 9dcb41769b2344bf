"""``catzilla run``: serves an app as ``listen`` would, in one process or in
several under a supervisor that spreads connections over them, restarts one
that dies, drains them all on SIGTERM, replaces them one by one on SIGHUP
without a failed request, and restarts them on a source change with
``--reload``. Mistakes in the target or a port in use: one line, exit code 1."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from catzilla import Catzilla
from catzilla.cli import main
from helpers import DEADLINE, Client, ServerProcess, alive, run_python, wait_until

REPO = Path(__file__).resolve().parent.parent
CLI = "from catzilla.cli import main; raise SystemExit(main())"

# An app that says which process answered, and can be held mid-request.
PIDS_APP = textwrap.dedent(
    """
    import os, time
    from pathlib import Path
    from catzilla import Catzilla, Request

    app = Catzilla()
    app.enable_background_tasks(workers=1)

    def write_done(name):
        time.sleep(0.3)
        Path(name).write_text(str(os.getpid()))

    @app.get("/pid")
    def pid(request: Request):
        return {"pid": os.getpid(), "client": request.client}

    @app.get("/hold")
    def hold(request: Request):
        print(f"holding in {os.getpid()}", flush=True)
        end = time.monotonic() + 30
        while not Path("release").exists() and time.monotonic() < end:
            time.sleep(0.01)
        return {"pid": os.getpid(), "held": True}

    @app.post("/task/{name}")
    def task(request: Request, name: str):
        app.add_task(write_done, f"done-{name}")
        return {"pid": os.getpid()}
    """
)


def start(
    spawn: Callable[..., ServerProcess], cwd: Path, *args: str
) -> tuple[ServerProcess, Client]:
    server = spawn(["-m", "catzilla", "run", *args], cwd=str(cwd))
    host, port = server.wait_serving()
    return server, Client(host, port)


def pid_of(client: Client) -> int:
    reply = client.get("/pid")
    assert reply.status == 200, reply
    return int(reply.json()["pid"])


def pids_seen(client: Client, want: int, what: str) -> set[int]:
    """Pids answering fresh connections, until ``want`` different ones are seen."""
    seen: set[int] = set()

    def enough() -> bool:
        seen.add(pid_of(client))
        return len(seen) >= want

    wait_until(enough, what=what)
    return seen


def cli(cwd: Path, *args: str) -> tuple[int, str, str]:
    r = run_python(CLI, "run", *args, cwd=str(cwd), what=f"catzilla run {' '.join(args)}")
    return r.returncode, r.stdout, r.stderr


# One process


def test_run_serves_an_example_app_like_listen(spawn):
    server, client = start(spawn, REPO / "examples", "newsletter_app:app", "--port", "0")
    reply = client.get("/hello/Ann")
    assert reply.status == 200, reply
    assert reply.header("server") == "catzilla"
    assert reply.header("date")
    reply = client.post("/subscribers", '{"email": "ann@example.com"}')
    assert reply.status in (200, 201, 202), reply
    task_id = reply.json()["task_id"]
    wait_until(
        lambda: client.get(f"/tasks/{task_id}").json()["status"] == "completed",
        what="the welcome e-mail task to complete",
    )
    assert server.stop(signal.SIGTERM) == 0, server.output()


def test_sighup_to_a_single_process_is_logged_and_ignored(spawn, tmp_path: Path):
    (tmp_path / "app.py").write_text(PIDS_APP)
    server, client = start(spawn, tmp_path, "app", "--port", "0")
    before = pid_of(client)
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for("SIGHUP ignored", stream="stderr")
    assert pid_of(client) == before
    assert server.stop(signal.SIGTERM) == 0, server.output()


def test_access_log_and_forwarded_clients(spawn, tmp_path: Path):
    (tmp_path / "app.py").write_text(PIDS_APP)
    server, client = start(
        spawn,
        tmp_path,
        "app",
        "--port",
        "0",
        "--access-log",
        "--forwarded-allow-ips",
        "127.0.0.1",
    )
    forged = {"X-Forwarded-For": "6.6.6.6, 203.0.113.7"}
    assert client.get("/pid", headers=forged).json()["client"] == ["203.0.113.7", 0]
    assert client.get("/pid?x=1").json()["client"][0] == "127.0.0.1"
    assert client.get("/nowhere").status == 404
    line = server.wait_for('"GET /nowhere HTTP/1.1" 404', stream="stderr")
    assert "catzilla.access" in line, line
    line = server.wait_for('"GET /pid?x=1 HTTP/1.1" 200', stream="stderr")
    assert re.search(r"127\.0\.0\.1:\d+ - \"GET /pid\?x=1 HTTP/1.1\" 200 \d+ [\d.]+ms$", line), line
    line = server.wait_for('"GET /pid HTTP/1.1" 200', stream="stderr")
    assert line.split(" - ")[0].endswith("203.0.113.7:0"), line
    assert server.stop(signal.SIGTERM) == 0, server.output()


def test_without_trusted_proxies_the_peer_is_the_client(spawn, tmp_path: Path):
    (tmp_path / "app.py").write_text(PIDS_APP)
    server, client = start(spawn, tmp_path, "app", "--port", "0")
    reply = client.get("/pid", headers={"X-Forwarded-For": "203.0.113.7"})
    assert reply.json()["client"][0] == "127.0.0.1"
    assert server.stop(signal.SIGTERM) == 0, server.output()
    assert not any("catzilla.access" in line for line in server.stderr), server.output()


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=DEADLINE)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(DEADLINE)
        self.sock.connect(self.unix_path)


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_unix_socket_is_served_and_removed(spawn, tmp_path: Path, processes: str):
    (tmp_path / "app.py").write_text(PIDS_APP)
    path = str(tmp_path / "app.sock")
    server = spawn(
        ["-m", "catzilla", "run", "app", "--uds", path, "--processes", processes],
        cwd=str(tmp_path),
    )
    line = server.wait_for("catzilla serving on")
    assert f"unix:{path}" in line, line
    conn = UnixConnection(path)
    conn.request("GET", "/pid")
    reply = conn.getresponse()
    assert reply.status == 200
    assert reply.getheader("server") == "catzilla"
    conn.close()
    assert server.stop(signal.SIGTERM) == 0, server.output()
    assert not os.path.exists(path)


# Mistakes: one line, exit code 1


@pytest.mark.parametrize("processes", ["1", "2"])
@pytest.mark.parametrize(
    "source, target, fragment",
    [
        (None, "a:b:c", "argument TARGET: must look like module:attr"),
        (None, "no_such_module:app", "cannot import module 'no_such_module'"),
        ("raise RuntimeError('no database')\n", "app", "raised RuntimeError: no database"),
        ("import no_such_dependency\n", "app", "No module named 'no_such_dependency'"),
        ("x = 1\n", "app:app", "has no attribute 'app'"),
        ("app = 42\n", "app", "is a int, not a Catzilla app"),
    ],
)
def test_a_bad_target_is_one_clear_line_and_exit_code_1(
    tmp_path: Path, source: str | None, target: str, fragment: str, processes: str
):
    if source is not None:
        (tmp_path / "app.py").write_text(source)
    code, out, err = cli(tmp_path, target, "--port", "0", "--processes", processes)
    assert code == 1, err
    # (Each of two processes may say it before the supervisor stops.)
    lines = [line for line in err.splitlines() if fragment in line]
    assert 1 <= len(lines) <= int(processes), err
    assert all(line.startswith("catzilla: error: ") for line in lines), err
    assert "catzilla serving on" not in out, out
    assert "Traceback" not in err, err


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_port_in_use_is_named(tmp_path: Path, processes: str):
    (tmp_path / "app.py").write_text(PIDS_APP)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code, _, err = cli(tmp_path, "app", "--port", str(port), "--processes", processes)
    assert code == 1, err
    assert f"catzilla: error: cannot listen on 127.0.0.1:{port}: Address already in use" in err
    assert "Traceback" not in err, err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["run"], "TARGET"),
        (["run", "app", "--port", "70000"], "argument --port"),
        (["run", "app", "--processes", "0"], "argument --processes"),
        (["run", "app", "--threads", "x"], "argument --threads"),
        (["run", "app", "--backlog", "0"], "argument --backlog"),
        (["run", "app", "--forwarded-allow-ips", "proxy.local"], "'proxy.local' is not an IP"),
    ],
)
def test_a_bad_option_is_a_usage_error(argv: list[str], fragment: str, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("catzilla: error: ") and fragment in err, err


# Several processes


def test_processes_share_the_port_and_a_dead_one_is_restarted(spawn, tmp_path: Path):
    (tmp_path / "app.py").write_text(PIDS_APP)
    server, client = start(spawn, tmp_path, "app", "--port", "0", "--processes", "2")
    first = pids_seen(client, 2, "both processes to answer")
    assert server.pid not in first
    victim, survivor = sorted(first)
    os.kill(victim, signal.SIGKILL)
    # The other one keeps answering while the dead one is replaced.
    wait_until(lambda: pid_of(client) == survivor, what="the survivor to answer")
    server.wait_for(f"server process {victim} was killed by SIGKILL", stream="stderr")
    later = pids_seen(client, 2, "a replacement to answer")
    assert survivor in later and victim not in later, later
    assert server.stop(signal.SIGTERM) == 0, server.output()
    assert not any(alive(pid) for pid in later | first)


def test_sigterm_drains_every_process(spawn, tmp_path: Path):
    (tmp_path / "app.py").write_text(PIDS_APP)
    server, client = start(spawn, tmp_path, "app", "--port", "0", "--processes", "2")
    children = pids_seen(client, 2, "both processes to answer")
    # A task queued in each process, and a request held in flight.
    for n in range(40):
        client.post(f"/task/{n}")
    replies: list[int] = []
    holder = threading.Thread(target=lambda: replies.append(client.get("/hold").status))
    holder.start()
    server.wait_for("holding in")
    server.proc.send_signal(signal.SIGTERM)
    server.wait_for("received SIGTERM", stream="stderr")
    (tmp_path / "release").touch()
    holder.join(DEADLINE)
    assert replies == [200]
    assert server.wait_exit(after="SIGTERM") == 0, server.output()
    done = [p for p in tmp_path.iterdir() if p.name.startswith("done-")]
    assert len(done) == 40, sorted(p.name for p in done)
    assert {int(p.read_text()) for p in done} == children  # tasks ran in both
    assert not any(alive(pid) for pid in children)
    with pytest.raises(OSError):
        client.get("/pid")


def test_sighup_replaces_processes_without_a_failed_request(spawn, tmp_path: Path):
    (tmp_path / "app.py").write_text(PIDS_APP)
    server, client = start(spawn, tmp_path, "app", "--port", "0", "--processes", "2")
    before = pids_seen(client, 2, "both processes to answer")
    failures: list[BaseException] = []
    answered: list[int] = []
    stop = threading.Event()

    def steady() -> None:
        while not stop.is_set():
            try:
                answered.append(pid_of(client))
            except BaseException as exc:  # noqa: BLE001 - every failure counts
                failures.append(exc)

    clients = [threading.Thread(target=steady) for _ in range(4)]
    for t in clients:
        t.start()
    try:
        wait_until(lambda: len(answered) > 20, what="the steady clients to get answers")
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for("replaced all 2 server processes", stream="stderr", timeout=60)
        count = len(answered)
        wait_until(lambda: len(answered) > count + 20, what="answers after the replacement")
    finally:
        stop.set()
        for t in clients:
            t.join(DEADLINE)
    assert failures == [], failures[:3]
    after = pids_seen(client, 2, "both new processes to answer")
    assert not after & before, (before, after)
    assert not any(alive(pid) for pid in before)
    assert server.stop(signal.SIGTERM) == 0, server.output()


def test_a_sighup_whose_new_process_fails_keeps_the_old_ones(spawn, tmp_path: Path):
    (tmp_path / "app.py").write_text(PIDS_APP)
    server, client = start(spawn, tmp_path, "app", "--port", "0", "--processes", "2")
    before = pids_seen(client, 2, "both processes to answer")
    (tmp_path / "app.py").write_text("raise RuntimeError('a broken deploy')\n")
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for("replacement stopped", stream="stderr")
    assert pids_seen(client, 2, "the old processes to answer") == before
    assert server.stop(signal.SIGTERM) == 0, server.output()


def test_reload_restarts_on_a_source_change(spawn, tmp_path: Path):
    source = "from catzilla import Catzilla\napp = Catzilla()\n"
    route = '@app.get("/version")\ndef version(request):\n    return {{"version": {}}}\n'
    (tmp_path / "app.py").write_text(source + route.format(1))
    server, client = start(spawn, tmp_path, "app", "--port", "0", "--reload")
    assert client.get("/version").json() == {"version": 1}
    # A change that breaks the import waits for the next one; the port stays open.
    (tmp_path / "app.py").write_text(source + "raise RuntimeError('half-saved')\n")
    server.wait_for("waiting for a change", stream="stderr")
    (tmp_path / "app.py").write_text(source + route.format(2))

    def reloaded() -> bool:
        reply = client.get("/version")
        return reply.status == 200 and reply.json() == {"version": 2}

    wait_until(reloaded, what="the new version to answer")
    assert server.stop(signal.SIGTERM) == 0, server.output()


def test_children_stop_when_the_supervisor_is_killed(spawn, tmp_path: Path):
    (tmp_path / "app.py").write_text(PIDS_APP)
    server, client = start(spawn, tmp_path, "app", "--port", "0", "--processes", "2")
    children = pids_seen(client, 2, "both processes to answer")
    server.proc.send_signal(signal.SIGKILL)
    wait_until(lambda: not any(alive(pid) for pid in children), what="the children to stop")


# The same options on app.listen

LISTEN_ON_FD = textwrap.dedent(
    """
    import socket, threading, urllib.request
    from catzilla import Catzilla

    app = Catzilla()

    @app.get("/hi")
    def hi(request):
        return {"client": request.client}

    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    def call():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/hi", timeout=30) as r:
                print("answer", r.read().decode(), r.headers["server"], flush=True)
        finally:
            app.stop()

    threading.Timer(0.2, call).start()
    app.listen(fd=sock.fileno(), access_log=True, forwarded_allow_ips="10.0.0.0/8, ::1")
    try:
        sock.fileno()
        socket.create_connection(("127.0.0.1", port), timeout=5)
        print("still open", flush=True)
    except OSError:
        print("closed", flush=True)
    """
)


def test_listen_serves_an_inherited_socket_and_logs_access_to_stderr():
    r = run_python(LISTEN_ON_FD, what="listen(fd=...)")
    assert r.returncode == 0, r.stderr
    assert 'answer {"client":["127.0.0.1",' in r.stdout and "catzilla" in r.stdout, r.stdout
    assert re.search(r'127\.0\.0\.1:\d+ - "GET /hi HTTP/1.1" 200 \d+ ', r.stderr), r.stderr
    assert r.stdout.strip().endswith("closed"), r.stdout


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"forwarded_allow_ips": "10.0.0.0/33"}, '"10.0.0.0/33" is not an IP address'),
        ({"forwarded_allow_ips": [1]}, "forwarded_allow_ips must hold str"),
        ({"backlog": 0}, "backlog must be an int >= 1"),
        ({"uds": "/tmp/x.sock", "fd": 3}, "give at most one of uds and fd"),
    ],
)
def test_listen_refuses_bad_options(kwargs: dict[str, Any], message: str):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        Catzilla().listen(port=0, **kwargs)
