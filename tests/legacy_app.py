"""An app written for the original Catzilla 0.2.3, kept as it was written:
0.2's app and engine options, a validated model body, ``Query``/``Header``/
``Path`` parameters, ``compile_to_c`` and ``TaskResult.add_callback(value)``.

tests/test_legacy_app.py runs it unchanged, in-process and as a program
(``python tests/legacy_app.py [PORT]``, default 8000).
"""

# Written as 0.2-era code was, with typing.List and Optional:
# ruff: noqa: UP006, UP035, UP045

import sys
from typing import List, Optional

from catzilla import (
    BaseModel,
    Catzilla,
    Field,
    Header,
    JSONResponse,
    Path,
    Query,
    Request,
    Response,
)
from catzilla.background_tasks import TaskPriority, TaskResult

app = Catzilla(
    production=False,
    use_jemalloc=True,
    memory_profiling=False,
    auto_validation=True,
    enable_di=True,
    show_banner=False,
)
app.enable_background_tasks(
    workers=4,
    enable_auto_scaling=True,
    memory_pool_mb=500,
    enable_c_compilation=True,
)


class EmailTask(BaseModel):
    to: str = Field(..., min_length=3, regex=r"^[^@\s]+@[^@\s]+$")
    subject: str = Field(..., max_length=100)
    body: Optional[str] = None
    tags: List[str] = Field(default_factory=list, max_items=5)


outbox: List[dict] = []
delivered: List[str] = []


def send_email(to: str, subject: str, body: Optional[str]) -> dict:
    message = {"to": to, "subject": subject, "body": body or ""}
    outbox.append(message)
    return message


@app.task(priority=TaskPriority.LOW, compile_to_c=True, max_retries=2)
def count_words(text: str) -> int:
    return len(text.split())


@app.post("/emails")
def queue_email(
    request: Request,
    email: EmailTask,
    priority: str = Query("normal", regex="^(low|normal|high|critical)$"),
    delay_ms: int = Query(0, ge=0, le=60000),
    x_request_id: Optional[str] = Header(None),
) -> Response:
    result: TaskResult[dict] = app.add_task(
        send_email,
        email.to,
        email.subject,
        email.body,
        priority=TaskPriority[priority.upper()],
        delay_ms=delay_ms,
        compile_to_c=True,
    )
    result.add_callback(lambda message: delivered.append(message["to"]))
    words = app.add_task(count_words, email.body or "")
    return JSONResponse(
        {
            "task_id": result.task_id,
            "words_task_id": words.task_id,
            "request_id": x_request_id,
            "tags": email.tags,
        },
        status_code=202,
    )


@app.get("/emails/{task_id}")
def email_status(request: Request, task_id: str = Path(...)) -> Response:
    result = app.get_task_result(task_id)
    if result is None:
        return JSONResponse({"error": "unknown task"}, status_code=404)
    stats = result.get_stats()
    return JSONResponse(
        {
            "task_id": stats.task_id,
            "status": stats.status.value,
            "ready": result.is_ready(),
            "result": result.result() if result.is_ready() else None,
        }
    )


@app.get("/stats")
def engine_stats(request: Request) -> Response:
    stats = app.get_task_stats()
    return JSONResponse(
        {
            "total_workers": stats.total_workers,
            "total_tasks_processed": stats.total_tasks_processed,
            "outbox": len(outbox),
            "delivered": sorted(delivered),
        }
    )


if __name__ == "__main__":
    app.listen(port=int(sys.argv[1]) if len(sys.argv) > 1 else 8000)
