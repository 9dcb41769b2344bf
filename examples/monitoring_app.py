"""Monitoring a catzilla app: the live dashboard, Prometheus metrics, a task
event hook, and a task's progress streamed to the browser (Server-Sent Events).

python examples/monitoring_app.py              # or: ... monitoring_app.py PORT
open http://127.0.0.1:8000/_catzilla           # the dashboard (loopback: no token)
curl localhost:8000/metrics                    # Prometheus text
curl -X POST localhost:8000/reports            # queue a report; answers its id
curl -N localhost:8000/reports/<id>/events     # its progress, live, until it ends
curl localhost:8000/failures                   # what the failure hook saw
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from catzilla import (
    Catzilla,
    EventSourceResponse,
    HTTPError,
    JSONResponse,
    Request,
    Response,
    ServerSentEvent,
)
from catzilla.background_tasks import current_task
from catzilla.events import TaskEvent

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
log = logging.getLogger("monitoring_app")

app = Catzilla()
app.enable_background_tasks(workers=4)
app.enable_metrics()
app.enable_dashboard()  # no token: served on 127.0.0.1 only

failures: deque[dict[str, Any]] = deque(maxlen=50)


@app.on_task_event("failed", "timed_out")
def remember_failure(event: TaskEvent) -> None:
    """Where Sentry or a pager would be called."""
    failures.append(
        {
            "task_id": event.task_id,
            "name": event.name,
            "kind": event.kind,
            "error": repr(event.error),
        }
    )
    log.warning("task %s (%s) %s: %r", event.task_id, event.name, event.kind, event.error)


def build_report(pages: int) -> dict[str, int]:
    """A slow job that reports its progress, and fails now and then."""
    task = current_task()
    for page in range(1, pages + 1):
        time.sleep(0.05)
        if task is not None:
            task.set_progress(100.0 * page / pages, f"page {page} of {pages}")
    if random.random() < 0.2:
        raise RuntimeError("the printer caught fire")
    return {"pages": pages}


@app.post("/reports")
def queue_report(request: Request) -> Response:
    pages = int(request.query_params.get("pages", "20"))
    task = app.add_task(build_report, pages, max_retries=0)
    return JSONResponse({"task_id": task.task_id}, status_code=202)


@app.get("/reports/{task_id}/events")
def report_events(request: Request, task_id: str) -> Response:
    """The report's progress as Server-Sent Events, ending with its outcome."""
    if app.get_task(task_id) is None:
        raise HTTPError(404, f"no task {task_id}")

    async def progress() -> AsyncIterator[ServerSentEvent]:
        last = None
        while True:
            info = app.get_task(task_id)
            if info is None:
                return
            now = (info.status.value, info.progress, info.current_step)
            if now != last:
                last = now
                yield ServerSentEvent(
                    {"status": now[0], "progress": now[1], "step": now[2]}, event="progress"
                )
            if info.status.value in ("completed", "failed", "cancelled"):
                yield ServerSentEvent(info.to_dict(), event="done")
                return
            await asyncio.sleep(0.1)

    return EventSourceResponse(progress())


@app.get("/failures")
def list_failures(request: Request) -> Response:
    return JSONResponse(list(failures))


if __name__ == "__main__":
    app.listen(port=int(sys.argv[1]) if len(sys.argv) > 1 else 8000, host="127.0.0.1")
