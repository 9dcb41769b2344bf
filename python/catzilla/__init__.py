"""catzilla: a Python web framework with a Rust background task engine."""

from .app import Catzilla
from .app import Catzilla as App  # Catzilla 0.2's alias
from .background_tasks import (
    BackgroundTasks,
    EngineStats,
    PeriodicTask,
    TaskFuture,
    TaskPriority,
    TaskResult,
    TaskStatus,
    task,
)
from .errors import BadRequestError, HTTPError
from .web import (
    BaseModel,
    Body,
    EventSourceResponse,
    Field,
    Form,
    Header,
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
    "App",
    "BackgroundTasks",
    "BadRequestError",
    "BaseModel",
    "Body",
    "Catzilla",
    "EngineStats",
    "EventSourceResponse",
    "Field",
    "Form",
    "HTMLResponse",
    "HTTPError",
    "Header",
    "JSONResponse",
    "Path",
    "PeriodicTask",
    "PlainTextResponse",
    "Query",
    "Request",
    "Response",
    "ServerSentEvent",
    "StreamingResponse",
    "TaskFuture",
    "TaskPriority",
    "TaskResult",
    "TaskStatus",
    "task",
]
