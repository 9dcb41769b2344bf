"""Scale-out of catzilla's shared queue: CPU-bound tasks on one worker process
vs two, on the same store, for SQLite and for Redis storage.

Each task is pure-Python work that holds the GIL for about 20 ms
(``scaleout_apps/cpu_work.py``; the bench times it once and passes the same
iteration count to every run). One process cannot run two such tasks at
once, whatever its thread count; two worker processes can, on two cores. So
each worker process is ``python -m catzilla worker scaleout_app:app
--workers 1``, and one producer process (``BackgroundTasks(storage=...,
workers=0)``) enqueues the tasks and waits on their handles, timed from the
first enqueue to the last completion, after an untimed warm-up in which
every worker process has run a task. Each run starts on a new SQLite file or
a FLUSHALLed redis-server (started by the bench on 127.0.0.1 at a free port,
``--save '' --appendonly no``, and stopped at the end). The target is
two/one >= 1.7x on a 2-core machine.

    python benches/bench_scaleout.py [--tasks 200] [--rounds 3] [--storage sqlite,redis]
    python benches/bench_scaleout.py --quick   # 20 tasks, 1 round: a check, not a figure

Each figure is the median of the rounds. A storage whose shared mode this
catzilla lacks (``workers=0`` rejected, or no ``python -m catzilla worker``)
is skipped with the reason. Redis storage needs ``redis-server`` on PATH
(Debian: ``apt-get install redis-server``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from bench_http import BENCH_DIR, clean_env
from bench_redis import (
    HOST,
    SideError,
    flushall,
    kill_group,
    redis_server,
    shared_mode_missing,
    start,
    tail,
)
from benchargs import BenchParser

APPS = BENCH_DIR / "scaleout_apps"
sys.path.insert(0, str(APPS))

from cpu_work import spin  # noqa: E402

STORAGES = ("sqlite", "redis")
TASK_SECONDS = 0.020
PROCESS_COUNTS = (1, 2)
TARGET = 1.7


def calibrate(seconds: float) -> tuple[int, float]:
    """Iterations of ``spin`` that take about ``seconds`` here, and what they took
    (the best of 5, after a warm-up)."""
    _timed(1_000_000)
    probe = 100_000
    iterations = max(1, round(probe * seconds / min(_timed(probe) for _ in range(5))))
    return iterations, min(_timed(iterations) for _ in range(5))


def _timed(iterations: int) -> float:
    start = time.perf_counter()
    spin(iterations)
    return time.perf_counter() - start


def run(
    storage: str, processes: int, n: int, iterations: int, rounds: int, timeout: float, tmp: Path
) -> tuple[list[float], list[str], float]:
    """Seconds of each round of ``n`` tasks on ``processes`` worker processes, how
    the tasks of each round split between the processes, and the CPU seconds the
    producer used in all (warm-up included)."""
    env = clean_env()
    env["PYTHONPATH"] = str(APPS)
    env["BENCH_STORAGE"] = storage
    logs = [tmp / f"worker-{i}.log" for i in range(processes)]
    producer_log = tmp / "producer.log"
    for log in (*logs, producer_log):
        log.unlink(missing_ok=True)
    argv = [
        *(sys.executable, "-m", "catzilla", "worker", "scaleout_app:app"),
        *("--workers", "1", "--log-level", "warning"),
    ]
    started = time.monotonic()
    workers = []
    producer = None
    try:
        for log in logs:
            workers.append(start(argv, log, env, APPS))
        producer = start(
            [sys.executable, str(APPS / "producer.py")]
            + [str(n), str(iterations), str(processes), str(rounds), str(timeout)],
            producer_log,
            env,
            APPS,
        )
        while producer.poll() is None:
            for worker in workers:
                if worker.poll() is not None:
                    raise SideError(f"a worker process exited with code {worker.returncode}")
            if time.monotonic() - started > timeout + 15:
                raise SideError(f"not done within {timeout:g} s")
            time.sleep(0.05)
        output = producer_log.read_text(errors="replace")
        rows = [line.split()[1:] for line in output.splitlines() if line.startswith("SECONDS ")]
        times = [float(row[0]) for row in rows]
        splits = [row[1] for row in rows]
        cpu = [float(line.split()[1]) for line in output.splitlines() if line.startswith("CPU ")]
        if producer.returncode != 0 or len(times) != rounds or not cpu:
            raise SideError(f"the producer failed (exit {producer.returncode})")
        return times, splits, cpu[0]
    except SideError as exc:
        details = "".join(f"\n  worker {i} ({log}):\n{tail(log)}" for i, log in enumerate(logs))
        raise SideError(
            f"{exc}\n  producer ({producer_log}):\n{tail(producer_log)}{details}"
        ) from None
    finally:
        if producer is not None:
            kill_group(producer, 1)
        for worker in workers:
            kill_group(worker, 10)


@contextlib.contextmanager
def store(name: str, tmp: Path) -> Iterator[tuple[str, Callable[[], str]]]:
    """The storage URL, and a function that empties the store and returns its URL."""
    if name == "sqlite":
        runs = iter(range(1_000_000))
        yield f"sqlite:///{tmp}/probe.db", lambda: f"sqlite:///{tmp}/run-{next(runs)}.db"
        return
    with redis_server(tmp) as (port, _version):
        url = f"redis://{HOST}:{port}/0"

        def fresh() -> str:
            flushall(port)
            return url

        yield url, fresh


def main(argv: Sequence[str] | None = None) -> int:
    parser = BenchParser(__doc__)
    parser.add_size("--tasks", type=int, full=200, quick=20, help="tasks per round")
    parser.add_size("--rounds", type=int, full=3, quick=1, help="rounds per run")
    parser.add_size(
        "--timeout", type=float, full=300.0, quick=30.0, help="seconds for one run, all rounds"
    )
    parser.add_choices("--storage", STORAGES, help="storages")
    args = parser.parse(argv)
    names = args.storage
    if args.tasks < 1 or args.rounds < 1 or args.timeout <= 0:
        parser.error("need --tasks >= 1, --rounds >= 1 and --timeout > 0")
    if "redis" in names and shutil.which("redis-server") is None:
        print("redis-server is not on PATH: install it (Debian: apt-get install redis-server)")
        return 2

    n = args.tasks
    iterations, took = calibrate(TASK_SECONDS)
    print(
        f"{os.cpu_count()} CPUs; {n} tasks of spin({iterations}) ({took * 1000:.1f} ms each here),"
    )
    print(f"median of {args.rounds} round(s); worker processes with --workers 1 each")
    results: dict[str, dict[int, float]] = {}
    skipped: dict[str, str] = {}
    failures: dict[str, str] = {}
    for name in names:
        print(f"[{name}]", flush=True)
        try:
            with (
                tempfile.TemporaryDirectory(prefix="bench_scaleout-") as tmp,
                store(name, Path(tmp)) as (probe_url, fresh),
            ):
                env = clean_env()
                env["PYTHONPATH"] = str(APPS)
                env["BENCH_STORAGE"] = probe_url
                reason = shared_mode_missing("scaleout_app", env, APPS, args.timeout)
                if reason is not None:
                    skipped[name] = reason
                    print(f"    skipped: {reason}")
                    continue
                results[name] = {}
                for processes in PROCESS_COUNTS:
                    times, splits, cpu = run(
                        fresh(), processes, n, iterations, args.rounds, args.timeout, Path(tmp)
                    )
                    results[name][processes] = statistics.median(times)
                    rates = ", ".join(f"{n / t:.1f}" for t in times)
                    print(
                        f"    {processes} worker process(es): {rates} tasks/s"
                        f" (tasks per process: {', '.join(splits)});"
                        f" the producer used {cpu:.2f} s of CPU",
                        flush=True,
                    )
        except SideError as exc:
            results.pop(name, None)
            failures[name] = str(exc)
            print(f"    FAILED: {exc}")

    print()
    print(f"  {'storage':<10}{'1 process':>12}{'2 processes':>14}{'two/one':>10}   (tasks/s)")
    for name in names:
        if name in skipped:
            print(f"  {name:<10}skipped (see above)")
        elif name in failures:
            print(f"  {name:<10}FAILED")
        else:
            one, two = results[name][1], results[name][2]
            print(f"  {name:<10}{n / one:>12.1f}{n / two:>14.1f}{one / two:>9.2f}x")
    print(f"target: two/one >= {TARGET}x on 2 cores")
    if failures:
        print(f"\nnot measured: {', '.join(failures)} (see above)")
        return 1
    return 0


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so the ``finally`` blocks stop every process started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
