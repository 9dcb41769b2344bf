"""Results that survive a restart: the engine keeps every task in SQLite.

    python examples/persistent_results_app.py        # or: ... PORT
    curl -X POST localhost:8000/calculations -d '{"n": 1000000}'
    curl localhost:8000/calculations/<task_id>        # also after a restart

Stop the server while calculations are queued and start it again: they run
again (listen() recovers them), and finished results are still there.
"""

from __future__ import annotations

import os
from typing import Any

from catzilla import Catzilla, HTTPError, JSONResponse, Path, Request, Response
from catzilla.background_tasks import current_task

DB = os.environ.get("CATZILLA_EXAMPLE_DB", "catzilla-example-tasks.db")

app = Catzilla()
app.enable_background_tasks(workers=2, storage=f"sqlite:///{DB}")


def sum_of_squares(n: int) -> dict[str, int]:
    """A CPU-bound calculation that reports its progress."""
    total = 0
    step = max(1, n // 10)
    for start in range(0, n, step):
        total += sum(i * i for i in range(start, min(start + step, n)))
        current_task().set_progress(min(100.0, (start + step) * 100 / n))
    return {"n": n, "sum_of_squares": total}


@app.post("/calculations")
def start(request: Request) -> Response:
    body = request.json()
    n = body.get("n") if isinstance(body, dict) else None
    if not isinstance(n, int) or not 0 < n <= 50_000_000:
        raise HTTPError(422, "body must be a JSON object with 'n' between 1 and 50,000,000")
    task = app.add_task(sum_of_squares, n)
    return JSONResponse({"task_id": task.task_id}, status_code=202)


@app.get("/calculations/{task_id}")
def result(request: Request, task_id: str = Path(...)) -> dict[str, Any]:
    info = app.get_task(task_id)
    if info is None:
        raise HTTPError(404, f"no calculation {task_id}")
    return info.to_dict()


@app.get("/calculations")
def recent(request: Request) -> dict[str, Any]:
    return {"calculations": [t.to_dict() for t in app.list_tasks(limit=20)]}


if __name__ == "__main__":
    import sys

    app.listen(port=int(sys.argv[1]) if len(sys.argv) > 1 else 8000)
