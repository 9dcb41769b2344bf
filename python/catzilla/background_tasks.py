"""catzilla's background task engine: priorities, delays, retries, timeouts,
coroutines and real statistics, run by a Rust worker pool.

This module gathers the public names; each concept lives in a module named
after it: ``enums`` (TaskPriority, TaskStatus), ``task_function`` (``@task``,
``current_task``), ``task_info`` (TaskInfo), ``engine`` (BackgroundTasks, with
every default), ``recovery``, ``periodic`` and ``errors``.
"""

from __future__ import annotations

from ._catzilla import EngineStats, PeriodicTask, TaskResult
from .engine import BackgroundTasks
from .enums import TaskPriority, TaskStatus
from .errors import (
    CatzillaError,
    EngineShutdownError,
    NonRetryableError,
    NotRestartableError,
    StorageError,
    TaskCancelledError,
    TaskError,
    TaskInterrupt,
    TaskNotReadyError,
    TaskPanicError,
    TaskQueueFullError,
    TaskTimeoutError,
    WorkerLostError,
)
from .task_function import TaskFunction, current_task, registered_tasks, task
from .task_info import TaskInfo

__all__ = [
    "BackgroundTasks",
    "CatzillaError",
    "EngineShutdownError",
    "EngineStats",
    "NonRetryableError",
    "NotRestartableError",
    "PeriodicTask",
    "StorageError",
    "TaskCancelledError",
    "TaskError",
    "TaskFunction",
    "TaskInfo",
    "TaskInterrupt",
    "TaskNotReadyError",
    "TaskPanicError",
    "TaskPriority",
    "TaskQueueFullError",
    "TaskResult",
    "TaskStatus",
    "TaskTimeoutError",
    "WorkerLostError",
    "current_task",
    "registered_tasks",
    "task",
]
