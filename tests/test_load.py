"""Load: a burst of queued tasks, concurrent producers, a mixed soak and HTTP
load, at CI scale. The full-scale runs are the scripts in benches/:
``burst.py`` (1,000,000 tasks), ``soak.py`` (600 s) and ``http_load.py``
(wrk, 256 connections, 30 s).

Timings are bounded generously and never asserted; memory figures are printed
(``pytest -s`` shows them).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import http.client
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from catzilla.background_tasks import BackgroundTasks
from conftest import Blocker, ServerProcess, wait_until

BENCHES = Path(__file__).resolve().parent.parent / "benches"
SOAK_APP = BENCHES / "soak_app.py"

BURST_TASKS = 200_000  # benches/burst.py runs the full 1,000,000
BURST_WORKERS = 2
PER_TASK_LIMIT = 1024  # bytes of RSS per queued task, beyond its arguments
FALL_BACK_RATIO = 0.5  # RSS after the drain: within this share of the enqueue delta

PRODUCERS = 8
PRODUCED_TASKS = 100_000

SOAK_SECONDS = 60

HTTP_CONNECTIONS = 256
HTTP_SECONDS = 10.0


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class RunCounter:
    """A thread-safe count of task runs."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.value += 1


def hold_workers(engine: BackgroundTasks, workers: int, limit: float = 120) -> list[Blocker]:
    """Occupies every worker with a Blocker and waits until each has started."""
    blockers = [Blocker(limit) for _ in range(workers)]
    for b in blockers:
        engine.add_task(b, timeout_ms=0)
    for b in blockers:
        b.wait_started(30)
    return blockers


# Task burst


@dataclass
class Burst:
    n: int
    before: int
    queued: int
    peak: int
    after: int
    per_index: bytearray
    runs: int
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def per_task(self) -> float:
        return (self.queued - self.before) / self.n

    @property
    def retained_share(self) -> float:
        return (self.after - self.before) / (self.queued - self.before)

    def report(self) -> str:
        mb = 2**20
        return (
            f"burst of {self.n} no-op tasks: {self.per_task:.0f} bytes per queued task;"
            f" RSS before {self.before / mb:.1f} MB, queued {self.queued / mb:.1f} MB,"
            f" peak {self.peak / mb:.1f} MB, after the drain {self.after / mb:.1f} MB"
            f" ({self.retained_share:.0%} of the enqueue delta still held)"
        )


@pytest.fixture(scope="module")
def burst() -> Iterator[Burst]:
    """Queues BURST_TASKS no-op tasks behind held workers (handles dropped),
    measuring RSS around it, then lets them run and waits until they all have
    and the finished records have aged out of retention."""
    n = BURST_TASKS
    per_index = bytearray(n)
    runs = RunCounter()

    def noop(i: int) -> None:
        per_index[i] += 1
        runs.add()

    indexes = list(range(n))  # the arguments exist before the first measurement
    engine = BackgroundTasks(
        workers=BURST_WORKERS,
        min_workers=BURST_WORKERS,
        max_workers=BURST_WORKERS,
        enable_auto_scaling=False,
        queue_size=n + 16,
        result_ttl=1.0,
        memory_pool_mb=1,
        exit_timeout=5,
    )
    blockers: list[Blocker] = []
    try:
        blockers = hold_workers(engine, BURST_WORKERS)
        gc.collect()
        before = rss_bytes()
        add = engine.add_task
        for i in indexes:
            add(noop, i)  # the handle is dropped, as a user firing tasks does
        gc.collect()
        queued = rss_bytes()
        assert engine.get_stats().total_queued == n
        peak = queued

        for b in blockers:
            b.release()

        def all_ran() -> bool:
            nonlocal peak
            peak = max(peak, rss_bytes())
            return runs.value >= n

        wait_until(all_ran, timeout=120, interval=0.01, what=f"{n} tasks to run")
        wait_until(lambda: engine.get_stats().running_tasks == 0, what="the blockers to end")
        wait_until(
            lambda: engine.get_stats().retained_results == 0,
            timeout=60,
            what="retention to evict every finished record",
        )
        gc.collect()
        bound = before + FALL_BACK_RATIO * (queued - before)
        with contextlib.suppress(pytest.fail.Exception):  # a lazy release gets 5 s
            wait_until(lambda: rss_bytes() <= bound, timeout=5, interval=0.1)
        s = engine.get_stats()
        result = Burst(
            n=n,
            before=before,
            queued=queued,
            peak=peak,
            after=rss_bytes(),
            per_index=per_index,
            runs=runs.value,
            stats={
                "submitted": s.total_tasks_submitted,
                "processed": s.total_tasks_processed,
                "failed": s.failed_tasks,
                "running": s.running_tasks,
                "queued": s.total_queued,
            },
        )
        yield result
    finally:
        for b in blockers:
            b.release()
        engine.shutdown(wait_for_completion=False, timeout=5)


@pytest.mark.slow
def test_burst_memory_per_queued_task_is_under_1_kib(burst: Burst):
    print(f"\n{burst.report()}")
    assert burst.per_task < PER_TASK_LIMIT, burst.report()


@pytest.mark.slow
def test_burst_runs_every_task_exactly_once(burst: Burst):
    missing = burst.per_index.count(0)
    duplicated = burst.n - missing - burst.per_index.count(1)
    assert (missing, duplicated) == (0, 0)
    assert burst.runs == burst.n
    total = burst.n + BURST_WORKERS  # and the blockers
    assert burst.stats == {
        "submitted": total,
        "processed": total,
        "failed": 0,
        "running": 0,
        "queued": 0,
    }


@pytest.mark.slow
def test_burst_rss_falls_back_after_the_drain(burst: Burst):
    print(f"\n{burst.report()}")
    assert burst.retained_share <= FALL_BACK_RATIO, burst.report()


# Concurrent producers


@pytest.mark.slow
def test_concurrent_producers_every_task_unique_and_run_once(
    make_engine: Callable[..., BackgroundTasks],
):
    engine = make_engine(
        workers=4,
        max_workers=4,
        enable_auto_scaling=False,
        queue_size=PRODUCED_TASKS + 16,
    )
    per_index = bytearray(PRODUCED_TASKS)
    runs = RunCounter()

    def noop(i: int) -> None:
        per_index[i] += 1
        runs.add()

    share = PRODUCED_TASKS // PRODUCERS
    barrier = threading.Barrier(PRODUCERS)
    ids: list[list[str]] = [[] for _ in range(PRODUCERS)]
    errors: list[BaseException] = []

    def produce(k: int) -> None:
        mine = ids[k]
        add = engine.add_task
        try:
            barrier.wait(30)
            for i in range(k * share, (k + 1) * share):
                mine.append(add(noop, i).task_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(PRODUCERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a producer is stuck in add_task"
    assert not errors, errors
    all_ids = [task_id for mine in ids for task_id in mine]
    assert len(all_ids) == PRODUCED_TASKS
    assert len(set(all_ids)) == PRODUCED_TASKS, "task ids are not unique"

    wait_until(lambda: runs.value >= PRODUCED_TASKS, timeout=120, what="every task to run")
    wait_until(lambda: engine.get_stats().running_tasks == 0, what="the last tasks to end")
    missing = per_index.count(0)
    duplicated = PRODUCED_TASKS - missing - per_index.count(1)
    assert (missing, duplicated) == (0, 0)
    s = engine.get_stats()
    assert s.total_tasks_submitted == PRODUCED_TASKS
    assert s.total_tasks_processed == PRODUCED_TASKS
    assert (s.failed_tasks, s.cancelled_tasks, s.rejected_tasks, s.total_queued) == (0, 0, 0, 0)
    assert runs.value == PRODUCED_TASKS


# Soak


@pytest.mark.slow
def test_soak_mixed_load_ci_scale():
    cmd = [sys.executable, str(BENCHES / "soak.py"), "--duration", str(SOAK_SECONDS), "--json"]
    # soak.py's own watchdog ends it well within this; the timeout is a last resort.
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=SOAK_SECONDS + 240, check=False
    )
    print(proc.stderr)
    assert proc.stdout.strip(), f"soak.py printed no summary (exit {proc.returncode})"
    summary = json.loads(proc.stdout)
    assert summary["checks"]["stats_add_up"], summary["failures"]
    assert summary["checks"]["rss_flat"], summary["rss_mb"]
    assert summary["ok"], summary["failures"]
    assert proc.returncode == 0, proc.stderr
    assert summary["tasks_total"] == summary["stats"]["total_tasks_submitted"]
    assert summary["tasks_total"] > 0 and summary["requests_total"] > 0


# HTTP load


@dataclass
class LoadResult:
    statuses: Counter[int] = field(default_factory=Counter)
    task_ids: list[bytes] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    connections: int = 0

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())


async def keep_alive_load(
    host: str, port: int, path: str, connections: int, seconds: float
) -> LoadResult:
    """POSTs ``path`` on ``connections`` keep-alive connections, one request at
    a time on each, for ``seconds``; every connection finishes its last request
    before it closes, so nothing is left in flight."""
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: 0\r\n\r\n").encode()
    result = LoadResult()
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + seconds

    async def one(k: int) -> None:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            result.errors.append(f"connection {k}: connect: {exc!r}")
            return
        result.connections += 1
        try:
            while loop.time() < stop_at:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split(" ", 2)[1])
                headers = {
                    name.strip().lower(): value.strip()
                    for name, _, value in (line.partition(":") for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                result.statuses[status] += 1
                if status == 200:
                    result.task_ids.append(body)
                if headers.get("connection", "").lower() == "close":
                    result.errors.append(f"connection {k}: the server closed keep-alive")
                    return
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            result.errors.append(f"connection {k}: {exc!r}")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    await asyncio.wait_for(
        asyncio.gather(*(one(k) for k in range(connections))), timeout=seconds + 60
    )
    return result


def fetch(host: str, port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200, (r.status, body)
        return body
    finally:
        conn.close()


@pytest.mark.slow
def test_http_load_keep_alive_no_errors_no_lost_tasks(spawn: Callable[..., ServerProcess]):
    server = spawn([str(SOAK_APP)])
    host, port = server.wait_serving()
    started = time.monotonic()
    result = asyncio.run(keep_alive_load(host, port, "/task", HTTP_CONNECTIONS, HTTP_SECONDS))
    took = time.monotonic() - started

    def counts() -> dict[str, Any]:
        return json.loads(fetch(host, port, "/counts"))

    def settled() -> dict[str, Any] | None:
        c = counts()
        s = c["stats"]
        done = s["total_tasks_processed"] + s["failed_tasks"] + s["cancelled_tasks"]
        idle = s["total_queued"] == 0 and s["running_tasks"] == 0
        return c if idle and done == s["total_tasks_submitted"] else None

    c = wait_until(settled, timeout=60, interval=0.05, what="the app's tasks to drain")
    s = c["stats"]
    print(
        f"\nHTTP load: {result.answered} requests on {result.connections} keep-alive"
        f" connections in {took:.1f} s; app: {c['submitted'].get('http', 0)} tasks submitted,"
        f" {c['attempts'].get('http', 0)} ran; engine: submitted {s['total_tasks_submitted']},"
        f" processed {s['total_tasks_processed']}"
    )
    assert not result.errors, result.errors[:10]
    assert result.connections == HTTP_CONNECTIONS
    assert set(result.statuses) == {200}, result.statuses
    assert result.answered > 0
    task_ids = {json.loads(body)["task_id"] for body in result.task_ids}
    assert len(task_ids) == result.answered, "a task id was answered twice"
    # No lost tasks: one task per answered request, each run once.
    assert c["submitted"] == {"http": result.answered}
    assert c["attempts"] == {"http": result.answered}
    assert s["total_tasks_submitted"] == result.answered
    assert s["total_tasks_processed"] == result.answered
    assert (s["failed_tasks"], s["cancelled_tasks"], s["rejected_tasks"]) == (0, 0, 0)
    assert server.stop() == 0
