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
    "TaskInterrupt",
    "TaskNotReadyError",
    "TaskPanicError",
    "TaskQueueFullError",
    "TaskTimeoutError",
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
