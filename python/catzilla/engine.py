"""``BackgroundTasks``: the task engine, with every default defined here,
once, and passed to the native core."""

from __future__ import annotations

import atexit
import logging
import os
import time
import weakref
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from typing_extensions import Unpack

from . import _runtime  # noqa: F401 - hands the native core its Python objects first
from . import periodic as _periodic
from ._catzilla import Engine, PeriodicTask, TaskResult, _after_fork_in_child
from .compat import ENGINE_OPTIONS, warn_ignored
from .enums import TaskPriority, TaskStatus
from .errors import StorageError
from .periodic import PeriodicOptions
from .task_function import task
from .task_info import TaskInfo

logger = logging.getLogger("catzilla.tasks")

F = TypeVar("F", bound=Callable[..., Any])

#: The largest count the native core takes (a 64-bit size).
MAX_COUNT = 2**64 - 1
#: Most workers an engine can have.
MAX_WORKERS = 1024
#: How long lookups in the store and shutdown wait for it to commit what it
#: was handed (seconds).
STORE_FLUSH_TIMEOUT = 10.0


def _positive_int(name: str, value: object, minimum: int = 1, maximum: int = 2**48) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be from {minimum} to {maximum}, got {value}")
    return value


def _non_negative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = float("inf")
    if number != number or number in (float("inf"), float("-inf")) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


#: Options the worker command sets over the app's own (``workers``,
#: ``max_workers``, ``queues``) before it imports the app; see ``catzilla.cli``.
OVERRIDES: dict[str, Any] = {}

_STORAGE_FORMS = (
    "'sqlite:///path/to/tasks.db', 'redis://[:password@]host:port/db' or 'rediss://...'"
)


def _storage_url(storage: str | None) -> str | None:
    """Checks a storage URL's form (the store checks the rest when it opens)."""
    if storage is None:
        return None
    if not isinstance(storage, str):
        raise TypeError(f"storage must be a str URL ({_STORAGE_FORMS}), got {storage!r}")
    try:
        storage.encode()
    except UnicodeEncodeError:
        raise ValueError(f"storage is not valid text: {storage!r}") from None
    for scheme in ("sqlite:///", "redis://", "rediss://"):
        if storage.startswith(scheme) and len(storage) > len(scheme):
            return storage
    raise ValueError(f"storage must look like {_STORAGE_FORMS}, got {storage!r}")


def _queue_names(queues: object) -> list[str]:
    if queues is None:
        return ["default"]
    if isinstance(queues, str) or not isinstance(queues, (list, tuple)):
        raise TypeError(f"queues must be a list of queue names, got {queues!r}")
    names = list(dict.fromkeys(queues))
    if not names or not all(isinstance(q, str) and q and "," not in q for q in names):
        raise ValueError(f"queues must be non-empty names without commas, got {queues!r}")
    return names


def _readable(row: dict[str, Any]) -> TaskInfo | None:
    """A stored row as a ``TaskInfo``; None (logged) for a record that is not
    one catzilla wrote (corrupt, or another program's)."""
    try:
        return TaskInfo.from_row(row)
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        logger.warning(
            "skipped an unreadable task record in the store: %r (%s)", row.get("task_id"), exc
        )
        return None


_live_engines: weakref.WeakSet[BackgroundTasks] = weakref.WeakSet()

# The engine's threads stay in the parent on os.fork(): the child's copies of
# engines raise a clear error (and Catzilla apps start a fresh one).
os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _drain_at_exit() -> None:
    for engine in list(_live_engines):
        if not engine.is_shutdown:
            engine.shutdown(wait_for_completion=True, timeout=engine.exit_timeout)


class BackgroundTasks(Engine):
    """The background task engine. See the docs for every parameter's effect.
    Catzilla 0.2's ``enable_c_compilation`` is accepted with a
    ``DeprecationWarning`` and has no effect."""

    exit_timeout: float
    config: dict[str, Any]
    _drain_mark: int

    def __new__(
        cls,
        workers: int | None = None,
        min_workers: int = 2,
        max_workers: int | None = None,
        queue_size: int = 10000,
        enable_auto_scaling: bool = True,
        memory_pool_mb: float = 500,
        enable_c_compilation: bool | None = None,
        enable_profiling: bool = False,
        *,
        result_ttl: float = 3600.0,
        retry_backoff_ms: float = 100.0,
        retry_backoff_cap_ms: float = 30000.0,
        starvation_ms: float = 5000.0,
        idle_timeout: float = 30.0,
        exit_timeout: float = 30.0,
        default_priority: TaskPriority = TaskPriority.NORMAL,
        default_delay_ms: float = 0,
        default_max_retries: int = 3,
        default_timeout_ms: float = 30000,
        storage: str | None = None,
        storage_prefix: str = "catzilla",
        queues: list[str] | None = None,
        lease_timeout: float = 30.0,
    ) -> BackgroundTasks:
        if enable_c_compilation is not None:  # Catzilla 0.2's; nothing is compiled here
            warn_ignored(
                "BackgroundTasks", "enable_c_compilation", ENGINE_OPTIONS["enable_c_compilation"]
            )
        workers = OVERRIDES.get("workers", workers)
        max_workers = OVERRIDES.get("max_workers", max_workers)
        queues = OVERRIDES.get("queues", queues)
        url = _storage_url(storage)
        if workers is None:
            workers = min(32, (os.cpu_count() or 1) + 4)
        workers = _positive_int("workers", workers, minimum=0, maximum=MAX_WORKERS)
        if workers == 0 and url is None:
            raise ValueError(
                "workers=0 (a process that only queues tasks) needs a shared store: "
                "storage='sqlite:///...' or 'redis://...'"
            )
        queue_names = _queue_names(queues)
        if not isinstance(storage_prefix, str) or not storage_prefix or len(storage_prefix) > 100:
            raise ValueError(f"storage_prefix must be 1 to 100 characters, got {storage_prefix!r}")
        lease = _non_negative("lease_timeout", lease_timeout)
        if lease < 0.3:
            raise ValueError(f"lease_timeout must be at least 0.3 seconds, got {lease_timeout!r}")
        min_workers = min(_positive_int("min_workers", min_workers, maximum=MAX_WORKERS), workers)
        if max_workers is None:
            max_workers = max(workers, min(64, workers * 2), 1)
        max_workers = _positive_int("max_workers", max_workers, maximum=MAX_WORKERS)
        if max_workers < workers:
            raise ValueError(f"max_workers ({max_workers}) must be >= workers ({workers})")
        queue_size = _positive_int("queue_size", queue_size)
        if not isinstance(enable_auto_scaling, bool):
            raise TypeError(f"enable_auto_scaling must be a bool, got {enable_auto_scaling!r}")
        if not isinstance(enable_profiling, bool):
            raise TypeError(f"enable_profiling must be a bool, got {enable_profiling!r}")
        exit_timeout = _non_negative("exit_timeout", exit_timeout)
        self = super().__new__(
            cls,
            workers=workers,
            min_workers=min_workers,
            max_workers=max_workers,
            queue_size=queue_size,
            enable_auto_scaling=enable_auto_scaling,
            memory_pool_mb=memory_pool_mb,
            enable_profiling=enable_profiling,
            result_ttl=result_ttl,
            retry_backoff_ms=retry_backoff_ms,
            retry_backoff_cap_ms=retry_backoff_cap_ms,
            starvation_ms=starvation_ms,
            idle_timeout=idle_timeout,
            default_priority=default_priority,
            default_delay_ms=default_delay_ms,
            default_max_retries=default_max_retries,
            default_timeout_ms=default_timeout_ms,
            storage=url,
            storage_prefix=storage_prefix,
            queues=queue_names,
            lease_timeout=lease,
            flush_timeout=STORE_FLUSH_TIMEOUT,
        )
        self.exit_timeout = exit_timeout
        self._drain_mark = 0
        self.config = {
            "workers": workers,
            "min_workers": min_workers,
            "max_workers": max_workers,
            "queue_size": queue_size,
            "enable_auto_scaling": enable_auto_scaling,
            "memory_pool_mb": memory_pool_mb,
            "enable_profiling": enable_profiling,
            "result_ttl": result_ttl,
            "storage": storage,
            "queues": queue_names,
            "lease_timeout": lease,
        }
        _live_engines.add(self)
        return self

    task = staticmethod(task)

    def add_periodic_task(
        self,
        func: Callable[..., Any],
        *args: Any,
        every: float | timedelta | None = None,
        cron: str | None = None,
        timezone: str = "UTC",
        priority: TaskPriority | None = None,
        max_retries: int | None = None,
        timeout_ms: float | None = None,
        start_at: datetime | float | None = None,
        jitter_ms: float = 0,
        overlap: bool = False,
        missed: str = "run_once",
        name: str | None = None,
        **kwargs: Any,
    ) -> PeriodicTask:
        """Runs ``func(*args, **kwargs)`` on a schedule: ``every`` seconds (or a
        timedelta) or at the times of a ``cron`` expression. Each run is an
        ordinary task. See docs/background-tasks.md, "Periodic tasks"."""
        _periodic.check_options(
            func,
            cron=cron,
            timezone=timezone,
            jitter_ms=jitter_ms,
            overlap=overlap,
            missed=missed,
            name=name,
        )
        return self._add_periodic(
            func,
            args,
            kwargs,
            every=_periodic.seconds("every", every),
            cron=cron,
            timezone=timezone,
            priority=priority,
            max_retries=max_retries,
            timeout_ms=timeout_ms,
            start_at=_periodic.epoch(start_at),
            jitter_ms=float(jitter_ms),
            overlap=overlap,
            missed=missed,
            name=_periodic.default_name(func) if name is None else name,
        )

    def periodic(self, **options: Unpack[PeriodicOptions]) -> Callable[[F], F]:
        """Decorator form of ``add_periodic_task``, with its options, for a
        function taking no arguments; the function itself is returned unchanged."""

        def register(func: F) -> F:
            self.add_periodic_task(func, **options)
            return func

        return register

    def list_periodic_tasks(self) -> list[PeriodicTask]:
        """The periodic tasks not cancelled, in the order they were added."""
        return self._periodic_tasks()

    def get_task(self, task_id: str) -> TaskInfo | None:
        """The state of a task by id, or None for an unknown (or evicted) id.
        With a shared store, every process's tasks are read there."""
        handle = self.get_result(task_id)
        if handle is not None and not self._store_readable():
            return TaskInfo.from_handle(handle)
        if not self._store_readable():
            return None
        try:
            row = self._stored(task_id)
        except StorageError:
            if self._store_readable():
                raise
            row = None
        if row is not None:
            info = _readable(row)
            if info is None:
                raise StorageError(f"task {task_id} in the store is not a record catzilla can read")
            return info
        return None if handle is None else TaskInfo.from_handle(handle)

    def list_tasks(self, status: TaskStatus | None = None, limit: int = 100) -> list[TaskInfo]:
        """Tasks newest first, optionally only those with ``status``: the
        retained ones, or with storage every stored one."""
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"limit must be an int >= 0, got {limit!r}")
        if not 0 <= limit <= MAX_COUNT:
            raise ValueError(f"limit must be an int from 0 to {MAX_COUNT}, got {limit!r}")
        if status is not None and not isinstance(status, TaskStatus):
            raise TypeError(f"status must be a TaskStatus member or None, got {status!r}")
        if self._store_readable():
            try:
                rows = self._stored_list(None if status is None else status.value, limit)
                return [info for info in map(_readable, rows) if info is not None]
            except StorageError:
                if self._store_readable():
                    raise
        return [TaskInfo.from_handle(h) for h in self._list(status, limit)]

    def shutdown(self, wait_for_completion: bool = True, timeout: float = 30.0) -> dict[str, Any]:
        """Stops intake, lets work finish up to ``timeout`` seconds (with
        ``wait_for_completion``), cancels and reports the rest. See the docs."""
        return self._shutdown(wait_for_completion, timeout)

    def drain(self, timeout: float = 30.0) -> list[TaskResult]:
        """Waits until nothing is queued, scheduled, running or awaiting a
        retry (and the callbacks of finished tasks, which may queue more, have
        run), then returns the handles of the tasks that finished since the
        previous ``drain`` (or since the engine started), in the order they
        finished. Periodic schedules do not count: their next run is not due.
        With a store, the tasks this process queued must be finished, wherever
        they run, and the store's queues empty.

        Raises ``TimeoutError`` when work is still going on after ``timeout``
        seconds. Made for tests: queue work, ``drain()``, assert on results::

            app.add_task(send_email, "a@example.com")
            [done] = app.tasks.drain(timeout=5)
            assert done.result() == "sent"
        """
        deadline = time.monotonic() + _non_negative("timeout", timeout)
        while True:
            left = max(0.0, deadline - time.monotonic())
            if not self._settle(left):
                raise TimeoutError(self._busy_report(timeout))
            # NOTE: settled again after the store said it is empty: a task
            # claimed from it in between is then seen running here.
            if not self._store_waiting() and (self.config["storage"] is None or self._settle(0)):
                break
            if time.monotonic() >= deadline:
                raise TimeoutError(self._busy_report(timeout))
            time.sleep(0.005)  # others' tasks still wait in the store
        done, self._drain_mark = self._finished_since(self._drain_mark)
        return done

    def run_until_idle(self, timeout: float = 30.0) -> list[TaskResult]:
        """The same as ``drain``."""
        return self.drain(timeout)

    def _store_waiting(self) -> int:
        """Tasks waiting in the store's queues this engine serves (0 without one)."""
        if not self._store_readable():
            return 0
        return sum(self._queue_depths(self.queues) or [])

    def _busy_report(self, timeout: float) -> str:
        stats = self.get_stats()
        busy = [
            f"{stats.total_queued} queued ({stats.scheduled_tasks} scheduled or awaiting a retry)",
            f"{stats.running_tasks} running",
        ]
        counts = [stats.total_queued, stats.running_tasks]
        if self.config["storage"] is not None:
            # NOTE: what this process queued may run in another one: such a
            # task is neither queued nor running here, yet drain waits for it.
            unfinished = sum(
                len(self._list(status, MAX_COUNT))
                for status in (
                    TaskStatus.PENDING,
                    TaskStatus.SCHEDULED,
                    TaskStatus.RUNNING,
                    TaskStatus.RETRYING,
                )
            )
            waiting = self._store_waiting()
            busy += [
                f"{waiting} waiting in the store",
                f"{unfinished} of its tasks not final yet (they may run in another process)",
            ]
            counts += [waiting, unfinished]
        report = f"the engine was still busy after {timeout} s: " + ", ".join(busy)
        if not any(counts):
            report += "; the completion callbacks of a finished task are still running"
        return report

    def flush(self, timeout: float = 10.0) -> bool:
        """Waits until everything handed to the store is committed (at once
        without storage); returns whether it was within ``timeout`` seconds."""
        return self._flush(timeout)

    def _store_readable(self) -> bool:
        """Storage is configured and has not stopped (then lookups use memory)."""
        return self.config["storage"] is not None and self.storage_error is None

    def recover(self) -> dict[str, list[str]]:
        """Takes back the tasks whose owner is gone: leases that expired, and
        those of processes of this host that have exited (a restart need not
        wait out their lease). Live leases are never touched. Each such task
        goes back to its queue under its own id, with its attempt counted
        (at-least-once), or fails with ``WorkerLostError`` once its retries are
        spent. Tasks merely waiting need nothing: they are in the shared queue.
        Safe to call any time, from any process.

        ``Catzilla.listen`` and the worker command call it at start."""
        resubmitted, failed = self._recover()
        if resubmitted or failed:
            logger.warning(
                "took back %d task(s) from processes that are gone; %d of them had "
                "no retries left and failed",
                len(resubmitted) + len(failed),
                len(failed),
            )
        return {"resubmitted": resubmitted, "failed": failed}

    def __repr__(self) -> str:
        state = "shut down" if self.is_shutdown else "running"
        return f"<BackgroundTasks {state} workers={self.config['workers']}>"
