"""The ``Catzilla`` application object."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .background_tasks import BackgroundTasks, EngineStats, TaskResult, task


class Catzilla:
    """A catzilla application: routes and, once enabled, a background task engine."""

    def __init__(self) -> None:
        self.tasks: BackgroundTasks | None = None

    def enable_background_tasks(self, **options: Any) -> BackgroundTasks:
        """Starts the background task engine with ``BackgroundTasks``' parameters
        and stores it as ``app.tasks``. Enabling twice raises ``RuntimeError``."""
        if self.tasks is not None:
            raise RuntimeError("background tasks are already enabled for this app")
        self.tasks = BackgroundTasks(**options)
        return self.tasks

    def _engine(self) -> BackgroundTasks:
        if self.tasks is None:
            raise RuntimeError(
                "background tasks are not enabled; call app.enable_background_tasks() first"
            )
        return self.tasks

    def add_task(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> TaskResult:
        """Queues ``func(*args, **kwargs)`` on the engine; see ``BackgroundTasks.add_task``."""
        return self._engine().add_task(func, *args, **kwargs)

    def task(self, *args: Any, **options: Any) -> Any:
        """The ``@task`` decorator, available once the engine is enabled."""
        self._engine()
        return task(*args, **options)

    def get_task_stats(self) -> EngineStats:
        """The engine's statistics; see ``EngineStats``."""
        return self._engine().get_stats()

    def get_task_result(self, task_id: str) -> TaskResult | None:
        """The handle of a retained task by id, or None."""
        return self._engine().get_result(task_id)
