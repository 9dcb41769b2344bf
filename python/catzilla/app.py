"""The ``Catzilla`` application object."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, overload

from .background_tasks import (
    BackgroundTasks,
    EngineStats,
    TaskFunction,
    TaskPriority,
    TaskResult,
    task,
)

P = ParamSpec("P")
R = TypeVar("R")


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

    @overload
    def task(self, func: Callable[P, R]) -> TaskFunction[P, R]: ...
    @overload
    def task(
        self,
        *,
        priority: TaskPriority | None = None,
        max_retries: int | None = None,
        timeout_ms: float | None = None,
        delay_ms: float | None = None,
        no_retry_for: tuple[type[BaseException], ...] = (),
    ) -> Callable[[Callable[P, R]], TaskFunction[P, R]]: ...
    def task(
        self,
        func: Callable[..., Any] | None = None,
        *,
        priority: TaskPriority | None = None,
        max_retries: int | None = None,
        timeout_ms: float | None = None,
        delay_ms: float | None = None,
        no_retry_for: tuple[type[BaseException], ...] = (),
    ) -> Any:
        """The ``@task`` decorator (see ``catzilla.background_tasks.task``),
        available once the engine is enabled."""
        self._engine()
        decorate = task(
            priority=priority,
            max_retries=max_retries,
            timeout_ms=timeout_ms,
            delay_ms=delay_ms,
            no_retry_for=no_retry_for,
        )
        return decorate(func) if func is not None else decorate

    def get_task_stats(self) -> EngineStats:
        """The engine's statistics; see ``EngineStats``."""
        return self._engine().get_stats()

    def get_task_result(self, task_id: str) -> TaskResult | None:
        """The handle of a retained task by id, or None."""
        return self._engine().get_result(task_id)
