"""``TaskInfo``: one reading of a task's state, from its handle or from its
stored row; ``TaskStats``, the same reading in Catzilla 0.2's shape; and how
a task's error is shown and stored."""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from ._catzilla import TaskResult
from .enums import TaskPriority, TaskStatus


def _timestamp(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


def _json_ready(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return _json_ready(value.value)
    return repr(value)


@dataclass(frozen=True)
class TaskInfo:
    """Everything known about one task, at the moment it was read."""

    task_id: str
    name: str
    status: TaskStatus
    priority: TaskPriority
    attempts: int
    progress: float
    current_step: str | None
    result: Any
    error: dict[str, str] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_handle(cls, handle: TaskResult) -> TaskInfo:
        """Reads a task's current state from its handle."""
        status = handle.status
        result = handle.result() if status is TaskStatus.COMPLETED else None
        exc = handle.exception()
        error = None if exc is None else error_record(exc)
        created = _timestamp(handle.created_at)
        assert created is not None
        return cls(
            task_id=handle.task_id,
            name=handle.name,
            status=status,
            priority=handle.priority,
            attempts=handle.attempts,
            progress=handle.progress,
            current_step=handle.current_step,
            result=result,
            error=error,
            created_at=created,
            started_at=_timestamp(handle.started_at),
            finished_at=_timestamp(handle.finished_at),
        )

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TaskInfo:
        """Reads a task's state from its durable store row."""
        created = _timestamp(row["created_at"])
        assert created is not None
        return cls(
            task_id=row["task_id"],
            name=row["name"],
            status=TaskStatus(row["status"]),
            priority=tuple(TaskPriority)[row["priority"]],
            attempts=row["attempts"],
            progress=row["progress"],
            current_step=row["current_step"],
            result=None if row["result"] is None else json.loads(row["result"]),
            error=None if row["error"] is None else json.loads(row["error"]),
            created_at=created,
            started_at=_timestamp(row["started_at"]),
            finished_at=_timestamp(row["finished_at"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: enums as their values, times as ISO 8601 text,
        results that are not JSON types as their repr."""
        return {
            "task_id": self.task_id,
            "name": self.name,
            "status": self.status.value,
            "priority": self.priority.name,
            "attempts": self.attempts,
            "progress": self.progress,
            "current_step": self.current_step,
            "result": _json_ready(self.result),
            "error": self.error,
            "created_at": self.created_at.isoformat(),
            "started_at": None if self.started_at is None else self.started_at.isoformat(),
            "finished_at": None if self.finished_at is None else self.finished_at.isoformat(),
        }


@dataclass(frozen=True)
class TaskStats:
    """One task's timings, as ``TaskResult.get_stats()`` reads them (the fields
    of Catzilla 0.2's ``TaskStats``). Times are seconds since the Unix epoch:
    ``started_at`` is the first attempt's start, ``completed_at`` when the task
    became final (whatever the outcome), ``execution_time_ms`` the time between
    them (None until both are known); ``retries`` counts attempts after the
    first. ``memory_usage_mb`` and ``worker_id`` are not measured per task and
    stay None."""

    task_id: str
    status: TaskStatus
    created_at: float
    started_at: float | None = None
    completed_at: float | None = None
    execution_time_ms: float | None = None
    memory_usage_mb: float | None = None
    retries: int = 0
    worker_id: int | None = None


def error_record(exc: BaseException) -> dict[str, str]:
    """How a task's error is shown and stored: ``{"type", "message", "traceback"}``."""
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


def encode_error(exc: BaseException) -> str:
    """A task's error as the store keeps it: ``error_record`` as JSON."""
    return json.dumps(error_record(exc))
