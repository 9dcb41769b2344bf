"""catzilla: a Python web framework with a Rust background task engine."""

from .app import Catzilla
from .background_tasks import (
    BackgroundTasks,
    EngineStats,
    PeriodicTask,
    TaskPriority,
    TaskResult,
    TaskStatus,
    task,
)
from .errors import BadRequestError, HTTPError
from .web import (
    EventSourceResponse,
    HTMLResponse,
    JSONResponse,
    Path,
    PlainTextResponse,
    Query,
    Request,
    Response,
    ServerSentEvent,
    StreamingResponse,
)

__all__ = [
    "BackgroundTasks",
    "BadRequestError",
    "Catzilla",
    "EngineStats",
    "EventSourceResponse",
    "HTMLResponse",
    "HTTPError",
    "JSONResponse",
    "Path",
    "PeriodicTask",
    "PlainTextResponse",
    "Query",
    "Request",
    "Response",
    "ServerSentEvent",
    "StreamingResponse",
    "TaskPriority",
    "TaskResult",
    "TaskStatus",
    "task",
]
