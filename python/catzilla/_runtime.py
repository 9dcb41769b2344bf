"""Hands the native core, once, the Python objects it needs: enums,
exception classes and helpers."""

from __future__ import annotations

import json
import logging
import sys

from . import _aio, errors
from ._catzilla import _init_runtime
from ._log import reporter
from .compat import warn_compile_to_c
from .enums import TaskPriority, TaskStatus
from .recovery import resolve
from .task_function import TaskFunction
from .task_info import TaskStats, encode_error

_report = reporter(logging.getLogger("catzilla.tasks"))

_init_runtime(
    {
        "priorities": tuple(TaskPriority),
        "statuses": tuple(TaskStatus),
        "TaskQueueFullError": errors.TaskQueueFullError,
        "EngineShutdownError": errors.EngineShutdownError,
        "TaskNotReadyError": errors.TaskNotReadyError,
        "TaskTimeoutError": errors.TaskTimeoutError,
        "TaskCancelledError": errors.TaskCancelledError,
        "TaskPanicError": errors.TaskPanicError,
        "TaskInterrupt": errors.TaskInterrupt,
        "NonRetryableError": errors.NonRetryableError,
        "TaskFunction": TaskFunction,
        "getsizeof": sys.getsizeof,
        "EventLoopThread": _aio.EventLoopThread,
        "report": _report,
        "await_result": _aio.await_result,
        "StorageError": errors.StorageError,
        "json_dumps": json.dumps,
        "json_loads": json.loads,
        "encode_error": encode_error,
        "resolve": resolve,
        "NotRestartableError": errors.NotRestartableError,
        "rebuild_error": errors.rebuild_error,
        "TaskStats": TaskStats,
        "warn_compile_to_c": warn_compile_to_c,
    }
)
