"""Hands the native core, once, the Python objects it needs: enums,
exception classes and helpers."""

from __future__ import annotations

import json
import logging
import sys

from . import _aio
from ._catzilla import _init_runtime
from ._log import reporter
from .enums import TaskPriority, TaskStatus
from .errors import (
    EngineShutdownError,
    NonRetryableError,
    NotRestartableError,
    StorageError,
    TaskCancelledError,
    TaskInterrupt,
    TaskNotReadyError,
    TaskPanicError,
    TaskQueueFullError,
    TaskTimeoutError,
)
from .recovery import resolve
from .task_function import TaskFunction
from .task_info import encode_error

_report = reporter(logging.getLogger("catzilla.tasks"))

_init_runtime(
    {
        "priorities": tuple(TaskPriority),
        "statuses": tuple(TaskStatus),
        "TaskQueueFullError": TaskQueueFullError,
        "EngineShutdownError": EngineShutdownError,
        "TaskNotReadyError": TaskNotReadyError,
        "TaskTimeoutError": TaskTimeoutError,
        "TaskCancelledError": TaskCancelledError,
        "TaskPanicError": TaskPanicError,
        "TaskInterrupt": TaskInterrupt,
        "NonRetryableError": NonRetryableError,
        "TaskFunction": TaskFunction,
        "getsizeof": sys.getsizeof,
        "EventLoopThread": _aio.EventLoopThread,
        "report": _report,
        "await_result": _aio.await_result,
        "StorageError": StorageError,
        "json_dumps": json.dumps,
        "json_loads": json.loads,
        "encode_error": encode_error,
        "resolve": resolve,
        "NotRestartableError": NotRestartableError,
    }
)
