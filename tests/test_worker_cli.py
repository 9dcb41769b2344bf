"""``catzilla worker``: mistakes in the command line or the target give one
line and exit code 2; a worker drains on SIGTERM and stops waiting on a
second one; a supervisor restarts a worker process that dies and stops them
all on SIGTERM; ``redact`` hides store passwords."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from catzilla.cli import main, redact
from helpers import DEADLINE, ServerProcess, alive, run_python, wait_until

CLI = "from catzilla.cli import main; raise SystemExit(main())"
SERVING = "serving queue(s)"

JOBS = textwrap.dedent(
    """
    import os, time
    from pathlib import Path
    from catzilla import Catzilla

    app = Catzilla()
    app.enable_background_tasks(storage="sqlite:///tasks.db", workers=1)

    def hold(tag):
        print(f"task started in {os.getpid()}", flush=True)
        end = time.monotonic() + 60
        while not Path("release").exists():
            if time.monotonic() > end:
                raise RuntimeError("hold was never released")
            time.sleep(0.01)
        print("task finished", flush=True)
        return tag
    """
)

# Queues a task, waits until it is in the store and running, then waits to be killed.
PRODUCER = textwrap.dedent(
    """
    import threading, jobs
    jobs.app.add_task(jobs.hold, "x")
    assert jobs.app.tasks.flush(10)
    print("flushed", flush=True)
    threading.Event().wait()
    """
)


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_python(CLI, *args, cwd=str(cwd), what=f"catzilla {' '.join(args)}")


def assert_usage_error(stderr: str, *fragments: str) -> None:
    assert stderr.count("\n") == 1 and stderr.startswith("catzilla: error: "), stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


def pids(lines: list[str], text: str) -> list[int]:
    return [
        int(m.group(1)) for line in lines if text in line if (m := re.search(r"\[(\d+)\]", line))
    ]


# redact


@pytest.mark.parametrize(
    "url, shown",
    [
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("redis://user:pw@h:1/0", "redis://user:***@h:1/0"),
        (
            "rediss://user:p@ss/w:rd@h:1/0?ssl_cert_reqs=none",
            "rediss://user:***@h:1/0?ssl_cert_reqs=none",
        ),
        ("redis://h:1/0", "redis://h:1/0"),
        ("redis://user@h:1/0", "redis://user@h:1/0"),
        ("sqlite:///tmp/tasks.db", "sqlite:///tmp/tasks.db"),
        ("sqlite:///tmp/a:b@c.db", "sqlite:///tmp/a:b@c.db"),
        ("tasks.db", "tasks.db"),
    ],
)
def test_redact_hides_only_a_password(url: str, shown: str):
    assert redact(url) == shown


# Mistakes in the command line: parsed in this process


@pytest.mark.parametrize(
    "argv, fragment",
    [
        ([], "COMMAND"),
        (["serve", "app"], "invalid choice"),
        (["worker"], "TARGET"),
        (["worker", "app:"], "argument TARGET"),
        (["worker", ":app"], "argument TARGET"),
        (["worker", "a:b:c"], "argument TARGET"),
        (["worker", "1app"], "argument TARGET"),
        (["worker", "app", "--workers", "0"], "argument --workers"),
        (["worker", "app", "--workers", "two"], "argument --workers"),
        (["worker", "app", "--processes", "0"], "argument --processes"),
        (["worker", "app", "--grace", "-1"], "argument --grace"),
        (["worker", "app", "--grace", "nan"], "argument --grace"),
        (["worker", "app", "--queues", "a,,b"], "argument --queues"),
        (["worker", "app", "--log-level", "loud"], "argument --log-level"),
    ],
)
def test_a_bad_command_line_is_one_line_and_exit_code_2(argv, fragment, capsys):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert_usage_error(err, fragment)


def test_help_returns_0(capsys):
    assert main(["worker", "--help"]) == 0
    assert "--grace SECONDS" in capsys.readouterr().out


# Mistakes in the target: found by importing it, in a subprocess


def test_python_m_catzilla_runs_the_cli(tmp_path: Path):
    r = subprocess.run(
        [sys.executable, "-m", "catzilla", "worker", "no_such_module:app"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert_usage_error(r.stderr, "cannot import module 'no_such_module'", "No module named")


def test_a_module_that_fails_to_import_names_the_cause(tmp_path: Path):
    (tmp_path / "app.py").write_text("import no_such_dependency\n")
    r = cli(tmp_path, "worker", "app")
    assert r.returncode == 2
    assert_usage_error(
        r.stderr, "cannot import module 'app'", "No module named 'no_such_dependency'"
    )


@pytest.mark.parametrize(
    "source, target, fragment",
    [
        ("x = 1\n", "app", "app:app: module 'app' has no attribute 'app'"),
        ("x = 1\n", "app:x", "app:x is a int, not a Catzilla app or BackgroundTasks"),
        (
            "from catzilla import Catzilla\napp = Catzilla()\n",
            "app",
            "app:app has not enabled background tasks",
        ),
        (
            "from catzilla import Catzilla\n"
            "app = Catzilla()\napp.enable_background_tasks(workers=1)\n",
            "app",
            "the worker command needs a shared store",
        ),
        (
            "from catzilla import BackgroundTasks\ntasks = BackgroundTasks(workers=1)\n",
            "app:tasks",
            "needs a shared store",
        ),
    ],
)
def test_a_bad_target_is_one_line_and_exit_code_2(tmp_path: Path, source, target, fragment):
    (tmp_path / "app.py").write_text(source)
    r = cli(tmp_path, "worker", target)
    assert r.returncode == 2, r.stderr
    assert_usage_error(r.stderr, fragment)


# One worker process


@pytest.fixture
def recovered(spawn: Callable[..., ServerProcess], tmp_path: Path) -> Callable[..., ServerProcess]:
    """Starts a worker on a store holding a task that a killed producer left
    running; returns it once it runs that task again."""
    (tmp_path / "jobs.py").write_text(JOBS)

    def start(*options: str) -> ServerProcess:
        producer = spawn(["-c", PRODUCER], cwd=str(tmp_path))
        producer.wait_for("flushed")
        producer.wait_for("task started in")
        producer.stop(signal.SIGKILL)
        worker = spawn(["-m", "catzilla", "worker", "jobs:app", *options], cwd=str(tmp_path))
        worker.wait_for(f"task started in {worker.pid}")
        return worker

    return start


def test_the_worker_says_what_it_serves_and_drains_on_sigterm(recovered, tmp_path: Path):
    worker = recovered("--workers", "2", "--grace", "20")
    line = worker.wait_for(SERVING, stream="stderr")
    assert f"[{worker.pid}]" in line and "default with 2 worker(s)" in line, line
    assert "store sqlite:///tasks.db" in line, line
    worker.proc.send_signal(signal.SIGTERM)
    worker.wait_for("stopping: running tasks get up to 20 s", stream="stderr")
    (tmp_path / "release").touch()
    assert worker.wait_exit(DEADLINE, "SIGTERM") == 0, worker.output()
    assert "task finished" in worker.lines()
    assert "drained=True" in worker.output()


def test_a_second_signal_stops_waiting_for_running_tasks(recovered, tmp_path: Path):
    worker = recovered("--grace", "60")
    worker.proc.send_signal(signal.SIGINT)
    worker.wait_for("stopping", stream="stderr")
    worker.proc.send_signal(signal.SIGINT)
    worker.wait_for("second signal", stream="stderr")
    worker.wait_for("worker stopped: drained=False", stream="stderr")
    (tmp_path / "release").touch()
    assert worker.wait_exit(DEADLINE, "two SIGINTs") == 0, worker.output()


# The supervisor

SQLITE_APP = (
    "from catzilla import Catzilla\n"
    "app = Catzilla()\n"
    "app.enable_background_tasks(storage='sqlite:///tasks.db', workers=1)\n"
)


def test_the_supervisor_restarts_a_dead_worker_and_stops_them_all(spawn, tmp_path: Path):
    (tmp_path / "app.py").write_text(SQLITE_APP)
    sup = spawn(["-m", "catzilla", "worker", "app", "--processes", "2"], cwd=str(tmp_path))
    sup.wait_for(SERVING, stream="stderr", count=2)
    first = pids(sup.stderr, SERVING)
    assert len(set(first)) == 2 and sup.pid not in first, sup.output()
    os.kill(first[0], signal.SIGKILL)
    sup.wait_for(f"worker process {first[0]} was killed by SIGKILL", stream="stderr")
    sup.wait_for(SERVING, stream="stderr", count=3)
    children = pids(sup.stderr, SERVING)[1:]
    assert sup.stop(signal.SIGTERM, DEADLINE * 2) == 0, sup.output()
    assert sup.output().count("worker stopped: drained=True") == 2, sup.output()
    assert not any(alive(pid) for pid in children)


def test_the_supervisor_gives_up_on_a_usage_error(tmp_path: Path):
    r = cli(tmp_path, "worker", "no_such_module", "--processes", "2")
    assert r.returncode == 2, r.stderr
    assert "cannot import module 'no_such_module'" in r.stderr
    assert "exited with a usage error" in r.stderr


def test_workers_stop_when_the_supervisor_is_killed(spawn, tmp_path: Path):
    (tmp_path / "app.py").write_text(SQLITE_APP)
    sup = spawn(["-m", "catzilla", "worker", "app", "--processes", "2"], cwd=str(tmp_path))
    sup.wait_for(SERVING, stream="stderr", count=2)
    children = pids(sup.stderr, SERVING)
    sup.proc.send_signal(signal.SIGKILL)
    sup.wait_for(f"the supervisor (pid {sup.pid}) is gone", stream="stderr", count=2)
    wait_until(lambda: not any(alive(pid) for pid in children), what="the workers to stop")
