"""Periodic tasks: the checks and conversions before the engine registers one.

``BackgroundTasks.add_periodic_task`` and ``Catzilla.add_periodic_task`` (and
their ``periodic`` decorators) come through here; the engine does the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

from ._catzilla import PeriodicTask

if TYPE_CHECKING:
    from .background_tasks import TaskPriority

__all__ = [
    "MISSED_POLICIES",
    "PeriodicOptions",
    "PeriodicTask",
    "check_options",
    "epoch",
    "seconds",
]


class PeriodicOptions(TypedDict, total=False):
    """The options of ``add_periodic_task``, for the ``periodic`` decorators."""

    every: float | timedelta | None
    cron: str | None
    timezone: str
    priority: TaskPriority | None
    max_retries: int | None
    timeout_ms: float | None
    start_at: datetime | float | None
    jitter_ms: float
    overlap: bool
    missed: str
    name: str | None


F = TypeVar("F", bound=Callable[..., Any])

#: What a schedule does with the runs a downtime missed (with durable storage).
MISSED_POLICIES = ("run_once", "skip")


def seconds(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds or a timedelta, got {value!r}")
    return float(value)


def epoch(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()  # a naive datetime is local time, as datetime.timestamp says
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"start_at must be a datetime or seconds since the epoch, got {value!r}")
    return float(value)


def default_name(func: Callable[..., Any]) -> str:
    module = getattr(func, "__module__", None) or "?"
    qualname = getattr(func, "__qualname__", None) or type(func).__qualname__
    return f"{module}.{qualname}"


def check_options(
    func: Callable[..., Any],
    *,
    cron: str | None,
    timezone: str,
    jitter_ms: float,
    overlap: bool,
    missed: str,
    name: str | None,
) -> None:
    """The checks of ``add_periodic_task``'s arguments that the native core
    does not make itself."""
    if not callable(func):
        raise TypeError(f"func must be callable, got {func!r}")
    if cron is not None and not isinstance(cron, str):
        raise TypeError(f"cron must be a str such as '*/5 * * * *', got {cron!r}")
    if not isinstance(timezone, str):
        raise TypeError(f"timezone must be an IANA time zone name such as 'UTC', got {timezone!r}")
    if isinstance(jitter_ms, bool) or not isinstance(jitter_ms, int | float):
        raise TypeError(f"jitter_ms must be a number of milliseconds, got {jitter_ms!r}")
    if not isinstance(overlap, bool):
        raise TypeError(f"overlap must be a bool, got {overlap!r}")
    if missed not in MISSED_POLICIES:
        raise ValueError(f"missed must be one of {MISSED_POLICIES}, got {missed!r}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {name!r}")
