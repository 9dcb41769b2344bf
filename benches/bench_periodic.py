"""Timing accuracy of periodic runs under load, side by side in one run.

Each contender runs a task every ``--period`` seconds, ``--runs`` times, while
``--load`` Python threads keep the interpreter busy (pure-Python loops that
compete for the GIL, as request handlers and other tasks do). Lateness is when
a run started minus when the schedule said it was due. Contenders:

- catzilla ``add_periodic_task(every=...)`` (4 workers);
- a hand-written thread loop with absolute deadlines, into a ThreadPoolExecutor;
- the common naive loop, ``time.sleep(period)`` then submit (it drifts);
- APScheduler 3 ``BackgroundScheduler`` with an interval trigger, from PyPI in
  its own venv (made on first use).

    python benches/bench_periodic.py [--period 0.02] [--runs 250] [--load 3]
    python benches/bench_periodic.py --quick     # 20 runs each: a check, not a figure

Prints p50/p99/max lateness per contender and the ratios of their p99 to
catzilla's; on this shared machine, compare ratios, not the lone times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchargs import BenchParser

BENCH_DIR = Path(__file__).resolve().parent


def busy(stop: threading.Event) -> None:
    """Pure-Python work in small slices: holds the GIL most of the time."""
    x = 0
    while not stop.is_set():
        for i in range(2000):
            x = (x * 31 + i) % 1_000_003


def measure(
    start: Callable[[Callable[[], None]], float], runs: int, period: float, load: int
) -> list[float]:
    """Starts a schedule with ``start(run)`` (which returns the first due time),
    waits for ``runs`` runs under load, and returns each run's lateness (s)."""
    stop = threading.Event()
    loaders = [threading.Thread(target=busy, args=(stop,), daemon=True) for _ in range(load)]
    for t in loaders:
        t.start()
    starts: list[float] = []
    lock = threading.Lock()
    done = threading.Event()

    def run() -> None:
        now = time.time()
        with lock:
            starts.append(now)
            if len(starts) >= runs:
                done.set()

    first_due = start(run)
    deadline = runs * period * 10 + 30
    finished = done.wait(deadline)
    stop.set()
    if not finished:
        raise RuntimeError(f"only {len(starts)} of {runs} runs started within {deadline:g} s")
    ordered = sorted(starts)[:runs]
    return [at - (first_due + k * period) for k, at in enumerate(ordered)]


def catzilla(runs: int, period: float, load: int) -> list[float]:
    from catzilla.background_tasks import BackgroundTasks

    engine = BackgroundTasks(workers=4, max_workers=4, enable_auto_scaling=False)

    def start(run: Callable[[], None]) -> float:
        p = engine.add_periodic_task(run, every=period, overlap=True, max_retries=0)
        assert p.next_run_at is not None
        return p.next_run_at

    try:
        return measure(start, runs, period, load)
    finally:
        engine.shutdown(wait_for_completion=False)


def thread_loop(runs: int, period: float, load: int, naive: bool) -> list[float]:
    pool = ThreadPoolExecutor(4)
    stop = threading.Event()

    def start(run: Callable[[], None]) -> float:
        first = time.time() + period

        def loop() -> None:
            due = first
            while not stop.is_set():
                if naive:
                    time.sleep(period)  # from whenever the previous submit happened
                else:
                    time.sleep(max(0.0, due - time.time()))
                    due += period
                pool.submit(run)

        threading.Thread(target=loop, daemon=True).start()
        return first

    try:
        return measure(start, runs, period, load)
    finally:
        stop.set()
        pool.shutdown(wait=False)


def apscheduler(runs: int, period: float, load: int) -> list[float]:
    from datetime import datetime, timedelta

    from apscheduler.schedulers.background import BackgroundScheduler  # type: ignore[import-not-found]

    scheduler = BackgroundScheduler()
    scheduler.start()

    def start(run: Callable[[], None]) -> float:
        first = datetime.now() + timedelta(seconds=period)
        scheduler.add_job(
            run,
            "interval",
            seconds=period,
            start_date=first,
            max_instances=runs,
            misfire_grace_time=None,
            coalesce=False,
        )
        return first.timestamp()

    try:
        return measure(start, runs, period, load)
    finally:
        scheduler.shutdown(wait=False)


CHILDREN: dict[str, Callable[[int, float, int], list[float]]] = {
    "catzilla": catzilla,
    "deadline-loop": lambda r, p, n: thread_loop(r, p, n, naive=False),
    "naive-sleep-loop": lambda r, p, n: thread_loop(r, p, n, naive=True),
    "apscheduler": apscheduler,
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_child(python: str, name: str, args: argparse.Namespace) -> list[float]:
    argv = [python, __file__, "--child", name, "--runs", str(args.runs)]
    argv += ["--period", str(args.period), "--load", str(args.load)]
    out = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=args.runs * args.period * 20 + 120,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {out.returncode}):\n{out.stdout}{out.stderr}")
    late: list[float] = json.loads(out.stdout.strip().splitlines()[-1])
    return late


def main(argv: Sequence[str] | None = None) -> int:
    parser = BenchParser(__doc__)
    parser.add_argument("--period", type=float, default=0.02, help="seconds between runs (0.02)")
    parser.add_size("--runs", type=int, full=250, quick=20, help="runs per contender")
    parser.add_argument("--load", type=int, default=3, help="busy Python threads (3)")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = parser.parse(argv)
    if args.period <= 0 or args.runs < 1 or args.load < 0:
        parser.error("need --period > 0, --runs >= 1 and --load >= 0")
    if args.child:
        print(json.dumps(CHILDREN[args.child](args.runs, args.period, args.load)))
        return 0
    from bench_http import APSCHEDULER_REQUIREMENTS, ensure_venv

    aps_python = ensure_venv(BENCH_DIR / ".venv-apscheduler", APSCHEDULER_REQUIREMENTS, False)
    results = {}
    for name in CHILDREN:
        python = str(aps_python) if name == "apscheduler" else sys.executable
        results[name] = run_child(python, name, args)
    print(
        f"lateness of {args.runs} runs every {args.period * 1000:.0f} ms, "
        f"{args.load} busy Python threads, one run; ms"
    )
    base = percentile(results["catzilla"], 0.99)
    print(f"  {'contender':18} {'p50':>8} {'p99':>8} {'max':>8}   p99 vs catzilla")
    for name, late in results.items():
        ms = [x * 1000 for x in late]
        p99 = percentile(late, 0.99)
        ratio = "" if name == "catzilla" else f"{p99 / base:8.1f}x later"
        print(
            f"  {name:18} {percentile(ms, 0.5):8.2f} {percentile(ms, 0.99):8.2f} "
            f"{max(ms):8.2f}   {ratio}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
