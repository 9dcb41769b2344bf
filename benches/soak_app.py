"""The app that the load benches and tests/test_load.py drive over HTTP.

    python benches/soak_app.py [PORT]        # default 0: a free port

It prints ``catzilla serving on http://HOST:PORT`` once it listens and stops
gracefully on SIGINT or SIGTERM. SIGUSR1 dumps every thread's Python stack to
stderr (the soak's watchdog uses it when something hangs).

Routes:

* ``POST /task``: queues one no-op task; answers ``{"task_id": ...}``.
* ``POST /mix/{kind}?n=N``: queues ``N`` tasks of one kind (see ``KINDS``);
  answers ``{"kind": ..., "submitted": N}``. A full queue answers 503.
* ``GET /counts``: what the app counted (tasks submitted per kind, attempts
  started per kind) and the engine's statistics.

Retention is kept short (``result_ttl`` 5 s, ``memory_pool_mb`` 32) so that
the records of finished tasks reach a steady state within seconds: a soak
then measures leaks, not the retention budget filling up.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any

from catzilla import Catzilla, JSONResponse, Query, Request, Response
from catzilla.background_tasks import TaskQueueFullError, current_task

#: What ``POST /mix/{kind}`` queues, and how each kind ends.
KINDS = (
    "sync",  # completes
    "async",  # coroutine, completes
    "fail",  # raises, no retries: failed
    "retry",  # first attempt raises, the retry completes
    "delayed",  # delay_ms 10-300, completes
    "timeout_sync",  # timeout_ms 20, sleeps longer in small steps: failed (timeout)
    "timeout_async",  # timeout_ms 20, awaits a long sleep: failed (timeout)
    "cancel",  # delayed an hour, then cancelled: cancelled, never runs
)
TIMEOUT_MS = 20
QUEUE_SIZE = 200_000

app = Catzilla(handler_threads=4, max_pending_requests=8192)
engine = app.enable_background_tasks(
    workers=4,
    min_workers=4,
    max_workers=8,
    queue_size=QUEUE_SIZE,
    result_ttl=5.0,
    memory_pool_mb=32,
    retry_backoff_ms=20,
    retry_backoff_cap_ms=100,
    exit_timeout=30,
)

_lock = threading.Lock()
submitted: Counter[str] = Counter()  # tasks accepted by add_task, per kind
attempts: Counter[str] = Counter()  # task bodies started, per kind


def count(counter: Counter[str], kind: str, n: int = 1) -> None:
    with _lock:
        counter[kind] += n


# Task bodies


def noop_task() -> None:
    count(attempts, "http")


def sync_task(n: int) -> int:
    count(attempts, "sync")
    return sum(range(n))


async def async_task(ms: float) -> str:
    count(attempts, "async")
    await asyncio.sleep(ms / 1000)
    return "done"


def failing_task() -> None:
    count(attempts, "fail")
    raise ValueError("soak: this task fails on purpose")


def flaky_task() -> str:
    count(attempts, "retry")
    if current_task().attempts < 2:
        raise RuntimeError("soak: the first attempt fails on purpose")
    return "recovered"


def delayed_task() -> None:
    count(attempts, "delayed")


def slow_sync_task() -> None:
    count(attempts, "timeout_sync")
    end = time.monotonic() + 5.0
    while time.monotonic() < end:  # short sleeps, so the timeout's interrupt lands
        time.sleep(0.002)


async def slow_async_task() -> None:
    count(attempts, "timeout_async")
    await asyncio.sleep(5.0)


def never_runs() -> None:
    count(attempts, "cancel")


def enqueue(kind: str, i: int) -> None:
    """Queues one task of ``kind``; raises ``LookupError`` for an unknown kind."""
    add = engine.add_task
    if kind == "sync":
        add(sync_task, 50 + i % 50)
    elif kind == "async":
        add(async_task, 1 + i % 10)
    elif kind == "fail":
        add(failing_task, max_retries=0)
    elif kind == "retry":
        add(flaky_task, max_retries=3)
    elif kind == "delayed":
        add(delayed_task, delay_ms=10 + (i * 37) % 290)
    elif kind == "timeout_sync":
        add(slow_sync_task, timeout_ms=TIMEOUT_MS, max_retries=0)
    elif kind == "timeout_async":
        add(slow_async_task, timeout_ms=TIMEOUT_MS, max_retries=0)
    elif kind == "cancel":
        handle = add(never_runs, delay_ms=3_600_000)
        if not handle.cancel():
            raise RuntimeError(f"cancel() of scheduled task {handle.task_id} returned False")
    else:
        raise LookupError(kind)


# Routes


@app.post("/task")
def one_task(request: Request) -> Response:
    try:
        handle = engine.add_task(noop_task)
    except TaskQueueFullError:
        return JSONResponse({"error": "queue full"}, status_code=503)
    count(submitted, "http")
    return JSONResponse({"task_id": handle.task_id})


@app.post("/mix/{kind}")
def mix(request: Request, kind: str, n: int = Query(1)) -> Response:
    if kind not in KINDS:
        return JSONResponse({"error": f"unknown kind {kind!r}"}, status_code=404)
    done = 0
    try:
        for i in range(n):
            enqueue(kind, i)
            done += 1
    except TaskQueueFullError:
        return JSONResponse({"error": "queue full", "submitted": done}, status_code=503)
    except Exception as exc:
        return JSONResponse({"error": repr(exc), "submitted": done}, status_code=500)
    finally:
        count(submitted, kind, done)
    return JSONResponse({"kind": kind, "submitted": done})


@app.get("/counts")
def counts(request: Request) -> dict[str, Any]:
    with _lock:
        sub, att = dict(submitted), dict(attempts)
    return {
        "pid": os.getpid(),
        "submitted": sub,
        "attempts": att,
        "stats": engine.get_stats().to_dict(),
    }


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    app.listen(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0, host="127.0.0.1")
