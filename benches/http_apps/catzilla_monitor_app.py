"""GET /json and POST /burst on this project's catzilla, with monitoring on or off.

Run by ``benches/bench_monitoring.py``:

    python catzilla_monitor_app.py PORT off|on|hook

``on`` enables Prometheus metrics (``/metrics``) and the dashboard
(``/_catzilla``, token ``bench-token-0``); ``hook`` also registers a task
event hook called for every finished task; ``off`` enables none of them.
``POST /burst?n=N`` queues N no-op tasks, waits until all have finished, and
answers how long that took, measured in the server.
"""

from __future__ import annotations

import sys
import time

from catzilla import Catzilla, JSONResponse, Request, Response
from catzilla.events import TaskEvent

app = Catzilla()
app.enable_background_tasks(
    workers=4, min_workers=4, max_workers=4, enable_auto_scaling=False, queue_size=1_000_000
)
seen = [0]

if sys.argv[2] in ("on", "hook"):
    app.enable_metrics()
    app.enable_dashboard(token="bench-token-0")

if sys.argv[2] == "hook":

    @app.on_task_event("succeeded")
    def count(event: TaskEvent) -> None:
        seen[0] += 1


def noop() -> None:
    return None


@app.get("/json")
def json_route(request: Request) -> Response:
    return JSONResponse({"message": "Hello, World!"})


@app.post("/burst")
def burst(request: Request) -> Response:
    n = int(request.query_params.get("n", "10000"))
    started = time.perf_counter()
    handles = [app.add_task(noop) for _ in range(n)]
    for handle in handles:
        handle.wait(60)
    return JSONResponse({"seconds": time.perf_counter() - started, "hook_seen": seen[0]})


if __name__ == "__main__":
    app.listen(port=int(sys.argv[1]), host="127.0.0.1")
