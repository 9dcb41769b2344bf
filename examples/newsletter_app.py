"""A small web app: routes, request data, responses, errors, and background
tasks started from routes.

    python examples/newsletter_app.py        # or: ... newsletter_app.py PORT
    curl -X POST localhost:8000/subscribers -d '{"email": "ann@example.com"}'
    curl localhost:8000/tasks/<task_id>
    curl -X POST 'localhost:8000/reports?rows=5000'
    curl localhost:8000/hello/Ann
    curl localhost:8000/stats
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from catzilla import (
    Catzilla,
    HTMLResponse,
    HTTPError,
    JSONResponse,
    Path,
    Query,
    Request,
    Response,
    TaskPriority,
)

app = Catzilla(max_body_size=64 * 1024)
app.enable_background_tasks(workers=4)

subscribers: set[str] = set()


def send_welcome_email(email: str) -> dict[str, str]:
    """Pretends to talk to an SMTP server."""
    time.sleep(0.2)
    print(f"✉️  welcome e-mail sent to {email}", flush=True)
    return {"sent_to": email}


async def build_report(rows: int) -> dict[str, int]:
    """Pretends to page through a slow API."""
    total = 0
    for page in range(0, rows, 1000):
        await asyncio.sleep(0.05)
        total += sum(range(page, min(page + 1000, rows)))
    return {"rows": rows, "total": total}


@app.get("/")
def home(request: Request) -> dict[str, Any]:
    return {"app": "newsletter", "subscribers": len(subscribers)}


@app.post("/subscribers")
def subscribe(request: Request) -> Response:
    data = request.json()  # invalid JSON answers 400 by itself
    email = data.get("email") if isinstance(data, dict) else None
    if not isinstance(email, str) or "@" not in email:
        raise HTTPError(422, "body must be a JSON object with an 'email' address")
    if email in subscribers:
        return JSONResponse({"error": f"{email} is already subscribed"}, status_code=409)
    subscribers.add(email)
    task = app.add_task(send_welcome_email, email, priority=TaskPriority.HIGH, max_retries=5)
    return JSONResponse(
        {"subscribed": email, "task_id": task.task_id},
        status_code=202,
        headers={"Location": f"/tasks/{task.task_id}"},
    )


@app.post("/reports")
def start_report(request: Request, rows: int = Query(1000)) -> Response:
    if rows <= 0:
        raise HTTPError(422, "rows must be positive")
    task = app.add_task(build_report, rows, priority=TaskPriority.LOW, timeout_ms=60_000)
    return JSONResponse({"task_id": task.task_id}, status_code=202)


@app.get("/tasks/{task_id}")
def task_status(request: Request, task_id: str = Path(...)) -> dict[str, Any]:
    task = app.get_task_result(task_id)
    if task is None:
        raise HTTPError(404, f"no task {task_id}")
    body: dict[str, Any] = {
        "task_id": task.task_id,
        "status": task.status.value,
        "attempts": task.attempts,
    }
    if task.is_ready():
        error = task.exception()
        body["error" if error else "result"] = repr(error) if error else task.result()
    return body


@app.get("/hello/{name}")
def hello(request: Request, name: str = Path(...)) -> Response:
    return HTMLResponse(f"<h1>Hello, {name}!</h1>")


@app.get("/stats")
def stats(request: Request) -> dict[str, Any]:
    return dict(app.get_task_stats().to_dict())


if __name__ == "__main__":
    import sys

    app.listen(port=int(sys.argv[1]) if len(sys.argv) > 1 else 8000)
