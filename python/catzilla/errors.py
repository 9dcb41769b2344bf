"""Every exception catzilla raises. The task errors are also importable from
``catzilla.background_tasks``, and the web errors from ``catzilla``."""

from __future__ import annotations

__all__ = [
    "BadRequestError",
    "CatzillaError",
    "EngineShutdownError",
    "HTTPError",
    "NonRetryableError",
    "NotRestartableError",
    "StorageError",
    "TaskCancelledError",
    "TaskError",
    "TaskInterrupt",
    "TaskNotReadyError",
    "TaskPanicError",
    "TaskQueueFullError",
    "TaskTimeoutError",
    "WorkerLostError",
]


class CatzillaError(Exception):
    """Base class of catzilla's own errors."""


class TaskQueueFullError(CatzillaError):
    """``add_task`` was refused: ``queue_size`` tasks are already waiting."""


class EngineShutdownError(CatzillaError, RuntimeError):
    """The engine is shut down (or was never enabled) and takes no new tasks."""


class TaskTimeoutError(CatzillaError, TimeoutError):
    """A task attempt ran longer than its ``timeout_ms``."""


class TaskCancelledError(CatzillaError):
    """The task was cancelled, by ``cancel()`` or by shutdown, before it finished."""


class TaskNotReadyError(CatzillaError):
    """``result()`` was called before the task finished."""


class TaskPanicError(CatzillaError):
    """catzilla's native core failed while handling the task; the worker carried on."""


class StorageError(CatzillaError):
    """The durable task store cannot be opened or read (unwritable, locked or corrupt)."""


class NotRestartableError(CatzillaError):
    """A stored task cannot run again after a restart (no stored arguments, or
    its function no longer imports); ``recover()`` records it as its error."""


class TaskError(CatzillaError):
    """A task another process ran failed with an exception this process
    cannot rebuild; ``type_name`` names it and the remote traceback is a note."""

    def __init__(self, message: str, type_name: str = "Exception") -> None:
        super().__init__(message)
        self.type_name = type_name


class WorkerLostError(CatzillaError):
    """The worker process that held the task died or hung on each of its attempts."""


def rebuild_error(task_id: str, text: str | None) -> BaseException:
    """The exception for an error another process stored as JSON
    (``{"type", "message", "traceback"}``): the same class when it is one of
    catzilla's or a builtin exception taking a message, else ``TaskError``.
    The remote traceback is attached as a note."""
    import builtins
    import json

    record: dict[str, object] = {}
    if text:
        try:
            loaded = json.loads(text)
        except ValueError:
            loaded = None
        if isinstance(loaded, dict):
            record = loaded
    type_name = str(record.get("type") or "Exception")
    message = str(record.get("message") or f"task {task_id} failed in another process")
    short = type_name.rsplit(".", 1)[-1]
    cls = globals().get(short) if short in __all__ or short == "WorkerLostError" else None
    if cls is None:
        candidate = getattr(builtins, short, None)
        if isinstance(candidate, type) and issubclass(candidate, Exception):
            cls = candidate
    exc: BaseException
    try:
        exc = cls(message) if isinstance(cls, type) else TaskError(message, type_name)
    except Exception:
        exc = TaskError(message, type_name)
    if not isinstance(exc, cls or TaskError) or str(exc) != message:
        exc = TaskError(message, type_name)
    trace = record.get("traceback")
    if isinstance(trace, str) and trace:
        exc.add_note(f"Traceback in the process that ran task {task_id}:\n{trace}")
    return exc


class NonRetryableError(Exception):
    """Raise this (or a subclass) from a task to make it fail at once, without retries."""


class TaskInterrupt(BaseException):
    """Raised inside a sync task's thread when its timeout expires.

    It derives from ``BaseException`` so that ``except Exception`` in task code does
    not swallow it; the task's recorded error is a ``TaskTimeoutError``.
    """


class HTTPError(CatzillaError):
    """Raise from a handler to answer with ``status_code`` and ``{"error": detail}``."""

    def __init__(self, status_code: int, detail: str = "") -> None:
        super().__init__(status_code, detail)
        self.status_code = status_code
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.status_code}: {self.detail}"


class BadRequestError(HTTPError, ValueError):
    """The request is malformed, e.g. ``request.json()`` on a body that is not JSON."""

    def __init__(self, detail: str = "Bad Request") -> None:
        super().__init__(400, detail)
