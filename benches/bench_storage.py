"""Durable end-to-end throughput of no-op tasks, side by side in one run:

- catzilla with SQLite storage (``storage="sqlite:///..."``), 4 workers;
- Huey's SqliteHuey with its own consumer (4 worker threads), from PyPI in its
  own venv (made on first use);
- catzilla in memory, against its durable mode.

    python benches/bench_storage.py [--tasks 5000] [--rounds 3]
    python benches/bench_storage.py --quick     # 100 tasks, 2 rounds: a check, not a figure

Each figure is the median of the rounds; ratios are printed, not lone times.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench_http import BENCH_DIR, HUEY_REQUIREMENTS, clean_env, ensure_venv
from benchargs import BenchParser

APPS = BENCH_DIR / "storage_apps"
sys.path.insert(0, str(APPS))

from catzilla.background_tasks import BackgroundTasks  # noqa: E402
from catzilla_jobs import noop  # noqa: E402


def catzilla_seconds(n: int, durable: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        storage = f"sqlite:///{tmp}/tasks.db" if durable else None
        engine = BackgroundTasks(
            workers=4, max_workers=4, enable_auto_scaling=False, queue_size=n + 1, storage=storage
        )
        start = time.perf_counter()
        results = [engine.add_task(noop) for _ in range(n)]
        for r in results:
            r.wait(300)
        if not engine.flush(60):  # durable: every outcome committed
            raise RuntimeError("the store did not commit every outcome within 60 s")
        took = time.perf_counter() - start
        engine.shutdown(timeout=10)
        return took


def huey_seconds(python: Path, n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        env = clean_env()
        env["HUEY_DB"] = f"{tmp}/huey.db"
        env["PYTHONPATH"] = str(APPS)
        consumer_bin = python.parent / "huey_consumer"
        consumer = subprocess.Popen(
            [str(consumer_bin), "huey_app.huey", "-w", "4", "-k", "thread", "-q"],
            env=env,
            cwd=APPS,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            out = subprocess.run(
                [str(python), str(APPS / "huey_producer.py"), str(n)],
                env=env,
                cwd=APPS,
                capture_output=True,
                text=True,
                timeout=600,
            )
        finally:
            os.killpg(consumer.pid, signal.SIGINT)
            try:
                consumer.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(consumer.pid, signal.SIGKILL)
        for line in out.stdout.splitlines():
            if out.returncode == 0 and line.startswith("SECONDS "):
                return float(line.split()[1])
        raise RuntimeError(
            f"the Huey producer failed (exit {out.returncode}):\n{out.stdout}\n{out.stderr}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = BenchParser(__doc__)
    parser.add_size("--tasks", type=int, full=5000, quick=100, help="tasks per round")
    parser.add_size("--rounds", type=int, full=3, quick=2, help="rounds per contender")
    args = parser.parse(argv)
    if args.tasks < 1 or args.rounds < 1:
        parser.error("need --tasks >= 1 and --rounds >= 1")
    python = ensure_venv(BENCH_DIR / ".venv-huey", HUEY_REQUIREMENTS, False)
    n, rounds = args.tasks, args.rounds
    durable = statistics.median(catzilla_seconds(n, True) for _ in range(rounds))
    memory = statistics.median(catzilla_seconds(n, False) for _ in range(rounds))
    huey = statistics.median(huey_seconds(python, n) for _ in range(rounds))
    print(f"{n} no-op tasks end to end, median of {rounds} rounds")
    print("tasks/s; a ratio above 1 means the first named wins")
    print(f"  catzilla durable (SQLite)   {n / durable:12.0f}")
    print(f"  Huey SqliteHuey, 4 threads  {n / huey:12.0f}   durable/Huey {huey / durable:6.1f}x")
    ratio = durable / memory
    print(f"  catzilla in memory          {n / memory:12.0f}   memory/durable {ratio:6.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
