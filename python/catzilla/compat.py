"""Catzilla 0.2 compatibility: the options of 0.2 that do nothing here (each
accepted with one ``DeprecationWarning`` naming it), and the 0.2 names of
``catzilla.background_tasks`` that have no counterpart of their own:
``TaskConfig``, ``TaskFuture`` (``then``/``catch`` continuations run as
tasks) and the global task system (``create_task_system``,
``get_global_task_system``, ``add_task``). docs/migrating-from-0.2.md maps
every 0.2 name and option.

This module imports only the native core and the enums, so that the rest of
the package can use it; the engine is imported when first needed.
"""

from __future__ import annotations

import asyncio
import difflib
import inspect
import sys
import threading
import warnings
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, overload

from ._catzilla import TaskResult
from .enums import TaskPriority, TaskStatus

if TYPE_CHECKING:
    from .engine import BackgroundTasks

T = TypeVar("T")
R = TypeVar("R")

_GUIDE = "see docs/migrating-from-0.2.md"
_NO_C = "tasks run as Python here; nothing is compiled to C"

#: ``Catzilla(...)`` options of 0.2 that do nothing here, with why.
APP_OPTIONS: Mapping[str, str] = {
    "production": "error responses never carry a traceback; a 500 is logged to 'catzilla.http'",
    "use_jemalloc": "memory is managed by Python's and Rust's own allocators",
    "memory_profiling": "app.get_task_stats() and the dashboard report memory",
    "auto_memory_tuning": "memory is managed by Python's and Rust's own allocators",
    "memory_stats_interval": "statistics are read when asked for (app.get_task_stats())",
    "auto_validation": "handler parameters are always converted and checked",
    "enable_di": "there is no dependency injection container; pass dependencies explicitly",
    "di_container": "there is no dependency injection container; pass dependencies explicitly",
    "show_banner": "listen() prints one line saying where it serves",
    "log_requests": "use app.listen(access_log=True) or 'catzilla run --access-log'",
    "enable_colors": "log output goes through the logging module; format it there",
    "show_request_details": "use app.listen(access_log=True) or 'catzilla run --access-log'",
    "upload_config": "request bodies are bounded by max_body_size",
}

#: ``BackgroundTasks(...)`` / ``enable_background_tasks(...)`` options of 0.2
#: that do nothing here.
ENGINE_OPTIONS: Mapping[str, str] = {"enable_c_compilation": _NO_C}

#: ``add_task(...)`` options of 0.2 that do nothing here.
ADD_TASK_OPTIONS: Mapping[str, str] = {"compile_to_c": _NO_C}

#: ``@task(...)`` options of 0.2 that do nothing here.
TASK_OPTIONS: Mapping[str, str] = {
    "compile_to_c": _NO_C,
    "retry_backoff": (
        "retries always back off exponentially with jitter "
        "(the engine's retry_backoff_ms and retry_backoff_cap_ms)"
    ),
    "memory_limit_mb": "tasks have no memory limit of their own",
    "enable_profiling": "profiling is per engine: BackgroundTasks(enable_profiling=True)",
}


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that makes ``warnings.warn``, called from the
    function that calls this one, point at the first frame outside catzilla:
    the program's own line, whichever catzilla function it called."""
    level = 1
    frame = sys._getframe(2)  # the caller's caller; read only on the warning path
    while frame is not None:
        name = str(frame.f_globals.get("__name__", ""))
        if name != "catzilla" and not name.startswith("catzilla."):
            break
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level + 1


def warn_ignored(where: str, option: str, reason: str) -> None:
    """One ``DeprecationWarning`` saying that ``option`` of ``where`` has no
    effect here, pointing at the program's line."""
    warnings.warn(
        f"{where}({option}=...) has no effect here and is ignored: {reason} ({_GUIDE})",
        DeprecationWarning,
        stacklevel=_caller_stacklevel(),
    )


def parameter_names(func: Callable[..., Any]) -> list[str]:
    """The names ``func`` (a function or class) takes as keyword arguments."""
    return [
        p.name
        for p in inspect.signature(func).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def unexpected(where: str, name: str, known: Iterable[str]) -> TypeError:
    """The ``TypeError`` for an unknown keyword argument, suggesting the
    closest of the ``known`` names."""
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return TypeError(f"{where}() got an unexpected keyword argument {name!r}{hint}")


def accept_legacy(
    where: str,
    options: Mapping[str, object],
    legacy: Mapping[str, str],
    accepted: Callable[..., Any],
) -> None:
    """Checks the keyword arguments a function took beyond its parameters
    (those of ``accepted``): a ``TypeError`` naming any that is not a 0.2
    option in ``legacy`` (a typo), else one ``DeprecationWarning`` each."""
    for name in options:
        if name not in legacy:
            raise unexpected(where, name, [*parameter_names(accepted), *legacy])
    for name in options:
        warn_ignored(where, name, legacy[name])


@dataclass
class TaskConfig:
    """Catzilla 0.2's task configuration, with its fields and defaults.
    ``priority``, ``delay_ms``, ``max_retries`` and ``timeout_ms`` mean here
    what they meant there (``task_options()`` gives them as ``add_task`` and
    ``@task`` options); ``retry_backoff``, ``memory_limit_mb``,
    ``compile_to_c`` and ``enable_profiling`` are kept for reading only:
    they have no effect. A function decorated with ``@task`` carries its
    declaration as ``func._task_config``."""

    priority: TaskPriority = TaskPriority.NORMAL
    delay_ms: int = 0
    max_retries: int = 3
    timeout_ms: int = 30000
    retry_backoff: str = "exponential"
    memory_limit_mb: int = 100
    compile_to_c: bool = True
    enable_profiling: bool = False

    def task_options(self) -> dict[str, Any]:
        """The options that take effect, as keyword arguments of ``add_task``
        or ``@task``: ``priority``, ``delay_ms``, ``max_retries``, ``timeout_ms``."""
        return {
            "priority": self.priority,
            "delay_ms": self.delay_ms,
            "max_retries": self.max_retries,
            "timeout_ms": self.timeout_ms,
        }


def _uses_store(engine: BackgroundTasks) -> bool:
    return engine.owner_id is not None


def _import_name(func: Callable[..., Any], role: str) -> str:
    """``func``'s import name, checked to find ``func`` again (as a process
    on a shared store will); ``TypeError`` otherwise."""
    from .recovery import resolve

    name = f"{getattr(func, '__module__', None)}.{getattr(func, '__qualname__', None)}"
    try:
        found = resolve(name) is func
    except LookupError:
        found = False
    if not found:
        raise TypeError(
            f"{role}: with a shared store the function must be importable by name "
            f"(a module-level function), got {func!r}"
        )
    return name


def _error_record(exc: BaseException) -> dict[str, str]:
    """A task's exception as data a task on a shared store can take as an
    argument; the original class name is kept for one rebuilt from the store."""
    from .errors import TaskError
    from .task_info import error_record

    record = error_record(exc)
    if isinstance(exc, TaskError):
        record["type"] = exc.type_name
    notes = getattr(exc, "__notes__", None)
    if notes:
        record["traceback"] = "\n".join(str(n) for n in notes)
    return record


def _rescue(handler: str, task_id: str, error: dict[str, str]) -> Any:
    """The task ``catch`` queues on a shared store: calls the handler (found
    by its import name) with the failed task's exception, rebuilt here as
    ``get_task`` readers see it (same class when catzilla's or a builtin)."""
    import json

    from .errors import rebuild_error
    from .recovery import resolve

    return resolve(handler)(rebuild_error(task_id, json.dumps(error)))


class TaskFuture(Future[T]):
    """A ``concurrent.futures.Future`` that follows a background task:
    ``result(timeout)``, ``exception()``, ``done()``, ``add_done_callback``,
    ``cancel()`` (cancels the task while it waits), and ``await future``.

    ``then(fn)`` and ``catch(fn)`` chain continuations, each run **as a task**
    on the same engine once this one is final (never on a polling thread):
    ``then`` queues ``fn(value)`` after a success, ``catch`` queues
    ``fn(exception)`` after a failure; each returns a ``TaskFuture`` that
    follows the continuation task, or carries this outcome through when the
    continuation does not apply. Give a continuation options by decorating it
    with ``@task(...)``. With a shared store the continuation must be an
    importable module-level function (it may run in another process); a
    ``catch`` handler then gets the exception rebuilt from the store.

    ``task_id`` is the id of the task whose outcome this future carries:
    None while a continuation waits for the previous task.
    """

    task_id: str | None

    def __init__(self, task_id: str, engine: BackgroundTasks) -> None:
        """Follows task ``task_id`` of ``engine``; ``ValueError`` when the
        engine does not know (or no longer retains) that task."""
        super().__init__()
        self._engine = engine
        self._handle: TaskResult | None = None
        self._lock = threading.RLock()
        self.task_id = None
        self._follow(TaskResult(task_id, engine))

    @classmethod
    def from_result(cls, result: TaskResult, engine: BackgroundTasks) -> TaskFuture[Any]:
        """The future of the task behind ``result``, a handle ``add_task``
        of ``engine`` returned: ``TaskFuture.from_result(app.add_task(f), app.tasks)``."""
        if not isinstance(result, TaskResult):
            raise TypeError(f"result must be a TaskResult, got {type(result).__name__}")
        return cls(result.task_id, engine)

    @classmethod
    def _waiting(cls, engine: BackgroundTasks) -> TaskFuture[Any]:
        """A future whose task is not queued yet (a continuation)."""
        future: TaskFuture[Any] = cls.__new__(cls)
        Future.__init__(future)
        future._engine = engine
        future._handle = None
        future._lock = threading.RLock()
        future.task_id = None
        return future

    def _follow(self, handle: TaskResult) -> None:
        """From now on, this future carries the outcome of ``handle``'s task."""
        with self._lock:
            if self.cancelled():  # cancelled while the task was being queued
                handle.cancel()
                return
            self._handle = handle
            self.task_id = handle.task_id
        handle.add_done_callback(self._settle)

    def _settle(self, handle: TaskResult) -> None:
        """The task is final (called by the engine, on the thread that finished it)."""
        try:
            status = handle.status
            if status is TaskStatus.COMPLETED:
                self.set_result(handle.result())
            elif status is TaskStatus.CANCELLED:
                Future.cancel(self)
            else:
                self.set_exception(handle.exception())
        except InvalidStateError:
            pass  # cancelled through cancel() meanwhile

    def _carry(self, previous: Future[Any]) -> None:
        """Ends this future with ``previous``'s outcome (no task of its own)."""
        if isinstance(previous, TaskFuture):
            self.task_id = previous.task_id
        try:
            if previous.cancelled():
                Future.cancel(self)
            elif previous.exception() is not None:
                self.set_exception(previous.exception())
            else:
                self.set_result(previous.result())
        except InvalidStateError:
            pass

    def _queue(self, func: Callable[..., Any], *args: Any, **options: Any) -> None:
        """Queues ``func(*args)`` as this future's task; a refusal
        (``EngineShutdownError``, ``TypeError``, ...) becomes its exception."""
        with self._lock:
            if self.cancelled():
                return
            try:
                handle = self._engine.add_task(func, *args, **options)
            except Exception as exc:  # the refusal is the outcome
                self.set_exception(exc)
                return
            self._follow(handle)

    def cancel(self) -> bool:
        """Cancels the task while it waits (or the continuation before it is
        queued); returns whether it did, as ``Future.cancel`` does."""
        with self._lock:
            handle = self._handle
            if handle is None:
                return Future.cancel(self)
        if not handle.cancel():
            return self.cancelled()
        return Future.cancel(self)

    @overload
    def then(self, fn: Callable[[T], Awaitable[R]], /) -> TaskFuture[R]: ...
    @overload
    def then(self, fn: Callable[[T], R], /) -> TaskFuture[R]: ...
    def then(self, fn: Callable[[T], Any], /) -> TaskFuture[Any]:
        """Once this task succeeds, queues ``fn(value)`` as a task; the
        returned future follows it. A failure or cancellation is carried
        through to the returned future without running ``fn``."""
        if not callable(fn):
            raise TypeError(f"then() needs a callable, got {type(fn).__name__} {fn!r}")
        engine = self._engine
        if _uses_store(engine):
            _import_name(fn, "then()")
        following = TaskFuture._waiting(engine)

        def next_step(previous: Future[Any]) -> None:
            if previous.cancelled() or previous.exception() is not None:
                following._carry(previous)
            else:
                following._queue(fn, previous.result())

        self.add_done_callback(next_step)
        return following

    def catch(self, fn: Callable[[BaseException], Any], /) -> TaskFuture[Any]:
        """Once this task fails, queues ``fn(exception)`` as a task; the
        returned future follows it. A value is carried through to the
        returned future without running ``fn``, and so is a cancellation."""
        if not callable(fn):
            raise TypeError(f"catch() needs a callable, got {type(fn).__name__} {fn!r}")
        engine = self._engine
        handler = _import_name(fn, "catch()") if _uses_store(engine) else None
        following = TaskFuture._waiting(engine)

        def next_step(previous: Future[Any]) -> None:
            exc = None if previous.cancelled() else previous.exception()
            if exc is None:
                following._carry(previous)
            elif handler is None:
                following._queue(fn, exc)
            else:
                task_id = previous.task_id if isinstance(previous, TaskFuture) else None
                following._queue(
                    _rescue,
                    handler,
                    task_id or "?",
                    _error_record(exc),
                    **_declared_options(fn),
                )

        self.add_done_callback(next_step)
        return following

    def __await__(self) -> Generator[Any, None, T]:
        """``await future`` suspends until the task is final and returns its
        value (or raises its exception)."""
        return asyncio.wrap_future(self).__await__()


def _declared_options(func: Callable[..., Any]) -> dict[str, Any]:
    """The ``add_task`` options a ``@task`` declaration gave ``func``."""
    from .task_function import TaskFunction

    if isinstance(func, TaskFunction):
        return {k: v for k, v in func._options.items() if k != "no_retry_for"}
    return {}


# The global task system of Catzilla 0.2.

_global_system: BackgroundTasks | None = None
_global_lock = threading.Lock()


def create_task_system(
    workers: int | None = None,
    enable_auto_scaling: bool = True,
    memory_pool_mb: float = 500,
    **options: Any,
) -> BackgroundTasks:
    """A new engine: ``BackgroundTasks(workers=..., enable_auto_scaling=...,
    memory_pool_mb=..., **options)`` (any other ``BackgroundTasks`` option)."""
    from .engine import BackgroundTasks

    return BackgroundTasks(
        workers=workers,
        enable_auto_scaling=enable_auto_scaling,
        memory_pool_mb=memory_pool_mb,
        **options,
    )


def get_global_task_system() -> BackgroundTasks:
    """The process's global engine, created with the defaults on first use
    (and again in a child of ``os.fork()``). Like every engine it drains at
    interpreter exit; once ``shutdown()`` it stays shut down."""
    global _global_system
    with _global_lock:
        if _global_system is None or _global_system.is_forked:
            _global_system = create_task_system()
        return _global_system


def add_task(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskResult:
    """Queues ``func(*args, **kwargs)`` on the global engine; the options are
    those of ``BackgroundTasks.add_task`` (0.2's ``compile_to_c`` is
    accepted with a ``DeprecationWarning``)."""
    return get_global_task_system().add_task(func, *args, **kwargs)


def warn_compile_to_c() -> None:
    """The warning for 0.2's ``add_task(compile_to_c=...)``; the native
    ``add_task`` calls it when the option is given."""
    warn_ignored("add_task", "compile_to_c", ADD_TASK_OPTIONS["compile_to_c"])
