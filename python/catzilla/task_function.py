"""Declaring task functions: ``@task``, the functions it registers, and
``current_task()`` for the task running here."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypedDict, TypeVar, cast, overload

if TYPE_CHECKING:
    from typing_extensions import Unpack

from . import _aio
from ._catzilla import TaskDefaults, TaskResult, _current_task
from .compat import TASK_OPTIONS, TaskConfig, unexpected, warn_ignored
from .enums import TaskPriority

P = ParamSpec("P")
R = TypeVar("R")

#: Functions decorated with ``@task``, by import name (``module.qualname``).
registered_tasks: dict[str, TaskFunction[Any, Any]] = {}


class TaskFunction(Generic[P, R]):
    """A function decorated with ``@task``: call it to run it directly, or pass
    it to ``add_task`` to run it in the background with its configured options.

    As in Catzilla 0.2, ``_is_background_task`` is True and ``_task_config``
    is the declaration as a ``TaskConfig``."""

    _is_background_task = True

    def __init__(
        self,
        func: Callable[P, R],
        defaults: TaskDefaults,
        options: TaskOptions | None = None,
        config: TaskConfig | None = None,
    ) -> None:
        functools.update_wrapper(self, func)
        self.__wrapped__ = func
        self.name = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', '?')}"
        # What add_task reads: the function and its declared defaults, checked once.
        self._catzilla_task = (func, defaults)
        self._options: TaskOptions = options if options is not None else {}
        self._task_config = config if config is not None else TaskConfig()

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.__wrapped__(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<task {self.name}>"


class TaskOptions(TypedDict, total=False):
    """The options of ``@task``: the function's defaults for ``add_task``."""

    priority: TaskPriority | None
    max_retries: int | None
    timeout_ms: float | None
    delay_ms: float | None
    no_retry_for: tuple[type[BaseException], ...]
    queue: str | None


@overload
def task(func: Callable[P, R], /) -> TaskFunction[P, R]: ...
@overload
def task(
    priority: TaskPriority | None = None, /, **options: Unpack[TaskOptions]
) -> Callable[[Callable[P, R]], TaskFunction[P, R]]: ...
def task(
    func: Callable[..., Any] | TaskPriority | None = None, /, **options: Unpack[TaskOptions]
) -> Any:
    """Declares a task function, bare (``@task``) or with options
    (``@task(priority=TaskPriority.HIGH, max_retries=5)``).

    The options become the defaults when the function is passed to ``add_task``;
    arguments given to ``add_task`` still win. Exceptions listed in
    ``no_retry_for`` fail the task at once. The function is registered by its
    import name in ``registered_tasks``.

    Catzilla 0.2's forms still work: the priority as the first argument
    (``@task(TaskPriority.HIGH)``), and its options that have no effect here
    (``compile_to_c``, ``retry_backoff``, ``memory_limit_mb``,
    ``enable_profiling``), each with a ``DeprecationWarning``.
    """
    given: dict[str, Any] = dict(options)
    if isinstance(func, TaskPriority):
        if "priority" in given:
            raise TypeError("task() got the priority both as an argument and as priority=")
        given["priority"] = func
        func = None
    legacy = {name: given.pop(name) for name in list(given) if name in TASK_OPTIONS}
    for name in given:
        if name not in TaskOptions.__optional_keys__:
            raise unexpected("task", name, [*TaskOptions.__optional_keys__, *TASK_OPTIONS])
    for name in legacy:
        warn_ignored("task", name, TASK_OPTIONS[name])
    no_retry_for = given.get("no_retry_for", ())
    if not isinstance(no_retry_for, tuple) or not all(
        isinstance(t, type) and issubclass(t, BaseException) for t in no_retry_for
    ):
        raise TypeError(f"no_retry_for must be a tuple of exception classes, got {no_retry_for!r}")
    defaults = TaskDefaults(  # checks each option, as add_task does
        priority=given.get("priority"),
        delay_ms=given.get("delay_ms"),
        max_retries=given.get("max_retries"),
        timeout_ms=given.get("timeout_ms"),
        no_retry_for=no_retry_for or None,
        queue=given.get("queue"),
    )
    declared = cast(TaskOptions, {k: v for k, v in given.items() if v is not None})
    config = TaskConfig(
        **{k: v for k, v in {**given, **legacy}.items() if k in _CONFIG_FIELDS and v is not None}
    )

    def wrap(f: Callable[P, R]) -> TaskFunction[P, R]:
        if not callable(f):
            raise TypeError(f"@task needs a callable, got {type(f).__name__} {f!r}")
        wrapped = TaskFunction(f, defaults, declared, config)
        registered_tasks[wrapped.name] = wrapped
        return wrapped

    return wrap(func) if func is not None else wrap


_CONFIG_FIELDS = frozenset(TaskConfig.__dataclass_fields__)


def current_task() -> TaskResult:
    """The handle of the task running here (sync or async), for example to
    report progress: ``current_task().set_progress(40, "parsing")``.

    Raises ``RuntimeError`` outside a running task."""
    handle = _aio.current_task_handle.get() or _current_task()
    if handle is None:
        raise RuntimeError("current_task() was called outside a running background task")
    return handle
