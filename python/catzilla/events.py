"""Task events: ``@app.on_task_event(...)`` hooks, called on a thread of
their own with one ``TaskEvent`` per task state change."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .enums import TaskPriority

logger = logging.getLogger("catzilla.events")

#: Every event kind, in the order a task can go through them.
EVENT_KINDS = ("submitted", "started", "retrying", "timed_out", "succeeded", "failed", "cancelled")

_PRIORITIES = tuple(TaskPriority)


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One change in a task's life.

    ``kind`` is one of ``EVENT_KINDS``; ``attempt`` counts from 1 once the
    task started; ``duration`` is how long the last attempt ran (seconds),
    for ``succeeded``, ``failed``, ``retrying`` and ``timed_out``; ``error``
    is the exception of ``failed``, ``retrying`` and ``timed_out``;
    ``timestamp`` is when it happened (Unix seconds).
    """

    kind: str
    task_id: str
    name: str
    priority: TaskPriority
    queue: str
    attempt: int
    duration: float | None
    error: BaseException | None
    timestamp: float


Hook = Callable[[TaskEvent], object]


def check_kinds(kinds: tuple[str, ...]) -> frozenset[str]:
    """The kinds a hook asked for (all when none); ``ValueError`` for others."""
    for kind in kinds:
        if not isinstance(kind, str):
            raise TypeError(f"a task event hook must be callable (or kinds be str), got {kind!r}")
        if kind not in EVENT_KINDS:
            raise ValueError(f"event kind must be one of {', '.join(EVENT_KINDS)}; got {kind!r}")
    return frozenset(kinds or EVENT_KINDS)


class EventHooks:
    """The hooks of one app, and the dispatcher the engine's events thread calls."""

    def __init__(self) -> None:
        self._hooks: list[tuple[frozenset[str], Hook]] = []

    def __bool__(self) -> bool:
        return bool(self._hooks)

    def kinds(self) -> list[str]:
        """Every kind some hook wants (the engine sends only those)."""
        return [k for k in EVENT_KINDS if any(k in kinds for kinds, _ in self._hooks)]

    def add(self, kinds: frozenset[str], hook: Hook) -> None:
        if not callable(hook):
            raise TypeError(f"a task event hook must be callable, got {hook!r}")
        if inspect.iscoroutinefunction(hook):
            raise TypeError(
                f"task event hook {hook.__qualname__} is async; hooks run on the engine's "
                "events thread and must be plain functions (queue a task from it for async work)"
            )
        self._hooks.append((kinds, hook))

    def dispatch(self, batch: list[tuple[Any, ...]], dropped: int) -> None:
        """Calls the hooks for a batch of events (from the events thread). A
        hook that raises is logged; the others still run."""
        if dropped:
            logger.warning("task event hooks fell behind: %d event(s) were not delivered", dropped)
        hooks = self._hooks
        for kind, task_id, name, lane, queue, attempt, duration, error, at in batch:
            event = TaskEvent(
                kind, task_id, name, _PRIORITIES[lane], queue, attempt, duration, error, at
            )
            for kinds, hook in hooks:
                if kind in kinds:
                    try:
                        hook(event)
                    except Exception:
                        logger.exception(
                            "task event hook %s raised on %s of task %s",
                            getattr(hook, "__qualname__", hook),
                            kind,
                            task_id,
                        )
