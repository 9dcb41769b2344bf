"""Random and wrong arguments to every public API of the task engine and the app.

Each wrong argument must get a clear Python exception (``TypeError`` or
``ValueError``, or catzilla's own error where one is documented: a full queue,
a shut down engine, a store that cannot be opened) whose message names the
argument at fault: never a crash, a hang, or a silent acceptance. Valid values,
drawn at random too, must be accepted and work. These property tests
complement the hand-picked cases of test_engine_errors.py.

The tests near the end began as strict xfails, one per bug this suite found
(huge counts, conversions that did not name the argument, a task awaiting its
own handle, ...); each bug is fixed and its test now guards it.
"""

from __future__ import annotations

import itertools
import math
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
from catzilla import Catzilla
from catzilla.background_tasks import (
    BackgroundTasks,
    CatzillaError,
    EngineShutdownError,
    StorageError,
    TaskCancelledError,
    TaskFunction,
    TaskInfo,
    TaskNotReadyError,
    TaskPriority,
    TaskQueueFullError,
    TaskResult,
    TaskStatus,
    current_task,
    task,
)
from helpers import DEADLINE, Blocker, Recorder, run_python, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

# --- helpers -----------------------------------------------------------------------

RESERVED = frozenset({"func", "priority", "delay_ms", "max_retries", "timeout_ms"})
INT_PARAMS = ("workers", "min_workers", "max_workers", "queue_size")
FLOAT_PARAMS = (
    "memory_pool_mb",
    "result_ttl",
    "retry_backoff_ms",
    "retry_backoff_cap_ms",
    "starvation_ms",
    "idle_timeout",
    "exit_timeout",
)
BOOL_PARAMS = ("enable_auto_scaling", "enable_profiling")
DEFAULT_MS = ("default_delay_ms", "default_timeout_ms")
# The longest span the native core holds (a Rust Duration) is about 1.8447e19 s.
MAX_SECONDS = 1.8e19
TOO_MANY_SECONDS = 1.85e19
MAX_MS = MAX_SECONDS * 1000
TOO_MANY_MS = TOO_MANY_SECONDS * 1000
# Integers a C double cannot hold (float(x) overflows).
BEYOND_FLOAT = 2**1024


def echo(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def _discard(value: Any) -> None:
    """Cleans up what a call that should have failed made instead."""
    if isinstance(value, BackgroundTasks):
        value.shutdown(wait_for_completion=False, timeout=1)
    elif isinstance(value, TaskResult):
        value.cancel()


def rejected(
    call: Callable[[], Any], errors: type[BaseException] | tuple[type[BaseException], ...], *names
) -> BaseException:
    """Runs ``call``, which must raise one of ``errors`` whose message contains
    one of ``names`` (when given). Returns the exception."""
    try:
        value = call()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # a pyo3 PanicException is a BaseException: also a failure
        kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
        assert isinstance(exc, errors), f"wrong exception {kind}: {exc}"
        if names:
            assert any(n in str(exc) for n in names), (
                f"{kind} message does not name {' or '.join(names)}: {exc}"
            )
        return exc
    _discard(value)
    raise AssertionError(f"accepted: returned {value!r}")


def returns_or_value_error(call: Callable[[], Any], *names: str) -> Any:
    """Runs ``call``, which may return or raise ``ValueError`` naming one of ``names``."""
    try:
        return call()
    except ValueError as exc:
        assert any(n in str(exc) for n in names), f"ValueError does not name {names}: {exc}"
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
        raise AssertionError(f"wrong exception {kind}: {exc}") from exc
    return None


def in_task(engine: BackgroundTasks, body: Callable[[], Any], use_async: bool = False) -> Any:
    """Runs ``body`` inside a task (a sync one, or a coroutine on the event loop)
    and returns what it returned."""
    if use_async:

        async def coroutine() -> Any:
            return body()

        return engine.add_task(coroutine).wait(DEADLINE)
    return engine.add_task(body).wait(DEADLINE)


def caught(call: Callable[[], Any]) -> BaseException | None:
    """The exception ``call`` raised, or None: for calls made inside a task."""
    try:
        call()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        return exc
    return None


def submitted(engine: BackgroundTasks) -> int:
    return engine.get_stats().total_tasks_submitted


@contextmanager
def engine_with(**options: Any) -> Iterator[BackgroundTasks]:
    """An engine for one example, shut down after it."""
    options.setdefault("retry_backoff_ms", 1)
    options.setdefault("retry_backoff_cap_ms", 5)
    engine = BackgroundTasks(**options)
    try:
        yield engine
    finally:
        engine.shutdown(wait_for_completion=False, timeout=1)


@contextmanager
def holding(engine: BackgroundTasks) -> Iterator[TaskResult]:
    """Holds one worker of ``engine`` with a Blocker for the block's duration."""
    blocker = Blocker()
    handle = engine.add_task(blocker, "held")
    try:
        blocker.wait_started()
        yield handle
    finally:
        blocker.release()
        handle.wait(DEADLINE)


@pytest.fixture(scope="module")
def shared() -> Iterator[BackgroundTasks]:
    """One engine for the examples that leave it as they found it."""
    engine = BackgroundTasks(
        workers=2,
        max_workers=2,
        enable_auto_scaling=False,
        retry_backoff_ms=1,
        retry_backoff_cap_ms=5,
    )
    yield engine
    engine.shutdown(wait_for_completion=False, timeout=1)


@pytest.fixture(scope="module")
def finished(shared: BackgroundTasks) -> TaskResult:
    handle = shared.add_task(echo, "done")
    assert handle.wait(DEADLINE) == (("done",), {})
    return handle


@pytest.fixture(scope="module")
def waiting(shared: BackgroundTasks) -> Iterator[TaskResult]:
    """A task that waits for its (long) delay for the whole module."""
    handle = shared.add_task(echo, "never", delay_ms=600_000)
    yield handle
    handle.cancel()


@pytest.fixture(scope="module")
def app() -> Iterator[Catzilla]:
    application = Catzilla()
    application.enable_background_tasks(
        workers=1, max_workers=2, retry_backoff_ms=1, retry_backoff_cap_ms=5
    )
    yield application
    assert application.tasks is not None
    application.tasks.shutdown(wait_for_completion=False, timeout=1)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-store")


# --- strategies --------------------------------------------------------------------


class Opaque:
    """An object of no use to anything."""

    def __repr__(self) -> str:
        return "<opaque>"


class FakePriority(Enum):
    """TaskPriority's names and values, in another class."""

    CRITICAL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3


TEXTS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["1", "0", "-1", "nan", "inf", "HIGH", "NORMAL", "completed", "30s"]),
)
CONTAINERS = st.one_of(
    st.lists(st.integers(), max_size=3),
    st.tuples(st.integers()),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.frozensets(st.integers(), max_size=2),
)
OBJECTS = st.one_of(st.builds(object), st.builds(Opaque))
ENUM_MEMBERS = st.sampled_from([*TaskPriority, *TaskStatus, *FakePriority])
WRONG_NUMBER_TYPES_NO_BOOL = st.one_of(
    TEXTS,
    st.binary(max_size=6),
    CONTAINERS,
    OBJECTS,
    ENUM_MEMBERS,
    st.complex_numbers(max_magnitude=1e6),
)
WRONG_NUMBER_TYPES = st.one_of(WRONG_NUMBER_TYPES_NO_BOOL, st.booleans())
WRONG_INT_TYPES = st.one_of(WRONG_NUMBER_TYPES, st.floats(allow_nan=True))
NOT_BOOLS = st.one_of(
    st.integers(), st.floats(allow_nan=True), TEXTS, st.none(), CONTAINERS, OBJECTS
)
NON_CALLABLES = st.one_of(
    st.integers(),
    st.floats(allow_nan=True),
    TEXTS,
    st.none(),
    st.binary(max_size=4),
    CONTAINERS,
    OBJECTS,
    ENUM_MEMBERS,
)
BAD_PRIORITIES = st.one_of(
    st.integers(),
    st.floats(allow_nan=True),
    TEXTS,
    st.booleans(),
    st.sampled_from([*TaskStatus, *FakePriority]),
    st.sampled_from([p.name for p in TaskPriority] + [p.value for p in TaskPriority]),
    CONTAINERS,
    OBJECTS,
)

NAN_INF = st.sampled_from([math.nan, math.inf, -math.inf])
NEGATIVE_FLOATS = st.floats(max_value=-1e-300)  # down to -inf
NEGATIVE_INTS = st.integers(min_value=-(10**300), max_value=-1)  # within a double's range
# Bad values of a number of milliseconds: negative, nan, infinite, or too large.
BAD_MS = st.one_of(
    NEGATIVE_FLOATS,
    NAN_INF,
    NEGATIVE_INTS,
    st.floats(min_value=TOO_MANY_MS),
    st.integers(min_value=10**23, max_value=10**300),
)
# Bad values of a timeout in seconds (wait, shutdown).
BAD_SECONDS = st.one_of(NEGATIVE_FLOATS, NAN_INF, NEGATIVE_INTS)
# Bad retry counts: negative, or beyond 32 bits (but within 64).
BAD_COUNTS = st.one_of(st.integers(-(2**63), -1), st.integers(2**32, 2**63 - 1))
HUGE_INTS = st.integers(min_value=BEYOND_FLOAT, max_value=BEYOND_FLOAT**2)
HUGE_SIGNED_INTS = st.one_of(HUGE_INTS, HUGE_INTS.map(lambda n: -n))

VALID_PRIORITIES = st.one_of(st.none(), st.sampled_from(TaskPriority))
VALID_DELAYS = st.one_of(st.none(), st.just(0), st.integers(0, 50), st.floats(0, 50), st.just(-0.0))
VALID_RETRIES = st.one_of(st.none(), st.integers(0, 5), st.just(2**32 - 1))
VALID_TIMEOUTS = st.one_of(
    st.none(), st.sampled_from([0, 0.0]), st.integers(5_000, 10**12), st.floats(5_000, MAX_MS)
)
VALID_OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "priority": VALID_PRIORITIES,
        "delay_ms": VALID_DELAYS,
        "max_retries": VALID_RETRIES,
        "timeout_ms": VALID_TIMEOUTS,
    },
)
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.text(max_size=8), st.floats(allow_nan=False)
)
KW_NAMES = st.text(max_size=8).filter(lambda s: s not in RESERVED)
VALID_PERCENTS = st.one_of(st.floats(0, 100), st.integers(0, 100))
BAD_PERCENT_VALUES = st.one_of(
    st.floats(max_value=-1e-300),
    st.floats(min_value=100, exclude_min=True),
    st.just(math.nan),
    NEGATIVE_INTS,
    st.integers(min_value=101, max_value=10**300),
)
BAD_PERCENT_TYPES = st.one_of(WRONG_NUMBER_TYPES, st.none())
NOT_STRS = st.one_of(
    st.integers(), st.floats(allow_nan=True), st.booleans(), st.binary(max_size=4), CONTAINERS
)
SURROGATE_TEXTS = st.tuples(
    st.text(max_size=4), st.characters(categories=("Cs",)), st.text(max_size=4)
).map("".join)


def named(name: str, values: st.SearchStrategy[Any], errors: Any, *names: str) -> Any:
    """Draws ``(argument, value, expected errors, names the message may use)``."""
    return values.map(lambda v: (name, v, errors, (name, *names)))


BAD_ADD_TASK = st.one_of(
    named("func", NON_CALLABLES, TypeError),
    named("priority", BAD_PRIORITIES, TypeError),
    *(named(n, BAD_MS, ValueError) for n in ("delay_ms", "timeout_ms")),
    *(named(n, WRONG_NUMBER_TYPES, TypeError) for n in ("delay_ms", "timeout_ms")),
    named("max_retries", BAD_COUNTS, ValueError),
    named("max_retries", WRONG_INT_TYPES, TypeError),
)


def ctor(name: str, values: st.SearchStrategy[Any], errors: Any, *names: str) -> Any:
    """Draws ``(argument, constructor options, expected errors, names)``."""
    return values.map(lambda v: (name, {name: v}, errors, (name, *names)))


def short(name: str) -> str:
    """The option a ``default_*`` constructor argument sets, as messages call it."""
    return name.removeprefix("default_")


CTOR_WRONG_TYPES = st.one_of(
    *(ctor(n, WRONG_INT_TYPES, TypeError) for n in ("workers", "max_workers")),
    *(ctor(n, st.one_of(WRONG_INT_TYPES, st.none()), TypeError) for n in INT_PARAMS[1::2]),
    *(ctor(n, st.one_of(WRONG_NUMBER_TYPES, st.none()), TypeError) for n in FLOAT_PARAMS),
    *(ctor(n, NOT_BOOLS, TypeError) for n in BOOL_PARAMS),
    ctor("default_priority", st.one_of(BAD_PRIORITIES, st.none()), TypeError, "priority"),
    *(ctor(n, st.one_of(WRONG_NUMBER_TYPES, st.none()), TypeError, short(n)) for n in DEFAULT_MS),
    ctor("default_max_retries", st.one_of(WRONG_INT_TYPES, st.none()), TypeError, "max_retries"),
)
BAD_STORAGE = st.one_of(
    TEXTS.filter(lambda s: not s.startswith("sqlite:///")),
    st.sampled_from(
        ["sqlite:///", "sqlite://x.db", "sqlite:/x.db", "SQLITE:///x.db", "postgres:///x", "/x.db"]
    ),
    st.integers(),
    st.booleans(),
    st.binary(max_size=5),
    CONTAINERS,
    OBJECTS,
)
MAX_BELOW_WORKERS = st.integers(2, 6).flatmap(
    lambda w: st.integers(1, w - 1).map(
        lambda m: ("max_workers", {"workers": w, "max_workers": m}, ValueError, ("max_workers",))
    )
)
CTOR_BAD_VALUES = st.one_of(
    *(ctor(n, st.integers(max_value=0), ValueError) for n in INT_PARAMS),
    MAX_BELOW_WORKERS,
    *(ctor(n, st.one_of(BAD_SECONDS, st.integers(max_value=-1)), ValueError) for n in FLOAT_PARAMS),
    *(
        ctor(n, st.sampled_from([0, 0.0, -0.0]), ValueError)
        for n in ("memory_pool_mb", "idle_timeout")
    ),
    *(
        ctor(n, st.floats(min_value=TOO_MANY_SECONDS, allow_infinity=False), ValueError)
        for n in ("result_ttl", "idle_timeout")
    ),
    *(
        ctor(n, st.floats(min_value=TOO_MANY_MS, allow_infinity=False), ValueError)
        for n in ("retry_backoff_ms", "retry_backoff_cap_ms", "starvation_ms")
    ),
    *(ctor(n, BAD_MS, ValueError, short(n)) for n in DEFAULT_MS),
    ctor("default_max_retries", BAD_COUNTS, ValueError, "max_retries"),
    ctor("storage", BAD_STORAGE, (TypeError, ValueError)),
)


@st.composite
def valid_engine_options(draw: st.DrawFn) -> dict[str, Any]:
    """Constructor options an engine must accept (small worker counts)."""
    workers = draw(st.integers(1, 3))
    options = draw(
        st.fixed_dictionaries(
            {"workers": st.just(workers)},
            optional={
                "min_workers": st.integers(1, 4),
                "max_workers": st.one_of(st.none(), st.integers(workers, workers + 2)),
                "queue_size": st.integers(1, 10**9),
                "enable_auto_scaling": st.booleans(),
                "memory_pool_mb": st.one_of(st.integers(1, 10**6), st.floats(1e-6, 1e300)),
                "enable_profiling": st.booleans(),
                "result_ttl": st.one_of(st.integers(0, 10**6), st.floats(0, MAX_SECONDS)),
                "retry_backoff_ms": st.one_of(st.integers(0, 10**4), st.floats(0, MAX_MS)),
                "retry_backoff_cap_ms": st.one_of(st.integers(0, 10**5), st.floats(0, MAX_MS)),
                "starvation_ms": st.one_of(st.integers(0, 10**5), st.floats(0, MAX_MS)),
                "idle_timeout": st.floats(1e-3, MAX_SECONDS),
                "exit_timeout": st.one_of(st.integers(0, 60), st.floats(0, 1e300)),
                "default_priority": st.sampled_from(TaskPriority),
                "default_delay_ms": st.one_of(st.integers(0, 50), st.floats(0, 50)),
                "default_max_retries": st.integers(0, 2**32 - 1),
                "default_timeout_ms": st.one_of(st.just(0), st.floats(5_000, MAX_MS)),
                "storage": st.none(),
            },
        )
    )
    return options


# --- BackgroundTasks(...) -------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(bad=st.one_of(CTOR_WRONG_TYPES, CTOR_BAD_VALUES))
def test_constructor_rejects_wrong_arguments(bad):
    _, options, errors, names = bad
    rejected(lambda: BackgroundTasks(**{"workers": 1, **options}), errors, *names)


@settings(max_examples=25, deadline=None)
@given(options=valid_engine_options())
def test_constructor_accepts_valid_arguments_and_runs_tasks(options):
    with engine_with(**options) as e:
        assert not e.is_shutdown
        assert e.config["workers"] == options["workers"]
        assert e.config["max_workers"] >= e.config["workers"]
        assert 1 <= e.config["min_workers"] <= e.config["workers"]
        h = e.add_task(echo, "x", key=1)
        assert h.priority is options.get("default_priority", TaskPriority.NORMAL)
        assert h.wait(DEADLINE) == (("x",), {"key": 1})
        assert h.status is TaskStatus.COMPLETED
        assert 1 <= e.get_stats().total_workers <= e.config["max_workers"]


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(FLOAT_PARAMS + DEFAULT_MS),
    value=st.floats(min_value=1e6, max_value=sys.float_info.max),
)
def test_constructor_huge_finite_numbers_are_accepted_or_value_errors(name, value):
    e = returns_or_value_error(
        lambda: BackgroundTasks(workers=1, **{name: value}), name, short(name)
    )
    if e is not None:
        try:
            assert e.add_task(echo, 1, delay_ms=0).wait(DEADLINE) == ((1,), {})
        finally:
            e.shutdown(wait_for_completion=False, timeout=1)


@settings(max_examples=15, deadline=None)
@given(
    name=st.text(
        st.characters(exclude_characters="/", exclude_categories=("Cs",)), min_size=1, max_size=12
    )
)
def test_constructor_unopenable_storage_is_a_storage_error_naming_the_path(store_dir, name):
    # (One path component, so that no "../.." can climb out of the missing directory.
    # Lone surrogates make no path at all: that is a ValueError, tested by
    # test_storage_paths_with_surrogates_are_storage_or_value_errors.)
    missing = store_dir / "no" / "such" / "dir"
    storage = f"sqlite:///{missing}/{name}"
    exc = rejected(lambda: BackgroundTasks(workers=1, storage=storage), StorageError)
    assert str(missing) in str(exc)


_store_numbers = itertools.count()


@settings(max_examples=5, deadline=None)
@given(options=valid_engine_options())
def test_constructor_accepts_a_storage_path(store_dir, options):
    options["storage"] = f"sqlite:///{store_dir}/tasks-{next(_store_numbers)}.db"
    with engine_with(**options) as e:
        h = e.add_task(echo, 2)
        assert h.wait(DEADLINE) == ((2,), {})
        assert e.flush(DEADLINE)
        info = e.get_task(h.task_id)
        assert info is not None
        assert info.status is TaskStatus.COMPLETED
        assert e.storage_error is None


# --- add_task ---------------------------------------------------------------------


def call_add_task(add: Callable[..., TaskResult], name: str, value: Any, options: dict) -> Any:
    if name == "func":
        return add(value, **options)
    return add(echo, **{**options, name: value})


@settings(max_examples=200, deadline=None)
@given(bad=BAD_ADD_TASK, options=VALID_OPTIONS)
def test_add_task_rejects_wrong_arguments(shared, bad, options):
    name, value, errors, names = bad
    before = submitted(shared)
    rejected(lambda: call_add_task(shared.add_task, name, value, options), errors, *names)
    assert submitted(shared) == before


@settings(max_examples=40, deadline=None)
@given(
    options=VALID_OPTIONS,
    args=st.lists(VALUES, max_size=3),
    kwargs=st.dictionaries(KW_NAMES, VALUES, max_size=3),
)
def test_add_task_accepts_valid_arguments_and_runs(shared, options, args, kwargs):
    h = shared.add_task(echo, *args, **options, **kwargs)
    assert h.priority is (options.get("priority") or TaskPriority.NORMAL)
    assert h.wait(DEADLINE) == (tuple(args), kwargs)
    assert h.status is TaskStatus.COMPLETED
    assert h.attempts == 1
    assert h.progress == 100.0


@settings(max_examples=25, deadline=None)
@given(
    callable_kind=st.sampled_from(["class", "builtin", "bound method", "callable object"]),
    options=VALID_OPTIONS,
)
def test_add_task_accepts_every_kind_of_callable(shared, callable_kind, options):
    class Call:
        def __call__(self) -> str:
            return "called"

    func, expected = {
        "class": (dict, {}),
        "builtin": (len, 0),
        "bound method": ("abc".upper, "ABC"),
        "callable object": (Call(), "called"),
    }[callable_kind]
    args = ((),) if callable_kind == "builtin" else ()
    assert shared.add_task(func, *args, **options).wait(DEADLINE) == expected


@settings(max_examples=10, deadline=None)
@given(data=st.data(), queue_size=st.integers(1, 5))
def test_full_queue_raises_task_queue_full_error_and_keeps_what_was_queued(data, queue_size):
    fill = data.draw(st.lists(VALID_OPTIONS, min_size=queue_size, max_size=queue_size))
    overflow = data.draw(VALID_OPTIONS)
    name, value, errors, names = data.draw(BAD_ADD_TASK)
    ran = Recorder()
    with engine_with(
        workers=1, max_workers=1, enable_auto_scaling=False, queue_size=queue_size
    ) as e:
        with holding(e):
            queued = [e.add_task(ran.append, i, **opts) for i, opts in enumerate(fill)]
            exc = rejected(
                lambda: e.add_task(ran.append, "overflow", **overflow),
                TaskQueueFullError,
                f"queue_size={queue_size}",
            )
            assert isinstance(exc, CatzillaError)
            # A wrong argument is still reported as such on a full queue.
            rejected(lambda: call_add_task(e.add_task, name, value, {}), errors, *names)
            stats = e.get_stats()
            assert (stats.rejected_tasks, stats.total_queued) == (1, queue_size)
        assert sorted(h.wait(DEADLINE) for h in queued) == list(range(queue_size))
        assert e.add_task(ran.append, "room").wait(DEADLINE) == "room"
    assert "overflow" not in ran.snapshot()


@settings(max_examples=10, deadline=None)
@given(
    wait=st.booleans(),
    timeout=st.one_of(st.integers(0, 1), st.floats(0, 0.5)),
    options=VALID_OPTIONS,
)
def test_add_task_after_shutdown_raises_engine_shutdown_error(wait, timeout, options):
    with engine_with(workers=1) as e:
        assert e.add_task(echo, 1).wait(DEADLINE) == ((1,), {})
        report = e.shutdown(wait_for_completion=wait, timeout=timeout)
        assert report == {
            "drained": True,
            "cancelled": [],
            "still_running": [],
            "handed_back": [],
        }
        assert e.is_shutdown
        exc = rejected(lambda: e.add_task(echo, 2, **options), EngineShutdownError, "shut down")
        assert isinstance(exc, RuntimeError)
        assert e.get_stats().total_tasks_submitted == 1


# --- shutdown and flush ----------------------------------------------------------------


SHUTDOWN_BAD = st.one_of(
    named("timeout", BAD_SECONDS, ValueError),
    named("timeout", WRONG_NUMBER_TYPES_NO_BOOL, TypeError),
    named("wait_for_completion", NOT_BOOLS, TypeError),
)


@settings(max_examples=20, deadline=None)
@given(bad=SHUTDOWN_BAD)
def test_shutdown_rejects_wrong_arguments_and_keeps_running(bad):
    name, value, errors, names = bad
    with engine_with(workers=1) as e:
        # The message check for wrong types is test_native_conversion_errors_name_the_argument.
        rejected(
            lambda: e.shutdown(**{name: value}), errors, *(names if errors is ValueError else ())
        )
        assert not e.is_shutdown
        assert e.add_task(echo, 3).wait(DEADLINE) == ((3,), {})


@settings(max_examples=20, deadline=None)
@given(timeout=WRONG_NUMBER_TYPES_NO_BOOL)
def test_flush_rejects_wrong_types(shared, timeout):
    rejected(lambda: shared.flush(timeout), TypeError)


@settings(max_examples=20, deadline=None)
@given(timeout=st.one_of(st.integers(0, 10**6), st.floats(0, 1e300)))
def test_flush_without_storage_is_true_at_once(shared, timeout):
    assert shared.flush(timeout) is True


# --- TaskResult ---------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(timeout=BAD_SECONDS)
def test_wait_rejects_bad_timeouts(finished, waiting, timeout):
    for handle in (finished, waiting):
        rejected(lambda h=handle: h.wait(timeout=timeout), ValueError, "timeout")
        rejected(lambda h=handle: h.wait(timeout), ValueError, "timeout")


@settings(max_examples=40, deadline=None)
@given(timeout=WRONG_NUMBER_TYPES_NO_BOOL)
def test_wait_rejects_wrong_types(finished, waiting, timeout):
    for handle in (finished, waiting):
        rejected(lambda h=handle: h.wait(timeout=timeout), TypeError)


@settings(max_examples=30, deadline=None)
@given(timeout=st.one_of(st.none(), st.integers(0, 10**300), st.floats(0, sys.float_info.max)))
def test_wait_on_a_finished_task_returns_its_value(finished, timeout):
    assert finished.wait(timeout) == (("done",), {})
    assert finished.wait(timeout=timeout) == (("done",), {})


@settings(max_examples=10, deadline=None)
@given(timeout=st.one_of(st.just(0), st.floats(0, 0.02)))
def test_wait_times_out_on_a_running_task(shared, timeout):
    with holding(shared) as running:
        rejected(lambda: running.wait(timeout=timeout), TimeoutError, running.task_id)
        assert running.status is TaskStatus.RUNNING


@settings(max_examples=30, deadline=None)
@given(
    args=st.lists(VALUES, max_size=2),
    kwargs=st.dictionaries(st.sampled_from(["timeout", "block", "x"]), VALUES, max_size=2),
    method=st.sampled_from(["result", "exception", "cancel", "is_ready"]),
)
def test_argumentless_methods_reject_arguments(finished, waiting, args, kwargs, method):
    if not args and not kwargs:
        kwargs = {"timeout": 1}
    for handle in (finished, waiting):
        rejected(lambda h=handle: getattr(h, method)(*args, **kwargs), TypeError)
    assert waiting.status is TaskStatus.SCHEDULED
    assert finished.result() == (("done",), {})


def test_cancel_and_result_of_a_waiting_task(shared):
    h = shared.add_task(echo, "late", delay_ms=600_000)
    rejected(h.result, TaskNotReadyError, h.task_id)
    assert h.cancel() is True
    assert h.cancel() is False
    assert h.status is TaskStatus.CANCELLED
    rejected(lambda: h.wait(DEADLINE), TaskCancelledError, h.task_id)
    rejected(h.result, TaskCancelledError, h.task_id)


@settings(max_examples=30, deadline=None)
@given(func=NON_CALLABLES)
def test_add_callback_rejects_non_callables(finished, waiting, func):
    for handle in (finished, waiting):
        rejected(lambda h=handle: h.add_callback(func), TypeError, "callback", "func")
        rejected(lambda h=handle: h.add_done_callback(func), TypeError, "callback", "func")


@settings(max_examples=15, deadline=None)
@given(before=st.booleans(), delay_ms=st.integers(0, 20), bad=NON_CALLABLES)
def test_add_callback_calls_a_callable_once_after_a_rejected_one(shared, before, delay_ms, bad):
    calls = Recorder()
    h = shared.add_task(echo, "cb", delay_ms=delay_ms)
    if not before:
        h.wait(DEADLINE)
    rejected(lambda: h.add_done_callback(bad), TypeError)
    h.add_done_callback(lambda handle: calls.append((type(handle), handle.task_id)))
    h.wait(DEADLINE)
    wait_until(lambda: len(calls) >= 1, what="the callback")
    assert calls.snapshot() == [(TaskResult, h.task_id)]


# --- current_task and set_progress ----------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(args=st.lists(VALUES, max_size=2))
def test_current_task_outside_a_task_is_a_runtime_error(args):
    rejected(current_task, RuntimeError, "outside")
    if args:
        rejected(lambda: current_task(*args), TypeError)


def test_current_task_in_callbacks_and_threads_of_a_task_is_a_runtime_error(shared):
    seen = Recorder()

    def spawns_a_thread() -> None:
        t = threading.Thread(target=lambda: seen.append(caught(current_task)))
        t.start()
        t.join(DEADLINE)

    h = shared.add_task(spawns_a_thread)
    h.add_callback(lambda _: seen.append(caught(current_task)))
    h.wait(DEADLINE)
    wait_until(lambda: len(seen) == 2, what="thread and callback")
    for exc in seen.snapshot():
        assert isinstance(exc, RuntimeError), exc
        assert "outside" in str(exc)


@settings(max_examples=40, deadline=None)
@given(
    bad=st.one_of(
        BAD_PERCENT_VALUES.map(lambda v: (v, ValueError)),
        BAD_PERCENT_TYPES.map(lambda v: (v, TypeError)),
    ),
    step=st.one_of(st.none(), st.text(max_size=10)),
    use_async=st.booleans(),
)
def test_set_progress_rejects_bad_percents_inside_a_task(shared, bad, step, use_async):
    percent, errors = bad

    def body() -> tuple[BaseException | None, float, str | None]:
        handle = current_task()
        handle.set_progress(12.5, "start")
        exc = caught(lambda: handle.set_progress(percent, step))
        return exc, handle.progress, handle.current_step

    exc, progress, current_step = in_task(shared, body, use_async)
    rejected(lambda: _raise(exc), errors, "percent")
    assert (progress, current_step) == (12.5, "start")


def _raise(exc: BaseException | None) -> None:
    if exc is not None:
        raise exc


@settings(max_examples=25, deadline=None)
@given(step=NOT_STRS, use_async=st.booleans())
def test_set_progress_rejects_a_step_of_the_wrong_type(shared, step, use_async):
    def body() -> tuple[BaseException | None, float, str | None]:
        handle = current_task()
        exc = caught(lambda: handle.set_progress(50, step))
        return exc, handle.progress, handle.current_step

    exc, progress, current_step = in_task(shared, body, use_async)
    # The message check is test_native_conversion_errors_name_the_argument.
    rejected(lambda: _raise(exc), TypeError)
    assert (progress, current_step) == (0.0, None)


@settings(max_examples=40, deadline=None)
@given(
    updates=st.lists(
        st.tuples(VALID_PERCENTS, st.one_of(st.none(), st.text(max_size=20))),
        min_size=1,
        max_size=4,
    ),
    use_async=st.booleans(),
)
def test_set_progress_accepts_valid_values_inside_a_task(shared, updates, use_async):
    def body() -> list[tuple[float, str | None, float, str | None]]:
        handle = current_task()
        seen = []
        for percent, step in updates:
            handle.set_progress(percent, step)
            info = shared.get_task(handle.task_id)
            assert info is not None
            seen.append((handle.progress, handle.current_step, info.progress, info.current_step))
        return seen

    seen = in_task(shared, body, use_async)
    step = None
    for (percent, new_step), (progress, current, info_progress, info_step) in zip(
        updates, seen, strict=True
    ):
        step = new_step if new_step is not None else step
        assert progress == info_progress == float(percent)
        assert current == info_step == step


@settings(max_examples=20, deadline=None)
@given(
    bad=st.one_of(
        BAD_PERCENT_VALUES.map(lambda v: (v, ValueError)),
        BAD_PERCENT_TYPES.map(lambda v: (v, TypeError)),
    )
)
def test_set_progress_on_a_waiting_tasks_handle_rejects_bad_percents(waiting, bad):
    percent, errors = bad
    rejected(lambda: waiting.set_progress(percent), errors, "percent")
    assert waiting.progress == 0.0


# --- get_task, get_task_result, list_tasks ---------------------------------------------

TASK_ID_LIKE = st.one_of(
    st.text(max_size=30),
    st.from_regex(r"[0-9a-fA-F]{20}", fullmatch=True),
    st.from_regex(r"[0-9a-f]{8}0{11}[1-9]", fullmatch=True),
)


@settings(max_examples=40, deadline=None)
@given(task_id=st.one_of(NOT_STRS, st.none(), OBJECTS, ENUM_MEMBERS))
def test_lookups_reject_ids_that_are_not_str(shared, app, task_id):
    for lookup in (shared.get_task, shared.get_result, app.get_task, app.get_task_result):
        rejected(lambda f=lookup: f(task_id), TypeError, "task_id")


@settings(max_examples=60, deadline=None)
@given(task_id=TASK_ID_LIKE)
def test_lookups_of_unknown_ids_return_none(shared, app, task_id):
    for lookup in (shared.get_task, shared.get_result, app.get_task, app.get_task_result):
        found = lookup(task_id)
        # An id drawn at random names no task (unless it is, by chance, a real one).
        assert found is None or found.task_id == task_id.lower()


@settings(max_examples=20, deadline=None)
@given(options=VALID_OPTIONS.filter(lambda o: not o.get("delay_ms")))
def test_lookups_of_known_ids_find_the_task(shared, app, options):
    for engine in (shared, app.tasks):
        h = engine.add_task(echo, "found", **options)
        h.wait(DEADLINE)
        info = engine.get_task(h.task_id)
        assert isinstance(info, TaskInfo)
        assert (info.task_id, info.status, info.result) == (
            h.task_id,
            TaskStatus.COMPLETED,
            (("found",), {}),
        )
        again = engine.get_result(h.task_id)
        assert isinstance(again, TaskResult)
        assert again.task_id == h.task_id


LIST_BAD = st.one_of(
    named(
        "status",
        st.one_of(TEXTS, st.integers(), st.sampled_from([*TaskPriority, *FakePriority]), OBJECTS),
        TypeError,
    ),
    named(
        "limit",
        st.one_of(
            st.integers(max_value=-1),
            st.floats(allow_nan=True),
            TEXTS,
            st.booleans(),
            st.none(),
            CONTAINERS,
            OBJECTS,
        ),
        (TypeError, ValueError),
    ),
)


@settings(max_examples=60, deadline=None)
@given(bad=LIST_BAD)
def test_list_tasks_rejects_wrong_arguments(shared, app, bad):
    name, value, errors, names = bad
    for engine in (shared, app):
        rejected(lambda e=engine: e.list_tasks(**{name: value}), errors, *names)


@settings(max_examples=30, deadline=None)
@given(
    status=st.one_of(st.none(), st.sampled_from(TaskStatus)),
    limit=st.one_of(st.integers(0, 30), st.integers(0, 2**64 - 1)),
)
def test_list_tasks_accepts_valid_arguments(shared, app, status, limit):
    for engine in (shared, app):
        listed = engine.list_tasks(status=status, limit=limit)
        assert len(listed) <= limit
        assert all(isinstance(info, TaskInfo) for info in listed)
        if status is not None:
            assert all(info.status is status for info in listed)
        ids = [info.task_id for info in listed]
        assert ids == sorted(ids, reverse=True)  # newest first


# --- the @task decorator --------------------------------------------------------------

TASK_OPTIONS_BAD = st.one_of(
    named("priority", BAD_PRIORITIES, TypeError),
    named("max_retries", st.integers(max_value=-1), ValueError),
    named("max_retries", WRONG_INT_TYPES, TypeError),
    *(
        named(n, st.one_of(NEGATIVE_FLOATS, NEGATIVE_INTS), ValueError)
        for n in ("delay_ms", "timeout_ms")
    ),
    *(named(n, WRONG_NUMBER_TYPES, TypeError) for n in ("delay_ms", "timeout_ms")),
    named(
        "no_retry_for",
        st.one_of(
            st.sampled_from([[KeyError], KeyError, "KeyError", (int,), (KeyError, 1), (None,)]),
            NOT_STRS.filter(lambda v: v != ()),
            OBJECTS,
        ),
        TypeError,
    ),
)


@settings(max_examples=80, deadline=None)
@given(bad=TASK_OPTIONS_BAD)
def test_task_decorator_rejects_wrong_options(app, bad):
    name, value, errors, names = bad
    for decorator in (task, BackgroundTasks.task, app.task):
        rejected(lambda d=decorator: d(**{name: value}), errors, *names)


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(["delay_ms", "timeout_ms", "max_retries"]),
    data=st.data(),
)
def test_task_options_out_of_range_are_refused_by_the_decorator_or_add_task(shared, name, data):
    # @task refuses nan, inf and values too large, naming the option; were one
    # to get through, add_task must still refuse it.
    value = data.draw(
        st.one_of(NAN_INF, st.floats(min_value=TOO_MANY_MS, allow_infinity=False))
        if name != "max_retries"
        else st.integers(2**32, 2**63 - 1)
    )
    try:
        decorated = task(**{name: value})(echo)
    except ValueError as exc:
        assert name in str(exc)
        return
    assert isinstance(decorated, TaskFunction)
    before = submitted(shared)
    rejected(lambda: shared.add_task(decorated), ValueError, name)
    assert submitted(shared) == before


@settings(max_examples=25, deadline=None)
@given(options=VALID_OPTIONS, override=VALID_OPTIONS)
def test_task_decorator_accepts_valid_options_and_add_task_runs_it(shared, options, override):
    decorated = task(**options)(echo)
    assert decorated("direct") == (("direct",), {})
    h = shared.add_task(decorated, "bg", **override)
    priority = override.get("priority") or options.get("priority") or TaskPriority.NORMAL
    assert h.priority is priority
    assert h.wait(DEADLINE) == (("bg",), {})


# --- Catzilla ---------------------------------------------------------------------------

UNKNOWN_OPTION = st.from_regex(r"[a-z_][a-z0-9_]{0,15}", fullmatch=True).filter(
    lambda s: (
        s
        not in {*INT_PARAMS, *FLOAT_PARAMS, *BOOL_PARAMS, *DEFAULT_MS}
        | {"default_priority", "default_max_retries", "storage", "queues", "lease_timeout"}
    )
)


@settings(max_examples=80, deadline=None)
@given(
    bad=st.one_of(
        CTOR_WRONG_TYPES,
        CTOR_BAD_VALUES,
        UNKNOWN_OPTION.map(lambda n: (n, {n: 1}, TypeError, (n,))),
    )
)
def test_enable_background_tasks_rejects_wrong_options(bad):
    _, options, errors, names = bad
    application = Catzilla()
    rejected(
        lambda: application.enable_background_tasks(**{"workers": 1, **options}), errors, *names
    )
    assert application.tasks is None
    rejected(lambda: application.add_task(echo), RuntimeError, "enable_background_tasks")


@settings(max_examples=10, deadline=None)
@given(options=valid_engine_options(), again=valid_engine_options())
def test_enable_background_tasks_accepts_valid_options_once(options, again):
    application = Catzilla()
    engine = application.enable_background_tasks(**options)
    try:
        assert application.tasks is engine
        assert application.add_task(echo, "app").wait(DEADLINE) == (("app",), {})
        rejected(lambda: application.enable_background_tasks(**again), RuntimeError, "already")
        assert application.tasks is engine
    finally:
        engine.shutdown(wait_for_completion=False, timeout=1)
    rejected(lambda: application.add_task(echo), EngineShutdownError, "shut down")


@settings(max_examples=100, deadline=None)
@given(bad=BAD_ADD_TASK, options=VALID_OPTIONS)
def test_app_add_task_rejects_wrong_arguments(app, bad, options):
    name, value, errors, names = bad
    before = app.get_task_stats().total_tasks_submitted
    rejected(lambda: call_add_task(app.add_task, name, value, options), errors, *names)
    assert app.get_task_stats().total_tasks_submitted == before


@settings(max_examples=15, deadline=None)
@given(options=VALID_OPTIONS, args=st.lists(VALUES, max_size=2))
def test_app_add_task_accepts_valid_arguments(app, options, args):
    assert app.add_task(echo, *args, **options).wait(DEADLINE) == (tuple(args), {})


@settings(max_examples=20, deadline=None)
@given(
    call=st.sampled_from(
        [
            lambda a: a.add_task(echo),
            lambda a: a.get_task("x"),
            lambda a: a.get_task_result("x"),
            lambda a: a.list_tasks(),
            lambda a: a.get_task_stats(),
            lambda a: a.task(echo),
        ]
    )
)
def test_app_task_calls_before_enabling_are_runtime_errors(call):
    rejected(lambda: call(Catzilla()), RuntimeError, "enable_background_tasks")


# --- known bugs -------------------------------------------------------------------------

XFAIL_SETTINGS = settings(max_examples=5, deadline=None, report_multiple_bugs=False)


def shutdown_fresh(**kwargs: Any) -> Any:
    """``shutdown(**kwargs)`` of a new engine (which is shut down after, either way)."""
    with engine_with(workers=1) as e:
        return e.shutdown(**kwargs)


def construct(**options: Any) -> BackgroundTasks:
    return BackgroundTasks(**{"workers": 1, **options})


COUNT_BEYOND_64_BITS = st.one_of(st.integers(2**63, 2**80), st.integers(-(2**80), -(2**63) - 1))
SIZE_BEYOND_64_BITS = st.integers(2**64, 2**80)

# (call taking the value and a waiting task's handle, values, names the message may use)
OUT_OF_RANGE_INT_CASES = [
    pytest.param(
        lambda v, h: construct(workers=v), SIZE_BEYOND_64_BITS, ("workers",), id="workers"
    ),
    pytest.param(
        lambda v, h: construct(max_workers=v),
        SIZE_BEYOND_64_BITS,
        ("max_workers",),
        id="max_workers",
    ),
    pytest.param(
        lambda v, h: construct(queue_size=v), SIZE_BEYOND_64_BITS, ("queue_size",), id="queue_size"
    ),
    *(
        pytest.param(lambda v, h, n=n: construct(**{n: v}), HUGE_INTS, (n,), id=n)
        for n in FLOAT_PARAMS
    ),
    pytest.param(
        lambda v, h: construct(default_max_retries=v),
        COUNT_BEYOND_64_BITS,
        ("max_retries",),
        id="default_max_retries",
    ),
    *(
        pytest.param(lambda v, h, n=n: construct(**{n: v}), HUGE_SIGNED_INTS, (short(n),), id=n)
        for n in DEFAULT_MS
    ),
    pytest.param(
        lambda v, h: h.shared_engine.add_task(echo, max_retries=v),
        COUNT_BEYOND_64_BITS,
        ("max_retries",),
        id="add_task-max_retries",
    ),
    *(
        pytest.param(
            lambda v, h, n=n: h.shared_engine.add_task(echo, **{n: v}),
            HUGE_SIGNED_INTS,
            (n,),
            id=f"add_task-{n}",
        )
        for n in ("delay_ms", "timeout_ms")
    ),
    pytest.param(
        lambda v, h: h.shared_engine.list_tasks(limit=v),
        SIZE_BEYOND_64_BITS,
        ("limit",),
        id="list_tasks-limit",
    ),
    pytest.param(
        lambda v, h: h.handle.set_progress(v), HUGE_SIGNED_INTS, ("percent",), id="set_progress"
    ),
]


class Target:
    """What a known-bug case calls into: the shared engine and a waiting task of it."""

    def __init__(self, shared_engine: BackgroundTasks) -> None:
        self.shared_engine = shared_engine
        self.handle = shared_engine.add_task(echo, "target", delay_ms=600_000)

    def close(self) -> None:
        self.handle.cancel()


@contextmanager
def target(shared_engine: BackgroundTasks) -> Iterator[Target]:
    t = Target(shared_engine)
    try:
        yield t
    finally:
        t.close()


@pytest.mark.parametrize(("call", "values", "names"), OUT_OF_RANGE_INT_CASES)
@XFAIL_SETTINGS
@given(data=st.data())
def test_out_of_range_integers_are_value_errors_naming_the_argument(
    shared, call, values, names, data
):
    value = data.draw(values)
    with target(shared) as t:
        rejected(lambda: call(value, t), ValueError, *names)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda v, e, h: h.wait(timeout=v), id="wait"),
        pytest.param(lambda v, e, h: shutdown_fresh(timeout=v), id="shutdown"),
        pytest.param(lambda v, e, h: e.flush(timeout=v), id="flush"),
    ],
)
@XFAIL_SETTINGS
@given(value=HUGE_SIGNED_INTS)
def test_huge_integer_timeouts_are_accepted_or_value_errors(shared, finished, call, value):
    # Accepting one (as "no limit", like 1e300) is as good as a ValueError.
    returns_or_value_error(lambda: call(value, shared, finished), "timeout")


CONVERSION_CASES = [
    pytest.param(
        lambda v, t: t.handle.wait(timeout=v),
        WRONG_NUMBER_TYPES_NO_BOOL,
        "timeout",
        id="wait-timeout",
    ),
    pytest.param(
        lambda v, t: shutdown_fresh(timeout=v),
        WRONG_NUMBER_TYPES_NO_BOOL,
        "timeout",
        id="shutdown-timeout",
    ),
    pytest.param(
        lambda v, t: shutdown_fresh(wait_for_completion=v),
        NOT_BOOLS,
        "wait_for_completion",
        id="shutdown-wait_for_completion",
    ),
    pytest.param(
        lambda v, t: t.shared_engine.flush(timeout=v),
        WRONG_NUMBER_TYPES_NO_BOOL,
        "timeout",
        id="flush-timeout",
    ),
    pytest.param(lambda v, t: t.handle.set_progress(50, v), NOT_STRS, "step", id="step"),
    pytest.param(
        lambda v, t: t.handle.set_progress(50, v), SURROGATE_TEXTS, "step", id="step-surrogates"
    ),
]


@pytest.mark.parametrize(("call", "values", "name"), CONVERSION_CASES)
@XFAIL_SETTINGS
@given(data=st.data())
def test_native_conversion_errors_name_the_argument(shared, call, values, name, data):
    value = data.draw(values)
    with target(shared) as t:
        rejected(lambda: call(value, t), (TypeError, ValueError), name)


@XFAIL_SETTINGS
@given(name=SURROGATE_TEXTS)
def test_storage_paths_with_surrogates_are_storage_or_value_errors(store_dir, name):
    missing = store_dir / "missing"
    storage = f"sqlite:///{missing}/{name}.db"
    exc = rejected(lambda: construct(storage=storage), (StorageError, ValueError))
    assert "storage" in str(exc) or str(missing) in str(exc), exc


@XFAIL_SETTINGS
@given(task_id=SURROGATE_TEXTS)
def test_lookups_of_ids_with_surrogates_return_none(shared, task_id):
    assert returns_or_value_error(lambda: shared.get_task(task_id), "task_id") is None
    assert returns_or_value_error(lambda: shared.get_result(task_id), "task_id") is None


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda v, e, h: h.wait(timeout=v), id="wait"),
        pytest.param(lambda v, e, h: shutdown_fresh(timeout=v), id="shutdown"),
        pytest.param(lambda v, e, h: e.flush(timeout=v), id="flush"),
    ],
)
@XFAIL_SETTINGS
@given(value=st.booleans())
def test_bool_timeouts_are_type_errors(shared, finished, call, value):
    rejected(lambda: call(value, shared, finished), TypeError, "timeout")


@XFAIL_SETTINGS
@given(timeout=st.one_of(NEGATIVE_FLOATS, st.just(math.nan), NEGATIVE_INTS))
def test_flush_rejects_bad_timeouts(shared, timeout):
    rejected(lambda: shared.flush(timeout), ValueError, "timeout")


@XFAIL_SETTINGS
@given(percent=st.floats(0, 99), use_async=st.booleans())
def test_progress_of_a_completed_task_stays_100(shared, percent, use_async):
    # (In a list: a task that returns an awaitable, such as a handle, is awaiting it.)
    [handle] = in_task(shared, lambda: [current_task()], use_async)
    assert isinstance(handle, TaskResult)
    assert handle.status is TaskStatus.COMPLETED
    exc = caught(lambda: handle.set_progress(percent, "late"))
    assert exc is None or isinstance(exc, (ValueError, RuntimeError, CatzillaError)), exc
    info = shared.get_task(handle.task_id)
    assert info is not None
    assert (handle.progress, info.progress, info.status) == (100.0, 100.0, TaskStatus.COMPLETED)


def test_a_task_returning_its_own_handle_does_not_hang():
    # (A coroutine task may return its handle: its value is not awaited again.)
    with engine_with(workers=1) as e:
        h = e.add_task(current_task, max_retries=0)
        exc = caught(lambda: h.wait(timeout=0.5))
        assert h.is_ready(), f"still {h.status} after 0.5 s: the task awaits itself"
        assert exc is None or isinstance(exc, (RuntimeError, ValueError)), exc


@XFAIL_SETTINGS
@given(
    bad=st.one_of(
        named("delay_ms", st.one_of(NAN_INF, st.floats(min_value=TOO_MANY_MS)), ValueError),
        named("timeout_ms", st.one_of(NAN_INF, st.floats(min_value=TOO_MANY_MS)), ValueError),
        named("max_retries", st.integers(2**32, 2**63 - 1), ValueError),
    )
)
def test_task_decorator_rejects_non_finite_and_too_large_options(bad):
    name, value, errors, names = bad
    rejected(lambda: task(**{name: value}), errors, *names)


def test_app_add_task_before_enabling_is_an_engine_shutdown_error():
    rejected(lambda: Catzilla().add_task(echo), EngineShutdownError, "enable_background_tasks")


# Run in a subprocess whose address space is capped (before catzilla is imported),
# so that the hang ends as a quick abort.
HUGE_WORKERS_PROBE = textwrap.dedent(
    """
    import resource
    limit = 512 * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from catzilla.background_tasks import BackgroundTasks
    try:
        engine = BackgroundTasks(**{options!r})
    except ValueError as exc:
        print("ValueError:", exc)
    else:
        engine.add_task(int).wait(10)
        engine.shutdown(wait_for_completion=False, timeout=1)
        print("accepted")
    """
)


@pytest.mark.parametrize(
    ("options", "name"),
    [
        pytest.param({"workers": 2**62}, "workers", id="workers"),
        pytest.param({"workers": 1, "max_workers": 2**62}, "max_workers", id="max_workers"),
    ],
)
def test_huge_worker_counts_are_value_errors_not_a_hang(options, name):
    proc = run_python(
        HUGE_WORKERS_PROBE.format(options=options),
        timeout=20,
        what=f"BackgroundTasks(**{options})",
    )
    assert proc.returncode == 0, f"crashed ({proc.returncode}): {proc.stderr[-500:]}"
    out = proc.stdout.strip()
    assert out == "accepted" or (out.startswith("ValueError") and name in out), out
