"""End-to-end throughput of no-op tasks on one real redis-server: catzilla vs
Celery, Dramatiq, arq, RQ and Huey, side by side in one run.

The bench starts ``redis-server`` on 127.0.0.1 at a free port (``--save ''
--appendonly no``) and stops it at the end; every side starts on a FLUSHALLed
server. A side is one worker process, run as its docs recommend, and ONE
producer process that enqueues the tasks one by one and waits until all are
done, timed from the first enqueue to the last completion:

- catzilla: ``BackgroundTasks(storage="redis://...", workers=0)`` enqueues;
  ``python -m catzilla worker catzilla_app:app --workers 4`` runs them.
- Celery: ``celery worker --pool prefork --concurrency 4 --without-gossip
  --without-mingle --without-heartbeat``, its default pool; no result backend,
  ignore_result. (``--pool threads`` measured the same here, within noise.)
- Dramatiq: ``dramatiq dramatiq_app --processes 1 --threads 4``, RedisBroker.
- arq: ``arq arq_app.WorkerSettings`` with max_jobs 10 (its default) and
  ``poll_delay`` 0.01 s: with its default of 0.5 s an arq worker sleeps
  between reads of the queue, and a no-op benchmark would time that sleep.
- RQ: ``rq worker-pool --num-workers 4 --worker-class rq.worker.SimpleWorker``.
  An RQ worker runs one job at a time (its docs: start more workers for
  concurrency), so four of them, from its own pool command; SimpleWorker,
  which RQ's notes on performance name for jobs of a few milliseconds,
  because the default Worker forks for each job. (One ``rq worker`` with
  SimpleWorker did about 60% of the pool's rate here.)
- Huey: RedisHuey, ``huey_consumer huey_app.huey -w 4 -k thread``.

No side keeps the result of a no-op (ignore_result, keep_result=0,
result_ttl=0, Huey's store_none=False), except catzilla, which stores every
task's outcome in Redis with an expiry. Every task does the same thing to say
it is done: one INCR, on its own connection, and the last one an RPUSH that
the producer waits on in BLPOP (``redis_apps/tally.py``). The producers and
apps are in ``redis_apps/``. Each baseline runs from PyPI in its own venv made
on first use next to this script (``.venv-celery``, ``.venv-dramatiq``,
``.venv-arq``, ``.venv-rq``, ``.venv-huey-redis``); catzilla runs on the
interpreter that runs this script. The catzilla side is skipped, with the
reason, when this catzilla has no shared mode yet (``workers=0`` with a Redis
storage rejected, or no ``python -m catzilla worker``).

    python benches/bench_redis.py [--tasks 20000] [--rounds 3] [--only catzilla,celery]
    python benches/bench_redis.py --quick   # 200 tasks, 1 round: a check, not a figure

Each figure is the median of the rounds (after an untimed warm-up batch that
also waits for the worker to be up). Needs ``redis-server`` on PATH (Debian:
``apt-get install redis-server``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench_http import (
    BASELINE_VENVS,
    BENCH_DIR,
    clean_env,
    ensure_venv,
    free_port,
    package_versions,
)
from benchargs import BenchParser

APPS = BENCH_DIR / "redis_apps"
sys.path.insert(0, str(APPS))

from tally import HOST, Redis  # noqa: E402

WARMUP = 8  # untimed tasks before the rounds of a side
CONCURRENCY = 4  # threads (or jobs) per worker process, where the system has a knob


class SideError(Exception):
    """A side could not be measured; the message says why."""


@dataclass(frozen=True)
class Side:
    key: str  # for --only, and the name of its app module: f"{key}_app"
    label: str
    venv: str | None  # a baseline venv under BENCH_DIR; None: this interpreter
    packages: tuple[str, ...]  # whose versions are printed
    worker: Callable[[Path, int], list[str]]  # (python, redis port) -> argv
    how: str


def _bin(python: Path, name: str) -> str:
    return str(python.parent / name)


SIDES = (
    Side(
        "catzilla",
        "catzilla (this project)",
        None,
        ("catzilla",),
        lambda py, port: [
            *(str(py), "-m", "catzilla", "worker", "catzilla_app:app"),
            *("--workers", str(CONCURRENCY), "--log-level", "warning"),
        ],
        f"python -m catzilla worker --workers {CONCURRENCY}",
    ),
    Side(
        "celery",
        "Celery",
        ".venv-celery",
        ("celery", "kombu", "redis"),
        lambda py, port: [
            *(_bin(py, "celery"), "-A", "celery_app", "worker", "--pool", "prefork"),
            *("--concurrency", str(CONCURRENCY), "--loglevel", "WARNING"),
            *("--without-gossip", "--without-mingle", "--without-heartbeat"),
        ],
        f"--pool prefork --concurrency {CONCURRENCY}",
    ),
    Side(
        "dramatiq",
        "Dramatiq",
        ".venv-dramatiq",
        ("dramatiq", "redis"),
        lambda py, port: [
            *(_bin(py, "dramatiq"), "dramatiq_app"),
            *("--processes", "1", "--threads", str(CONCURRENCY)),
        ],
        f"--processes 1 --threads {CONCURRENCY}",
    ),
    Side(
        "arq",
        "arq",
        ".venv-arq",
        ("arq", "redis"),
        lambda py, port: [_bin(py, "arq"), "arq_app.WorkerSettings"],
        "max_jobs 10, poll_delay 0.01 s",
    ),
    Side(
        "rq",
        "RQ",
        ".venv-rq",
        ("rq", "redis"),
        lambda py, port: [
            *(_bin(py, "rq"), "worker-pool", "--num-workers", str(CONCURRENCY)),
            *("--url", f"redis://{HOST}:{port}/0", "--worker-class", "rq.worker.SimpleWorker"),
            *("--logging-level", "WARNING"),
        ],
        f"worker-pool of {CONCURRENCY} SimpleWorkers",
    ),
    Side(
        "huey",
        "Huey",
        ".venv-huey-redis",
        ("huey", "redis"),
        lambda py, port: [
            *(_bin(py, "huey_consumer"), "huey_app.huey"),
            *("-w", str(CONCURRENCY), "-k", "thread", "-q"),
        ],
        f"RedisHuey, -w {CONCURRENCY} -k thread",
    ),
)
SIDE_KEYS = tuple(side.key for side in SIDES)

# Whether this catzilla has shared mode: imports the module argv[1], whose
# ``app`` is a BackgroundTasks(storage=..., workers=0), in a side's environment.
PROBE = """
import importlib, importlib.util, sys
try:
    module = importlib.import_module(sys.argv[1])
except (TypeError, ValueError) as exc:
    print(f"SKIP BackgroundTasks(storage=..., workers=0) is rejected: {exc}")
    sys.exit(0)
if importlib.util.find_spec("catzilla.__main__") is None:
    print("SKIP there is no `python -m catzilla worker`")
    sys.exit(0)
module.app.shutdown(timeout=5)
print("OK")
"""


# ---------------------------------------------------------------------------- processes


def kill_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM to ``proc``'s process group, SIGKILL after ``grace`` seconds, and
    SIGKILL to the group again in any case: nothing it started is left behind."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def start(
    argv: Sequence[str], log: Path, env: dict[str, str] | None, cwd: Path
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as one
        )


def tail(log: Path, lines: int = 25) -> str:
    text = log.read_text(errors="replace").rstrip() if log.exists() else ""
    return "\n".join(f"    | {line}" for line in text.splitlines()[-lines:]) or "    | (no output)"


def _redis_version(proc: subprocess.Popen[bytes], port: int, timeout: float) -> str | None:
    """The version of the redis-server ``proc`` once it answers on ``port``; None
    if it exits or stays silent for ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            redis = Redis(port, timeout=1.0)
        except OSError:
            time.sleep(0.05)
            continue
        try:
            info = redis.call("INFO", "server").decode()
        finally:
            redis.close()
        fields = dict(line.split(":", 1) for line in info.split() if ":" in line)
        return fields.get("redis_version", "?")
    return None


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[tuple[int, str]]:
    """A fresh redis-server on 127.0.0.1 at a free port, stopped on the way out;
    yields (port, version)."""
    log = workdir / "redis-server.log"
    for _ in range(3):  # another process may take the free port before the server binds it
        port = free_port()
        argv = [
            *("redis-server", "--port", str(port), "--bind", HOST),
            *("--save", "", "--appendonly", "no", "--dir", str(workdir)),
        ]
        proc = start(argv, log, None, workdir)
        try:
            version = _redis_version(proc, port, 10.0)
            if version is not None:
                yield port, version
                return
        finally:
            kill_group(proc, 5)
    raise SideError(f"redis-server did not start:\n{tail(log)}")


def flushall(port: int) -> None:
    redis = Redis(port)
    try:
        redis.call("FLUSHALL")
    finally:
        redis.close()


# ---------------------------------------------------------------------------- sides


@dataclass(frozen=True)
class Figures:
    seconds: float  # median, first enqueue to last completion
    enqueue_seconds: float  # median, enqueueing alone

    def rate(self, n: int) -> float:
        return n / self.seconds


def side_env(port: int) -> dict[str, str]:
    env = clean_env()
    env["PYTHONPATH"] = str(APPS)
    env["BENCH_REDIS_PORT"] = str(port)
    return env


def shared_mode_missing(module: str, env: dict[str, str], cwd: Path, timeout: float) -> str | None:
    """Why this catzilla cannot run ``module``'s app in shared mode (an enqueue-only
    process and ``python -m catzilla worker``), or None if it can."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", PROBE, module],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise SideError(f"checking for shared mode took over {timeout:g} s") from exc
    last = out.stdout.strip().splitlines()[-1:] or [""]
    if out.returncode == 0 and last[0].startswith("SKIP "):
        return last[0][len("SKIP ") :]
    if out.returncode == 0 and last[0] == "OK":
        return None
    raise SideError(
        f"checking for shared mode failed (exit {out.returncode}):\n{out.stdout}{out.stderr}"
    )


def run_side(
    side: Side, python: Path, port: int, n: int, rounds: int, timeout: float, workdir: Path
) -> Figures:
    """One side: its worker and its producer, always both stopped on the way out."""
    flushall(port)
    env = side_env(port)
    worker_log = workdir / f"{side.key}-worker.log"
    producer_log = workdir / f"{side.key}-producer.log"
    for log in (worker_log, producer_log):
        log.unlink(missing_ok=True)
    started = time.monotonic()
    worker = start(side.worker(python, port), worker_log, env, APPS)
    producer = None
    try:
        producer = start(
            [str(python), str(APPS / "producer.py"), f"{side.key}_app"]
            + [str(n), str(rounds), str(WARMUP), str(timeout)],
            producer_log,
            env,
            APPS,
        )
        while producer.poll() is None:
            if worker.poll() is not None:
                raise SideError(f"the worker exited with code {worker.returncode}")
            if time.monotonic() - started > timeout:
                raise SideError(f"not done within {timeout:g} s")
            time.sleep(0.05)
        output = producer_log.read_text(errors="replace")
        times = [line.split()[1:] for line in output.splitlines() if line.startswith("SECONDS ")]
        if producer.returncode != 0 or len(times) != rounds:
            raise SideError(f"the producer failed (exit {producer.returncode})")
        return Figures(
            statistics.median(float(t[0]) for t in times),
            statistics.median(float(t[1]) for t in times),
        )
    except SideError as exc:
        raise SideError(
            f"{exc}\n  producer ({producer_log}):\n{tail(producer_log)}"
            f"\n  worker ({worker_log}):\n{tail(worker_log)}"
        ) from None
    finally:
        if producer is not None:
            kill_group(producer, 1)
        kill_group(worker, 10)


# ---------------------------------------------------------------------------- main


def measure(
    sides: Sequence[Side], pythons: dict[str, Path], n: int, rounds: int, timeout: float
) -> tuple[dict[str, Figures], dict[str, str], dict[str, str]]:
    """Every side on one redis-server: (figures, skipped, failed), by side key."""
    results: dict[str, Figures] = {}
    skipped: dict[str, str] = {}
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench_redis-") as tmp:
        with redis_server(Path(tmp)) as (port, version):
            print(f"\nredis-server {version} on {HOST}:{port} (--save '' --appendonly no)")
            print(f"{os.cpu_count()} CPUs; {n} no-op tasks, first enqueue to last completion,")
            print(f"median of {rounds} round(s)")
            for side in sides:
                python = pythons[side.key]
                versions = package_versions(python, side.packages, isolated=side.venv is not None)
                print(f"[{side.key}] {versions}; {side.how}", flush=True)
                try:
                    if side.venv is None:
                        reason = shared_mode_missing("catzilla_app", side_env(port), APPS, timeout)
                        if reason is not None:
                            skipped[side.key] = reason
                            print(f"    skipped: {reason}")
                            continue
                    results[side.key] = run_side(side, python, port, n, rounds, timeout, Path(tmp))
                except SideError as exc:
                    failures[side.key] = str(exc)
                    print(f"    FAILED: {exc}")
    return results, skipped, failures


def print_table(
    sides: Sequence[Side],
    results: dict[str, Figures],
    skipped: dict[str, str],
    failures: dict[str, str],
    n: int,
) -> None:
    print()
    print(f"  {'side':<24}{'tasks/s':>10}{'enqueue/s':>12}{'catzilla/side':>15}")
    ours = results.get("catzilla")
    for side in sides:
        if side.key in skipped:
            print(f"  {side.label:<24}{'skipped (see above)':>22}")
        elif side.key in failures:
            print(f"  {side.label:<24}FAILED")
        else:
            figures = results[side.key]
            ratio = ""
            if side.venv is not None:
                ratio = "n/a" if ours is None else f"{figures.seconds / ours.seconds:.2f}x"
            line = f"  {side.label:<24}{figures.rate(n):>10.0f}{n / figures.enqueue_seconds:>12.0f}"
            print(f"{line}{ratio:>15}".rstrip())
    baselines = [s for s in sides if s.venv is not None and s.key in results]
    if baselines:
        best = min(baselines, key=lambda s: results[s.key].seconds)
        ratio = "n/a" if ours is None else f"{results[best.key].seconds / ours.seconds:.2f}x"
        print(f"  catzilla/best baseline ({best.label})  {ratio}")
    print("tasks/s end to end; enqueue/s: the producer's enqueueing alone;")
    print("a ratio above 1 means catzilla is faster")


def main(argv: Sequence[str] | None = None) -> int:
    parser = BenchParser(__doc__)
    parser.add_size("--tasks", type=int, full=20000, quick=200, help="tasks per round")
    parser.add_size("--rounds", type=int, full=3, quick=1, help="rounds per side")
    parser.add_size(
        "--side-timeout",
        type=float,
        full=600.0,
        quick=30.0,
        help="seconds for one side, all rounds",
    )
    parser.add_choices("--only", SIDE_KEYS, help="sides to run")
    args = parser.parse(argv)
    keys = args.only
    if args.tasks < 1 or args.rounds < 1 or args.side_timeout <= 0:
        parser.error("need --tasks >= 1, --rounds >= 1 and --side-timeout > 0")
    if shutil.which("redis-server") is None:
        print("redis-server is not on PATH: install it (Debian: apt-get install redis-server)")
        return 2
    sides = [side for key in keys for side in SIDES if side.key == key]
    pythons = {
        side.key: Path(sys.executable)
        if side.venv is None
        else ensure_venv(BENCH_DIR / side.venv, BASELINE_VENVS[side.venv], False)
        for side in sides
    }
    n, rounds = args.tasks, args.rounds
    results, skipped, failures = measure(sides, pythons, n, rounds, args.side_timeout)
    print_table(sides, results, skipped, failures, n)
    if failures:
        print(f"\nnot measured: {', '.join(failures)} (see above)")
        return 1
    return 0


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so the ``finally`` blocks stop every process started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
