"""A burst of queued no-op tasks: memory per queued task, exactly-once, and
whether the memory comes back after the drain.

    python benches/burst.py                  # 1,000,000 tasks, the full scale
    python benches/burst.py --tasks 200000   # the CI scale (tests/test_load.py)
    python benches/burst.py --quick          # 20,000 tasks: a check of the script
    python benches/burst.py --json

Every worker is held by a blocking task, then the tasks are queued with their
handles dropped (as a user firing tasks does). Each task gets its index, an int
created before the first measurement, so the figure is the engine's cost per
queued task beyond the arguments: RSS delta / N, where the target is under
1 KiB. The workers are released, every task must run exactly once (one counter
per index: no duplicates, no gaps), and once the finished records have aged
out of retention (``result_ttl`` 1 s, ``memory_pool_mb`` 1) RSS should fall
back to within half the enqueue delta above the pre-burst RSS.

Exit code 0 only if all of that holds; every phase has a deadline.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from benchargs import BenchParser
from catzilla.background_tasks import BackgroundTasks

WORKERS = 2
PER_TASK_LIMIT = 1024  # bytes
FALL_BACK_RATIO = 0.5  # of the enqueue delta


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def poll(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= end:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Counter:
    """Runs counted under a lock (tasks run on several workers)."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.value += 1


def burst(n: int, drain_timeout: float) -> dict[str, Any]:
    per_index = bytearray(n)
    runs = Counter()
    release = threading.Event()
    held = threading.Semaphore(0)

    def hold() -> None:
        held.release()
        if not release.wait(drain_timeout):
            raise RuntimeError("the blocker was never released")

    def noop(i: int) -> None:
        per_index[i] += 1
        runs.add()

    indexes = list(range(n))  # the arguments exist before the first measurement
    engine = BackgroundTasks(
        workers=WORKERS,
        min_workers=WORKERS,
        max_workers=WORKERS,
        enable_auto_scaling=False,
        queue_size=n + 16,
        result_ttl=1.0,
        memory_pool_mb=1,
        exit_timeout=5,
    )
    try:
        for _ in range(WORKERS):
            engine.add_task(hold, timeout_ms=0)
        for _ in range(WORKERS):
            if not held.acquire(timeout=30):
                raise TimeoutError("the blocking tasks did not start")
        gc.collect()
        before = rss_bytes()
        start = time.perf_counter()
        add = engine.add_task
        for i in indexes:
            add(noop, i)  # the handle is dropped at once
        enqueue_s = time.perf_counter() - start
        gc.collect()
        queued = rss_bytes()
        stats = engine.get_stats()
        assert stats.total_queued == n, stats.total_queued
        peak = queued

        release.set()
        start = time.perf_counter()

        def all_ran() -> bool:
            nonlocal peak
            peak = max(peak, rss_bytes())
            return runs.value >= n

        poll(all_ran, drain_timeout, f"{n} tasks to run")
        drain_s = time.perf_counter() - start
        poll(lambda: engine.get_stats().running_tasks == 0, 30, "the blockers to finish")
        poll(lambda: engine.get_stats().retained_results == 0, 60, "retention to empty")
        gc.collect()
        delta = queued - before
        bound = before + FALL_BACK_RATIO * delta
        try:  # give a lazy release a chance; no fixed sleep
            poll(lambda: rss_bytes() <= bound, 5, "RSS to fall back", interval=0.1)
        except TimeoutError:
            pass
        after = rss_bytes()
        stats = engine.get_stats()
        missing = per_index.count(0)
        duplicated = n - missing - per_index.count(1)
        per_task = delta / n
        fell_back = after <= bound
        return {
            "tasks": n,
            "enqueue_s": round(enqueue_s, 3),
            "drain_s": round(drain_s, 3),
            "bytes_per_queued_task": round(per_task, 1),
            "rss_mb": {
                "before": round(before / 2**20, 1),
                "queued": round(queued / 2**20, 1),
                "peak": round(peak / 2**20, 1),
                "after_drain": round(after / 2**20, 1),
            },
            "retained_after_drain": round((after - before) / delta, 3) if delta else 0.0,
            "missing": missing,
            "duplicated": duplicated,
            "runs": runs.value,
            "stats": {
                "total_tasks_submitted": stats.total_tasks_submitted,
                "total_tasks_processed": stats.total_tasks_processed,
                "failed_tasks": stats.failed_tasks,
                "evicted_results": stats.evicted_results,
            },
            "checks": {
                "memory_per_task": per_task < PER_TASK_LIMIT,
                "exactly_once": missing == 0 and duplicated == 0 and runs.value == n,
                "rss_falls_back": fell_back,
            },
        }
    finally:
        release.set()
        engine.shutdown(wait_for_completion=False, timeout=5)


def main(argv: list[str] | None = None) -> int:
    parser = BenchParser(__doc__)
    parser.add_size("--tasks", type=int, full=1_000_000, quick=20_000, help="tasks")
    parser.add_argument("--drain-timeout", type=float, default=300, help="seconds to run them")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse(argv)
    if args.tasks < 1:
        parser.error("--tasks must be >= 1")
    result = burst(args.tasks, args.drain_timeout)
    ok = all(result["checks"].values())
    if args.json:
        print(json.dumps(result | {"ok": ok}, indent=2))
        return 0 if ok else 1
    rss = result["rss_mb"]
    print(f"burst of {result['tasks']} no-op tasks on {WORKERS} held workers")
    print(f"  enqueue {result['enqueue_s']} s, drain {result['drain_s']} s")
    print(
        f"  memory per queued task: {result['bytes_per_queued_task']} bytes"
        f" (target < {PER_TASK_LIMIT})"
    )
    print(
        f"  RSS MB: before {rss['before']}, queued {rss['queued']}, peak {rss['peak']},"
        f" after drain {rss['after_drain']}"
        f" ({result['retained_after_drain']:.0%} of the enqueue delta still held;"
        f" target <= {FALL_BACK_RATIO:.0%})"
    )
    print(
        f"  runs {result['runs']}, missing {result['missing']}, duplicated {result['duplicated']}"
    )
    for name, passed in result["checks"].items():
        print(f"  {'ok  ' if passed else 'FAIL'} {name}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
