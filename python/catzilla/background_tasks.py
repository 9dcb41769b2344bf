"""catzilla's background task engine: priorities, delays, retries, timeouts,
coroutines and real statistics, run by a Rust worker pool.

This module gathers the public names; each concept lives in a module named
after it: ``enums`` (TaskPriority, TaskStatus), ``task_function`` (``@task``,
``current_task``), ``task_info`` (TaskInfo, TaskStats), ``engine`` (BackgroundTasks,
with every default), ``recovery``, ``periodic`` and ``errors``; Catzilla 0.2's
names that have no counterpart of their own (TaskConfig, TaskFuture, the
global task system) live in ``compat``.
"""

from __future__ import annotations

from ._catzilla import EngineStats, PeriodicTask, TaskResult
from .compat import (
    TaskConfig,
    TaskFuture,
    add_task,
    create_task_system,
    get_global_task_system,
)
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
from .task_info import TaskInfo, TaskStats

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
    "TaskConfig",
    "TaskError",
    "TaskFunction",
    "TaskFuture",
    "TaskInfo",
    "TaskInterrupt",
    "TaskNotReadyError",
    "TaskPanicError",
    "TaskPriority",
    "TaskQueueFullError",
    "TaskResult",
    "TaskStats",
    "TaskStatus",
    "TaskTimeoutError",
    "WorkerLostError",
    "add_task",
    "create_task_system",
    "current_task",
    "get_global_task_system",
    "registered_tasks",
    "task",
]
