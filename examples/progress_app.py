"""Progress tracking with the engine's own task state: no hand-made dicts.

python examples/progress_app.py          # or: ... progress_app.py PORT
curl -X POST localhost:8000/imports -d '{"rows": 5000}'
curl localhost:8000/imports/<task_id>
curl 'localhost:8000/imports?status=running'
"""

from __future__ import annotations

import time
from typing import Any

from catzilla import Catzilla, HTTPError, JSONResponse, Path, Query, Request, Response
from catzilla.background_tasks import TaskStatus, current_task

app = Catzilla()
app.enable_background_tasks(workers=4)


def import_rows(rows: int) -> dict[str, int]:
    """Imports rows in batches and reports progress after each one."""
    task = current_task()
    batches = max(1, rows // 1000)
    for n in range(batches):
        time.sleep(0.5)  # one batch of database writes
        task.set_progress((n + 1) * 100 / batches, f"batch {n + 1}/{batches}")
    return {"imported": rows, "batches": batches}


@app.post("/imports")
def start_import(request: Request) -> Response:
    body = request.json()
    rows = body.get("rows") if isinstance(body, dict) else None
    if not isinstance(rows, int) or rows <= 0:
        raise HTTPError(422, "body must be a JSON object with a positive 'rows'")
    task = app.add_task(import_rows, rows)
    return JSONResponse({"task_id": task.task_id, "status_url": f"/imports/{task.task_id}"}, 202)


@app.get("/imports/{task_id}")
def import_status(request: Request, task_id: str = Path(...)) -> dict[str, Any]:
    info = app.get_task(task_id)
    if info is None:
        raise HTTPError(404, f"no import {task_id}")
    return info.to_dict()


@app.get("/imports")
def list_imports(request: Request, status: str = Query("")) -> dict[str, Any]:
    wanted = None
    if status:
        try:
            wanted = TaskStatus(status)
        except ValueError:
            raise HTTPError(422, f"unknown status {status!r}") from None
    tasks = app.list_tasks(status=wanted, limit=50)
    return {"imports": [t.to_dict() for t in tasks], "count": len(tasks)}


if __name__ == "__main__":
    import sys

    app.listen(port=int(sys.argv[1]) if len(sys.argv) > 1 else 8000)
