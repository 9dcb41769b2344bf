"""Every script in benches/ runs end to end in its quick mode (``--quick``: every
side, baselines included, at tiny sizes) within a deadline, exits 0 and prints
the ratios or checks it promises: a broken benchmark fails here at once.

Quick figures mean nothing and are never compared with anything; the figures
come only from full runs by hand. The baseline venvs (catzilla 0.2.3,
Starlette/uvicorn, granian, Huey, APScheduler, Celery, Dramatiq, arq, RQ, from PyPI)
are made first, once, under a deadline of their own, so that a bench's
deadline times the bench alone. A run that overruns gets SIGABRT first, so
that faulthandler prints where each of its threads was, and then it and its
children are killed.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import run_python

BENCHES = Path(__file__).resolve().parent.parent / "benches"
DEADLINE = 60.0  # seconds for one quick run; each takes 1-8 s on a 2-core machine
# Seconds to make the baseline venvs of one bench (a one-off pip install, 10-40 s);
# with DEADLINE, within the suite's per-test timeout (pyproject.toml).
VENV_DEADLINE = 200.0

NUM = r"-?\d[\d,]*(?:\.\d+)?"  # a number as the benches print it


@dataclass(frozen=True)
class Bench:
    script: str
    expect: tuple[str, ...]  # regexes (re.MULTILINE) the output must each match
    venvs: tuple[str, ...] = ()  # baseline venvs it uses, from bench_http.BASELINE_VENVS
    needs: tuple[str, ...] = ()  # programs it runs


BENCH_SCRIPTS = (
    Bench(
        "bench_http.py",
        (
            r"^ratios \(requests/s\)\s+ours/orig\s+ours/uvicorn$",
            rf"^GET /json\s+{NUM}x\s+{NUM}x$",
            rf"^POST /enqueue\s+{NUM}x\s+{NUM}x$",
        ),
        venvs=(".venv-catzilla-orig", ".venv-uvicorn"),
        needs=("wrk",),
    ),
    Bench(
        "bench_idle.py",
        (
            rf"^  catzilla \(this project\)\s+{NUM}%$",
            rf"^  catzilla 0\.2\.3\s+{NUM}%$",
            rf"^  ratio 0\.2\.3/this project\s+({NUM}x|n/a)",
        ),
        venvs=(".venv-catzilla-orig",),
    ),
    Bench(
        "bench_monitoring.py",
        (
            r"^metrics \+ dashboard, vs off",
            r"^metrics \+ dashboard \+ a hook, vs off",
            rf"^  tasks end to end \(time\):\s+median {NUM}x",
            rf"^  HTTP GET /json \(1/rps\):\s+median {NUM}x",
        ),
        needs=("wrk",),
    ),
    Bench(
        "bench_params.py",
        (
            rf"^\s+1\s+{NUM}\s+{NUM}\s+{NUM}x$",
            rf"^  HTTP \(1/rps\):\s+median {NUM}x",
            rf"^  in process \(handler\):\s+{NUM}x \(model {NUM} us, hand {NUM} us",
            r"^target: model/hand <= 1\.3x over HTTP: (met|NOT met)$",
        ),
        needs=("wrk",),
    ),
    Bench(
        "bench_periodic.py",
        (
            rf"^  catzilla\s+{NUM}\s+{NUM}\s+{NUM}\s*$",
            rf"^  deadline-loop\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}x later$",
            rf"^  naive-sleep-loop\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}x later$",
            rf"^  apscheduler\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}x later$",
        ),
        venvs=(".venv-apscheduler",),
    ),
    Bench(
        "bench_processes.py",
        (
            r"^ratios \(requests/s\)\s+catzilla-p2/granian-rsgi\s+catzilla-p2/granian-asgi"
            r"\s+catzilla-p2/uvicorn$",
            rf"^GET /json\s+{NUM}x\s+{NUM}x\s+{NUM}x$",
            rf"^GET /cpu\s+{NUM}x\s+{NUM}x\s+{NUM}x$",
            rf"^scaling GET /cpu p2/p1\s+{NUM}x$",
        ),
        venvs=(".venv-uvicorn", ".venv-granian"),
        needs=("wrk",),
    ),
    Bench(
        "bench_redis.py",
        (
            rf"^  catzilla \(this project\)\s+{NUM}\s+{NUM}$",
            *(
                rf"^  {side}\s+{NUM}\s+{NUM}\s+({NUM}x|n/a)$"
                for side in ("Celery", "Dramatiq", "arq", "RQ", "Huey")
            ),
            rf"^  catzilla/best baseline \(\w+\)\s+({NUM}x|n/a)$",
        ),
        venvs=(".venv-celery", ".venv-dramatiq", ".venv-arq", ".venv-rq", ".venv-huey-redis"),
        needs=("redis-server",),
    ),
    Bench(
        "bench_scaleout.py",
        (
            *(rf"^  {storage}\s+{NUM}\s+{NUM}\s+{NUM}x$" for storage in ("sqlite", "redis")),
            r"^target: two/one >= 1\.7x",
        ),
        needs=("redis-server",),
    ),
    Bench(
        "bench_storage.py",
        (
            rf"^  catzilla durable \(SQLite\)\s+{NUM}$",
            rf"^  Huey SqliteHuey, 4 threads\s+{NUM}\s+durable/Huey\s+{NUM}x$",
            rf"^  catzilla in memory\s+{NUM}\s+memory/durable\s+{NUM}x$",
        ),
        venvs=(".venv-huey",),
    ),
    Bench(
        "bench_tasks.py",
        tuple(
            rf"^{row}\s+{NUM}\s+{NUM}\s+{unit}\s+{NUM}x$"
            for row, unit in (
                (r"enqueue \d+ no-op tasks", "tasks/s"),
                (r"end-to-end \d+ no-op tasks", "tasks/s"),
                (r"\d+ x time\.sleep\(10 ms\)", "ms"),
                (r"\d+ x asyncio\.sleep\(10 ms\)", "ms"),
                (r"start latency p50 \(1 ms spacing\)", "us"),
                (r"start latency p99 \(1 ms spacing\)", "us"),
            )
        ),
    ),
    Bench(
        "burst.py",
        (
            rf"^  memory per queued task: {NUM} bytes",
            r"^  runs (\d+), missing 0, duplicated 0$",
            r"^  ok   exactly_once$",
            r"^PASS$",
        ),
    ),
    Bench(
        "http_load.py",
        (
            r" 0 non-2xx, 0 socket errors$",
            r"^tasks: (\d+) submitted by the app, \1 ran$",
            r"^PASS$",
        ),
        needs=("wrk",),
    ),
    Bench(
        "soak.py",
        (
            r"^tasks submitted: [1-9]\d*$",
            r"^  ok   requests_ok$",
            r"^  ok   stats_add_up$",
            r"^  ok   drained$",
            r"^  ok   clean_exit$",
            r"^PASS$",
        ),
    ),
)

# Modules in benches/ that are not benchmarks themselves (subdirectories hold helpers too).
HELPERS = {"benchargs.py", "soak_app.py"}


def test_every_script_in_benches_has_a_quick_run_test():
    scripts = {p.name for p in BENCHES.glob("*.py")}
    assert scripts - HELPERS == {b.script for b in BENCH_SCRIPTS}


# Running a bench


def descendants(pid: int) -> list[int]:
    """The processes below ``pid``, children first (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name, in parentheses, may itself hold spaces and parentheses.
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found: list[int] = []
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@dataclass
class Run:
    returncode: int | None  # None: it overran the deadline and was killed
    output: str
    seconds: float

    def tail(self, lines: int = 150) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


def run_quick(script: str, cwd: Path) -> Run:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, str(BENCHES / script), "--quick"],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    try:
        out, _ = proc.communicate(timeout=DEADLINE)
        return Run(proc.returncode, out, time.monotonic() - started)
    except subprocess.TimeoutExpired:
        pass
    except BaseException:  # interrupted (Ctrl-C, the suite's timeout): leave nothing behind
        signal_all([proc.pid, *descendants(proc.pid)], signal.SIGKILL)
        raise
    # Overran: freeze its children (as they are), have faulthandler print the
    # stacks of the bench's threads (SIGABRT, with no core file), then kill the lot.
    family = descendants(proc.pid)
    signal_all(family, signal.SIGSTOP)
    with contextlib.suppress(OSError):
        resource.prlimit(proc.pid, resource.RLIMIT_CORE, (0, 0))
    signal_all([proc.pid], signal.SIGABRT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    signal_all([proc.pid, *family], signal.SIGKILL)
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:  # something we did not know of holds the pipe
        proc.kill()
        out = "(no output: the pipe stayed open)"
    return Run(None, out, time.monotonic() - started)


@pytest.fixture(scope="module")
def baseline_venvs() -> Iterator[Callable[[tuple[str, ...]], None]]:
    """Makes baseline venvs (each once) with bench_http.ensure_venv, which
    reuses one already made."""
    ready: set[str] = set()

    def ensure(names: tuple[str, ...]) -> None:
        missing = [name for name in names if name not in ready]
        if not missing:
            return
        code = (
            "import sys\n"
            "sys.path.insert(0, sys.argv[1])\n"
            "import bench_http as b\n"
            "for name in sys.argv[2:]:\n"
            "    b.ensure_venv(b.BENCH_DIR / name, b.BASELINE_VENVS[name], False)\n"
        )
        out = run_python(
            code,
            str(BENCHES),
            *missing,
            timeout=VENV_DEADLINE,
            what=f"making the baseline venvs {missing}",
        )
        assert out.returncode == 0, f"making the baseline venvs {missing} failed:\n" + (
            out.stdout + out.stderr
        )
        ready.update(missing)

    yield ensure


@pytest.mark.bench
@pytest.mark.parametrize("bench", BENCH_SCRIPTS, ids=lambda b: b.script)
def test_quick_run_completes_and_prints_its_results(
    bench: Bench, baseline_venvs: Callable[[tuple[str, ...]], None], tmp_path: Path
):
    for program in bench.needs:
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed (Debian: apt-get install {program})")
    baseline_venvs(bench.venvs)
    run = run_quick(bench.script, tmp_path)
    print(f"\n{bench.script} --quick: {run.seconds:.1f} s\n{run.tail(40)}")
    assert run.returncode is not None, (
        f"{bench.script} --quick overran its {DEADLINE:g} s deadline and was killed"
        f" (stacks after the SIGABRT):\n{run.tail()}"
    )
    assert run.returncode == 0, f"{bench.script} --quick exited {run.returncode}:\n{run.tail()}"
    missing = [p for p in bench.expect if not re.search(p, run.output, re.MULTILINE)]
    assert not missing, f"{bench.script} --quick printed no line matching {missing}:\n{run.tail()}"
