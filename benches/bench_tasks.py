"""Background task engine vs concurrent.futures.ThreadPoolExecutor, side by side.

Run on a release build (``pip install .`` or ``maturin develop --release``):

    python benches/bench_tasks.py            # full size
    python benches/bench_tasks.py --quick    # tiny sizes, 1 round: a check, not a figure

Every figure is the median of several rounds; each row prints both systems and
the ratio, so the comparison holds on a noisy machine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from benchargs import BenchParser
from catzilla.background_tasks import BackgroundTasks

WORKERS = 4


def noop() -> None:
    return None


def sleep_10ms() -> None:
    time.sleep(0.01)


async def async_sleep_10ms() -> None:
    await asyncio.sleep(0.01)


def run_async_sleep_10ms() -> None:
    """The coroutine on a thread pool: one event loop per task."""
    asyncio.run(async_sleep_10ms())


def engine(queue_size: int) -> BackgroundTasks:
    return BackgroundTasks(
        workers=WORKERS,
        min_workers=WORKERS,
        max_workers=WORKERS,
        enable_auto_scaling=False,
        queue_size=queue_size,
        exit_timeout=5,
    )


def median_of(rounds: int, run: Callable[[], float]) -> float:
    return statistics.median(run() for _ in range(rounds))


def cz_enqueue(n: int) -> float:
    bt = engine(n + 1)
    add = bt.add_task
    start = time.perf_counter()
    results = [add(noop) for _ in range(n)]
    took = time.perf_counter() - start
    for r in results:
        r.wait(60)
    bt.shutdown(timeout=10)
    return took


def tpe_enqueue(n: int) -> float:
    with cf.ThreadPoolExecutor(WORKERS) as pool:
        submit = pool.submit
        start = time.perf_counter()
        futures = [submit(noop) for _ in range(n)]
        took = time.perf_counter() - start
        cf.wait(futures)
    return took


def cz_end_to_end(n: int, func: Callable[[], object] = noop) -> float:
    bt = engine(n + 1)
    add = bt.add_task
    start = time.perf_counter()
    results = [add(func) for _ in range(n)]
    for r in results:
        r.wait(120)
    took = time.perf_counter() - start
    bt.shutdown(timeout=10)
    return took


def tpe_end_to_end(n: int, func: Callable[[], object] = noop) -> float:
    with cf.ThreadPoolExecutor(WORKERS) as pool:
        start = time.perf_counter()
        futures = [pool.submit(func) for _ in range(n)]
        cf.wait(futures)
        return time.perf_counter() - start


def latencies(submit: Callable[[Callable[[], None]], object], n: int) -> list[float]:
    """Submit n tasks 1 ms apart; each records when it started."""
    started: list[float] = [0.0] * n
    queued: list[float] = [0.0] * n
    handles = []
    for i in range(n):

        def job(i: int = i) -> None:
            started[i] = time.perf_counter()

        queued[i] = time.perf_counter()
        handles.append(submit(job))
        time.sleep(0.001)
    deadline = time.perf_counter() + 30
    while any(s == 0.0 for s in started) and time.perf_counter() < deadline:
        time.sleep(0.01)
    if any(s == 0.0 for s in started):
        raise RuntimeError(f"{started.count(0.0)} of {n} tasks did not start within 30 s")
    return sorted((s - q) * 1e6 for s, q in zip(started, queued, strict=True))


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def row(name: str, ours: float, theirs: float, unit: str, higher_is_better: bool) -> None:
    ratio = (ours / theirs) if higher_is_better else (theirs / ours)
    print(f"{name:<34} {ours:>12.1f} {theirs:>12.1f} {unit:<9} {ratio:>7.2f}x")


def main(argv: Sequence[str] | None = None) -> int:
    parser = BenchParser(__doc__)
    parser.add_size("--tasks", type=int, full=100_000, quick=2_000, help="no-op tasks")
    parser.add_size("--sleep-tasks", type=int, full=200, quick=40, help="10 ms sleeping tasks")
    parser.add_size(
        "--latency-tasks", type=int, full=1000, quick=100, help="tasks 1 ms apart for latency"
    )
    parser.add_size("--rounds", type=int, full=5, quick=1, help="rounds (the median is shown)")
    args = parser.parse(argv)
    if min(args.tasks, args.sleep_tasks, args.latency_tasks, args.rounds) < 1:
        parser.error("every size must be >= 1")
    n, sleepers, rounds = args.tasks, args.sleep_tasks, args.rounds

    print(f"catzilla engine vs ThreadPoolExecutor({WORKERS}); median of {rounds} rounds")
    print(f"{'benchmark':<34} {'catzilla':>12} {'TPE':>12} {'unit':<9} {'ratio':>8}")
    print("(ratio: how many times better catzilla is; >1 means catzilla wins)")

    ours = n / median_of(rounds, lambda: cz_enqueue(n))
    theirs = n / median_of(rounds, lambda: tpe_enqueue(n))
    row(f"enqueue {n} no-op tasks", ours, theirs, "tasks/s", True)

    ours = n / median_of(rounds, lambda: cz_end_to_end(n))
    theirs = n / median_of(rounds, lambda: tpe_end_to_end(n))
    row(f"end-to-end {n} no-op tasks", ours, theirs, "tasks/s", True)

    ours = median_of(rounds, lambda: cz_end_to_end(sleepers, sleep_10ms)) * 1000
    theirs = median_of(rounds, lambda: tpe_end_to_end(sleepers, sleep_10ms)) * 1000
    row(f"{sleepers} x time.sleep(10 ms)", ours, theirs, "ms", False)

    ours = median_of(rounds, lambda: cz_end_to_end(sleepers, async_sleep_10ms)) * 1000
    tpe_async = median_of(rounds, lambda: tpe_end_to_end(sleepers, run_async_sleep_10ms)) * 1000
    row(f"{sleepers} x asyncio.sleep(10 ms)", ours, tpe_async, "ms", False)

    bt = engine(max(10_000, args.latency_tasks + 1))
    cz = latencies(bt.add_task, args.latency_tasks)
    bt.shutdown(timeout=10)
    with cf.ThreadPoolExecutor(WORKERS) as pool:
        tpe = latencies(pool.submit, args.latency_tasks)
    row("start latency p50 (1 ms spacing)", pct(cz, 0.5), pct(tpe, 0.5), "us", False)
    row("start latency p99 (1 ms spacing)", pct(cz, 0.99), pct(tpe, 0.99), "us", False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
