"""The priority lanes and the statuses of background tasks."""

from __future__ import annotations

from enum import Enum


class TaskPriority(Enum):
    """The lane a task waits in; workers serve the highest non-empty lane first."""

    CRITICAL = 0
    """Runs before everything else waiting."""
    HIGH = 1
    """Runs before NORMAL and LOW work."""
    NORMAL = 2
    """The default."""
    LOW = 3
    """Runs when nothing more urgent waits (or once it has waited past the starvation guard)."""


class TaskStatus(Enum):
    """Where a task stands."""

    PENDING = "pending"
    """Queued, ready to run."""
    SCHEDULED = "scheduled"
    """Waiting for its delay to pass."""
    RUNNING = "running"
    """An attempt is running."""
    RETRYING = "retrying"
    """An attempt failed; the next one waits for its backoff delay."""
    COMPLETED = "completed"
    """Finished and returned a value."""
    FAILED = "failed"
    """Finished with an error after its last attempt."""
    CANCELLED = "cancelled"
    """Cancelled before it ran, or by shutdown."""
