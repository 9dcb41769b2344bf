"""catzilla: a Python web framework with a Rust background task engine."""

from .app import Catzilla
from .background_tasks import (
    BackgroundTasks,
    EngineStats,
    TaskPriority,
    TaskResult,
    TaskStatus,
    task,
)

__all__ = [
    "BackgroundTasks",
    "Catzilla",
    "EngineStats",
    "TaskPriority",
    "TaskResult",
    "TaskStatus",
    "task",
]
