"""Catzilla 0.2 programs run here: its options that do nothing are accepted
with one DeprecationWarning each (a typo is a TypeError), and its names of
``catzilla.background_tasks`` keep their meaning (TaskConfig, TaskStats,
TaskFuture with then/catch run as tasks, in memory and on a shared store,
the global task system, value callbacks)."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import importlib
import sys
import textwrap
import threading
import typing
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from types import ModuleType

import pytest
from catzilla import App, Catzilla, compat
from catzilla.background_tasks import (
    BackgroundTasks,
    EngineShutdownError,
    EngineStats,
    TaskConfig,
    TaskFunction,
    TaskFuture,
    TaskPriority,
    TaskResult,
    TaskStats,
    TaskStatus,
    add_task,
    create_task_system,
    current_task,
    get_global_task_system,
    task,
)
from helpers import DEADLINE, Blocker, Recorder, run_python, wait_until

MakeEngine = Callable[..., BackgroundTasks]

# Task bodies (module level: a continuation is an ordinary task)


def double(x: int) -> int:
    return x * 2


def boom(x: object) -> None:
    raise ValueError(f"bad {x}")


def describe(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


def my_task_id(_: object) -> str:
    return current_task().task_id


def handler_fails(exc: BaseException) -> None:
    raise KeyError(f"handler saw {exc}")


def warned(record: pytest.WarningsRecorder) -> list[str]:
    """The messages of the DeprecationWarnings recorded, each checked to point
    at this file (the program's line, not catzilla's)."""
    found = [w for w in record if issubclass(w.category, DeprecationWarning)]
    for w in found:
        assert w.filename == __file__, f"the warning points at {w.filename}:{w.lineno}"
    return [str(w.message) for w in found]


# Options of 0.2 that do nothing here

APP_VALUES: dict[str, object] = {
    "production": True,
    "use_jemalloc": False,
    "memory_profiling": True,
    "auto_memory_tuning": False,
    "memory_stats_interval": 30,
    "auto_validation": True,
    "enable_di": True,
    "di_container": object(),
    "show_banner": False,
    "log_requests": False,
    "enable_colors": False,
    "show_request_details": False,
    "upload_config": {"max_file_size": "10MB"},
}


def test_every_0_2_app_option_is_listed_with_a_value_here() -> None:
    assert set(APP_VALUES) == set(compat.APP_OPTIONS)


@pytest.mark.parametrize("option", sorted(APP_VALUES))
def test_each_ignored_app_option_warns_once_naming_it(option: str) -> None:
    with pytest.warns(DeprecationWarning, match=rf"\({option}=\.\.\.\) has no effect here") as rec:
        app = Catzilla(**{option: APP_VALUES[option]})
    assert len(warned(rec)) == 1
    assert not hasattr(app, option)


def test_several_ignored_options_warn_once_each_and_again_on_each_call() -> None:
    for _ in range(2):
        with pytest.warns(DeprecationWarning) as rec:
            Catzilla(production=True, show_banner=False, log_requests=False, handler_threads=2)
        messages = warned(rec)
        assert len(messages) == 3
        for option in ("production", "show_banner", "log_requests"):
            assert sum(f"({option}=...)" in m for m in messages) == 1


def test_a_typo_is_a_type_error_naming_it_and_nothing_is_warned() -> None:
    with pytest.raises(TypeError, match=r"'max_body_sise'; did you mean 'max_body_size'"):
        Catzilla(max_body_sise=1024)
    # Checked before any warning: a typo among 0.2 options warns about none.
    with pytest.raises(TypeError, match="'shwo_banner'"):
        Catzilla(production=True, shwo_banner=False)
    # The suggestion is among 0.2's options too.
    with pytest.raises(TypeError, match=r"'prodction'; did you mean 'production'"):
        Catzilla(prodction=True)
    with pytest.raises(TypeError, match=r"'compile_to_cc'; did you mean 'compile_to_c'"):
        task(compile_to_cc=True)  # type: ignore[call-overload]


def test_title_description_and_version_are_kept_without_warning() -> None:
    app = Catzilla(title="Shop", description="Sells things", version="2.1.0")
    assert (app.title, app.description, app.version) == ("Shop", "Sells things", "2.1.0")
    assert Catzilla().title is None
    with pytest.raises(TypeError, match="version"):
        Catzilla(version=2)


def test_app_is_the_0_2_alias_of_catzilla() -> None:
    assert App is Catzilla


def test_enable_c_compilation_warns_once_and_the_engine_runs() -> None:
    app = Catzilla()
    with pytest.warns(
        DeprecationWarning, match=r"enable_c_compilation=\.\.\.\) has no effect"
    ) as r:
        tasks = app.enable_background_tasks(workers=2, enable_c_compilation=True)
    try:
        assert len(warned(r)) == 1
        assert app.add_task(double, 4).wait(DEADLINE) == 8
        # Not kept for the fresh engine a forked child starts.
        assert "enable_c_compilation" not in app._task_options
    finally:
        tasks.shutdown(timeout=DEADLINE)
    with pytest.warns(DeprecationWarning, match="enable_c_compilation") as r:
        BackgroundTasks(workers=1, enable_c_compilation=False).shutdown(timeout=DEADLINE)
    assert len(warned(r)) == 1


def test_the_0_2_engine_options_that_work_here_do_not_warn(make_engine: MakeEngine) -> None:
    # min_workers, enable_auto_scaling, memory_pool_mb and enable_profiling all
    # take effect (pytest turns any warning into an error).
    engine = make_engine(
        workers=2,
        min_workers=1,
        enable_auto_scaling=False,
        memory_pool_mb=64,
        enable_profiling=True,
    )
    assert engine.add_task(double, 1).wait(DEADLINE) == 2
    assert any(name.endswith("double") for name in engine.get_profile())
    assert engine.get_stats().total_workers == 2


def test_an_engine_typo_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="wrokers"):
        Catzilla().enable_background_tasks(wrokers=2)


def test_compile_to_c_on_add_task_warns_once_and_is_not_passed_to_the_task() -> None:
    app = Catzilla()
    tasks = app.enable_background_tasks(workers=1)
    try:
        with pytest.warns(DeprecationWarning, match=r"add_task\(compile_to_c=\.\.\.\)") as rec:
            handle = app.add_task(double, 5, compile_to_c=True, priority=TaskPriority.HIGH)
        assert len(warned(rec)) == 1
        assert handle.wait(DEADLINE) == 10
        assert handle.priority is TaskPriority.HIGH
    finally:
        tasks.shutdown(timeout=DEADLINE)
    # The engine's own add_task (native) takes it too.
    engine = BackgroundTasks(workers=1)
    try:
        with pytest.warns(DeprecationWarning, match=r"add_task\(compile_to_c=\.\.\.\)") as rec:
            handle = engine.add_task(double, 6, compile_to_c=False)
        assert len(warned(rec)) == 1
        assert rec[0].filename == __file__  # points at the caller's line
        assert handle.wait(DEADLINE) == 12
    finally:
        engine.shutdown(timeout=DEADLINE)


def test_the_engine_takes_0_2_s_positional_parameters_in_0_2_s_order() -> None:
    # workers, min_workers, max_workers, queue_size, enable_auto_scaling,
    # memory_pool_mb, enable_c_compilation, enable_profiling
    with pytest.warns(DeprecationWarning, match="enable_c_compilation") as rec:
        engine = BackgroundTasks(2, 1, 4, 100, False, 64, True, True)
    try:
        assert len(warned(rec)) == 1
        assert engine.config["queue_size"] == 100
        assert engine.config["enable_profiling"] is True
        assert engine.add_task(double, 2).wait(DEADLINE) == 4
    finally:
        engine.shutdown(timeout=DEADLINE)


def test_task_result_takes_a_type_argument_in_annotations() -> None:
    def annotated() -> TaskResult[int]:
        raise AssertionError

    hints = typing.get_type_hints(annotated)
    assert typing.get_origin(hints["return"]) is TaskResult
    assert typing.get_args(hints["return"]) == (int,)


TASK_VALUES: dict[str, object] = {
    "compile_to_c": False,
    "retry_backoff": "linear",
    "memory_limit_mb": 64,
    "enable_profiling": True,
}


def test_every_0_2_task_option_is_listed_with_a_value_here() -> None:
    assert set(TASK_VALUES) == set(compat.TASK_OPTIONS)


@pytest.mark.parametrize("option", sorted(TASK_VALUES))
def test_each_ignored_task_option_warns_once_and_is_kept_in_task_config(
    option: str, engine: BackgroundTasks
) -> None:
    with pytest.warns(DeprecationWarning, match=rf"task\({option}=\.\.\.\) has no effect") as rec:

        @task(max_retries=1, **{option: TASK_VALUES[option]})
        def job(x: int) -> int:
            return x + 1

    assert len(warned(rec)) == 1
    assert job._is_background_task is True
    assert getattr(job._task_config, option) == TASK_VALUES[option]
    assert job._task_config.max_retries == 1
    assert engine.add_task(job, 1).wait(DEADLINE) == 2


def test_app_task_with_0_2_options_warns_at_the_program_s_line() -> None:
    app = Catzilla()
    tasks = app.enable_background_tasks(workers=1)
    try:
        with pytest.warns(DeprecationWarning, match="compile_to_c") as rec:

            @app.task(priority=TaskPriority.HIGH, compile_to_c=True)
            def notify(user: str) -> str:
                return f"notified {user}"

        assert len(warned(rec)) == 1
        handle = app.add_task(notify, "ann")
        assert handle.wait(DEADLINE) == "notified ann"
        assert handle.priority is TaskPriority.HIGH
    finally:
        tasks.shutdown(timeout=DEADLINE)


def test_task_takes_the_priority_as_its_first_argument_as_0_2_did(
    engine: BackgroundTasks,
) -> None:
    @task(TaskPriority.CRITICAL, timeout_ms=5000)
    def urgent() -> str:
        return "done"

    assert isinstance(urgent, TaskFunction)
    assert urgent._task_config.priority is TaskPriority.CRITICAL
    assert urgent._task_config.timeout_ms == 5000
    handle = engine.add_task(urgent)
    assert handle.wait(DEADLINE) == "done" and handle.priority is TaskPriority.CRITICAL
    with pytest.raises(TypeError, match="priority"):
        task(TaskPriority.LOW, priority=TaskPriority.HIGH)


def test_app_task_takes_the_priority_as_its_first_argument_too() -> None:
    app = Catzilla()
    tasks = app.enable_background_tasks(workers=1)
    try:

        @app.task(TaskPriority.LOW)
        def tidy() -> str:
            return "tidied"

        handle = app.add_task(tidy)
        assert handle.wait(DEADLINE) == "tidied" and handle.priority is TaskPriority.LOW
    finally:
        tasks.shutdown(timeout=DEADLINE)


def test_a_task_option_typo_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match=r"'max_retry'; did you mean 'max_retries'"):
        task(max_retry=2)


# TaskConfig, TaskStats, EngineStats, TaskResult


def test_task_config_has_0_2_s_fields_and_defaults() -> None:
    assert [(f.name, f.default) for f in fields(TaskConfig)] == [
        ("priority", TaskPriority.NORMAL),
        ("delay_ms", 0),
        ("max_retries", 3),
        ("timeout_ms", 30000),
        ("retry_backoff", "exponential"),
        ("memory_limit_mb", 100),
        ("compile_to_c", True),
        ("enable_profiling", False),
    ]


def test_task_config_maps_onto_the_options_that_take_effect(engine: BackgroundTasks) -> None:
    config = TaskConfig(priority=TaskPriority.LOW, max_retries=0, timeout_ms=2000)
    assert config.task_options() == {
        "priority": TaskPriority.LOW,
        "delay_ms": 0,
        "max_retries": 0,
        "timeout_ms": 2000,
    }
    handle = engine.add_task(boom, 1, **config.task_options())
    with pytest.raises(ValueError, match="bad 1"):
        handle.wait(DEADLINE)
    assert handle.priority is TaskPriority.LOW and handle.attempts == 1
    plain = task(lambda: None)
    assert plain._task_config == TaskConfig()


def test_task_stats_of_a_task_that_needed_a_retry(engine: BackgroundTasks) -> None:
    # Needs the native TaskResult.get_stats.
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails")
        return "ok"

    handle = engine.add_task(flaky, max_retries=2)
    assert handle.wait(DEADLINE) == "ok"
    stats = handle.get_stats()
    assert isinstance(stats, TaskStats)
    assert [f.name for f in fields(TaskStats)] == [
        "task_id",
        "status",
        "created_at",
        "started_at",
        "completed_at",
        "execution_time_ms",
        "memory_usage_mb",
        "retries",
        "worker_id",
    ]
    assert stats.task_id == handle.task_id and stats.status is TaskStatus.COMPLETED
    assert stats.retries == 1
    assert stats.started_at is not None and stats.completed_at is not None
    assert stats.created_at <= stats.started_at <= stats.completed_at
    assert stats.execution_time_ms is not None and stats.execution_time_ms >= 0
    assert stats.memory_usage_mb is None and stats.worker_id is None


def test_task_stats_of_a_waiting_task(single: BackgroundTasks, blocker: Blocker) -> None:
    single.add_task(blocker)
    blocker.wait_started()
    waiting = single.add_task(double, 1)
    stats = waiting.get_stats()
    assert stats.status is TaskStatus.PENDING and stats.retries == 0
    assert stats.started_at is None and stats.completed_at is None
    assert stats.execution_time_ms is None


ENGINE_STATS_0_2 = """
    critical_queue_size high_queue_size normal_queue_size low_queue_size total_queued
    queue_pressure active_workers idle_workers total_workers avg_worker_utilization
    worker_cpu_usage worker_memory_usage tasks_per_second avg_execution_time_ms
    p95_execution_time_ms p99_execution_time_ms memory_usage_mb memory_efficiency
    failed_tasks retry_count timeout_count error_rate uptime_seconds
    total_tasks_processed engine_cpu_usage engine_memory_usage
""".split()


def test_engine_stats_with_no_arguments_is_all_zero_with_0_2_s_fields() -> None:
    # Needs the native EngineStats constructor.
    stats = EngineStats()
    for name in ENGINE_STATS_0_2:
        assert getattr(stats, name) == 0, name
    assert stats.storage_degraded is False and stats.storage_error is None


def test_task_result_by_id_and_engine(engine: BackgroundTasks) -> None:
    # Needs the native TaskResult constructor.
    handle = engine.add_task(double, 21)
    again = TaskResult(handle.task_id, engine)
    assert again.task_id == handle.task_id and again.wait(DEADLINE) == 42
    with pytest.raises(ValueError, match="0123456789abcdef0123"):
        TaskResult("0123456789abcdef0123", engine)


# Callbacks: add_callback gets the value (0.2), add_done_callback the handle


def test_add_callback_gets_the_value_of_a_task_that_succeeds(
    engine: BackgroundTasks, blocker: Blocker
) -> None:
    values = Recorder()
    handle = engine.add_task(blocker, {"sent": 3})
    handle.add_callback(values.append)
    blocker.wait_started()
    assert len(values) == 0
    blocker.release()
    wait_until(lambda: len(values) == 1, what="the value callback")
    assert values.snapshot() == [{"sent": 3}]
    handle.add_callback(values.append)  # added once finished: called at once
    assert values.snapshot() == [{"sent": 3}, {"sent": 3}]


def test_add_callback_is_not_called_for_a_failed_or_cancelled_task(
    single: BackgroundTasks, blocker: Blocker
) -> None:
    values, done = Recorder(), Recorder()
    single.add_task(blocker)
    blocker.wait_started()
    failing = single.add_task(boom, 1, max_retries=0)
    cancelled = single.add_task(double, 1)
    for handle in (failing, cancelled):
        handle.add_callback(values.append)
        handle.add_done_callback(lambda h: done.append((h.task_id, h.status)))
    assert cancelled.cancel() is True
    blocker.release()
    with pytest.raises(ValueError):
        failing.wait(DEADLINE)
    wait_until(lambda: len(done) == 2, what="the done callbacks")
    assert sorted(done.snapshot()) == sorted(
        [(failing.task_id, TaskStatus.FAILED), (cancelled.task_id, TaskStatus.CANCELLED)]
    )
    for handle in (failing, cancelled):
        handle.add_callback(values.append)  # already final: still never called
    assert values.snapshot() == []


# TaskFuture


def test_task_future_is_a_concurrent_future_of_the_task(engine: BackgroundTasks) -> None:
    future = TaskFuture(engine.add_task(double, 4).task_id, engine)
    assert isinstance(future, cf.Future)
    assert future.result(DEADLINE) == 8
    assert future.done() and not future.cancelled() and future.exception() is None
    failed = TaskFuture.from_result(engine.add_task(boom, 2, max_retries=0), engine)
    assert isinstance(failed.exception(DEADLINE), ValueError)
    with pytest.raises(ValueError, match="bad 2"):
        failed.result()
    done, _ = cf.wait([future, failed], timeout=DEADLINE)
    assert done == {future, failed}


def test_task_future_of_an_unknown_task_is_a_value_error(engine: BackgroundTasks) -> None:
    with pytest.raises(ValueError, match="fedcba9876543210fedc"):
        TaskFuture("fedcba9876543210fedc", engine)
    with pytest.raises(TypeError, match="TaskResult"):
        TaskFuture.from_result("not a handle", engine)


def test_task_future_is_awaitable(engine: BackgroundTasks) -> None:
    async def main() -> tuple[int, int]:
        first = TaskFuture.from_result(engine.add_task(double, 10), engine)
        return await first, await first.then(double)

    assert asyncio.run(main()) == (20, 40)


def test_then_runs_the_continuation_as_a_task_with_the_value(engine: BackgroundTasks) -> None:
    first = TaskFuture.from_result(engine.add_task(double, 3), engine)
    chain = first.then(double).then(double)
    assert chain.result(DEADLINE) == 24
    follow = first.then(my_task_id)
    ran_as = follow.result(DEADLINE)
    assert ran_as == follow.task_id != first.task_id
    info = engine.get_task(ran_as)
    assert info is not None and info.name.endswith("my_task_id")


def test_then_carries_a_failure_through_without_running_the_continuation(
    engine: BackgroundTasks,
) -> None:
    ran = Recorder()
    first = TaskFuture.from_result(engine.add_task(boom, 1, max_retries=0), engine)
    chained = first.then(ran.append)
    error = chained.exception(DEADLINE)
    assert isinstance(error, ValueError) and error is first.exception()
    assert chained.task_id == first.task_id
    assert ran.snapshot() == []


def test_catch_runs_the_handler_as_a_task_with_the_exception(engine: BackgroundTasks) -> None:
    first = TaskFuture.from_result(engine.add_task(boom, 7, max_retries=0), engine)
    rescued = first.then(double).catch(describe)
    assert rescued.result(DEADLINE) == ("ValueError", "bad 7")
    assert rescued.task_id not in (None, first.task_id)
    assert engine.get_task(rescued.task_id or "") is not None


def test_catch_passes_a_value_through_without_running_the_handler(
    engine: BackgroundTasks,
) -> None:
    ran = Recorder()
    first = TaskFuture.from_result(engine.add_task(double, 2), engine)
    passed = first.catch(ran.append)
    assert passed.result(DEADLINE) == 4
    assert passed.task_id == first.task_id
    assert ran.snapshot() == []


def test_a_handler_that_fails_fails_its_future(engine: BackgroundTasks) -> None:
    first = TaskFuture.from_result(engine.add_task(boom, 3, max_retries=0), engine)
    with pytest.raises(KeyError, match="handler saw bad 3"):
        first.catch(handler_fails).result(DEADLINE)


def test_continuations_take_their_options_from_task(engine: BackgroundTasks) -> None:
    @task(priority=TaskPriority.HIGH, max_retries=0)
    def labelled(x: int) -> int:
        return x + 1

    follow = TaskFuture.from_result(engine.add_task(double, 1), engine).then(labelled)
    assert follow.result(DEADLINE) == 3
    handle = engine.get_result(follow.task_id or "")
    assert handle is not None and handle.priority is TaskPriority.HIGH


def test_cancel_cancels_a_waiting_task_and_what_follows_it(
    single: BackgroundTasks, blocker: Blocker
) -> None:
    ran = Recorder()
    single.add_task(blocker)
    blocker.wait_started()
    waiting = TaskFuture.from_result(single.add_task(double, 1), single)
    following = waiting.then(ran.append)
    assert waiting.cancel() is True
    assert waiting.cancelled() and following.cancelled()
    assert single.get_result(waiting.task_id or "").status is TaskStatus.CANCELLED
    blocker.release()
    with pytest.raises(cf.CancelledError):
        following.result(DEADLINE)
    assert ran.snapshot() == []


def test_a_continuation_cancelled_before_it_is_queued_never_runs(
    single: BackgroundTasks, blocker: Blocker
) -> None:
    ran = Recorder()
    first = TaskFuture.from_result(single.add_task(blocker, 5), single)
    following = first.then(ran.append)
    assert following.cancel() is True and following.task_id is None
    settled = threading.Event()
    first.add_done_callback(lambda _: settled.set())  # runs after the chain's own
    blocker.release()
    assert first.result(DEADLINE) == 5
    assert settled.wait(DEADLINE)
    assert ran.snapshot() == [] and following.cancelled()
    assert single.get_stats().total_tasks_submitted == 1
    assert first.cancel() is False


def test_a_continuation_the_engine_refuses_fails_its_future(make_engine: MakeEngine) -> None:
    engine = make_engine(workers=1)
    first = TaskFuture.from_result(engine.add_task(double, 1), engine)
    assert first.result(DEADLINE) == 2
    engine.shutdown(timeout=DEADLINE)
    with pytest.raises(EngineShutdownError):
        first.then(double).result(DEADLINE)


def test_then_and_catch_need_a_callable(engine: BackgroundTasks) -> None:
    future = TaskFuture.from_result(engine.add_task(double, 1), engine)
    with pytest.raises(TypeError, match="then"):
        future.then(3)
    with pytest.raises(TypeError, match="catch"):
        future.catch(None)


# TaskFuture on a shared store: a producer (workers=0) and a worker engine

CHAIN_JOBS = textwrap.dedent(
    """
    def double(x):
        return x * 2

    async def add_one(x):
        return x + 1

    def boom(x):
        raise ValueError(f"bad {x}")

    def describe(exc):
        return [type(exc).__name__, str(exc)]
    """
)


@pytest.fixture
def chain_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """An importable module of task functions, as a real app would have."""
    (tmp_path / "chain_jobs.py").write_text(CHAIN_JOBS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("chain_jobs", None)
    yield importlib.import_module("chain_jobs")
    sys.modules.pop("chain_jobs", None)


@pytest.fixture
def store_pair(make_engine: MakeEngine, tmp_path: Path) -> tuple[BackgroundTasks, BackgroundTasks]:
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    producer = make_engine(workers=0, storage=url)
    worker = make_engine(workers=2, storage=url)
    return producer, worker


def test_then_on_a_shared_store(
    store_pair: tuple[BackgroundTasks, BackgroundTasks], chain_jobs: ModuleType
) -> None:
    producer, _ = store_pair
    first = TaskFuture.from_result(producer.add_task(chain_jobs.double, 3), producer)
    chain = first.then(chain_jobs.double).then(chain_jobs.add_one)
    assert chain.result(DEADLINE) == 13
    info = producer.get_task(chain.task_id or "")
    assert info is not None and info.name == "chain_jobs.add_one"
    assert info.status is TaskStatus.COMPLETED


def test_catch_on_a_shared_store_gets_the_exception_rebuilt(
    store_pair: tuple[BackgroundTasks, BackgroundTasks], chain_jobs: ModuleType
) -> None:
    producer, _ = store_pair
    first = TaskFuture.from_result(producer.add_task(chain_jobs.boom, 4, max_retries=0), producer)
    carried = first.then(chain_jobs.double)
    assert isinstance(carried.exception(DEADLINE), ValueError)
    rescued = carried.catch(chain_jobs.describe)
    assert rescued.result(DEADLINE) == ["ValueError", "bad 4"]
    assert rescued.task_id != first.task_id
    passed = TaskFuture.from_result(producer.add_task(chain_jobs.double, 5), producer)
    assert passed.catch(chain_jobs.describe).result(DEADLINE) == 10


def test_a_continuation_on_a_shared_store_must_be_importable(
    store_pair: tuple[BackgroundTasks, BackgroundTasks], chain_jobs: ModuleType
) -> None:
    producer, _ = store_pair
    first = TaskFuture.from_result(producer.add_task(chain_jobs.double, 1), producer)
    with pytest.raises(TypeError, match="importable"):
        first.then(lambda v: v)
    with pytest.raises(TypeError, match="importable"):
        first.catch(lambda e: e)
    assert first.result(DEADLINE) == 2


# The global task system


@pytest.fixture
def global_system() -> Iterator[None]:
    """Each test gets a fresh global engine, shut down afterwards."""
    yield
    system, compat._global_system = compat._global_system, None
    if system is not None:
        system.shutdown(wait_for_completion=False, timeout=1)


def test_the_global_system_is_one_engine_made_on_first_use(global_system: None) -> None:
    assert compat._global_system is None
    system = get_global_task_system()
    assert isinstance(system, BackgroundTasks) and get_global_task_system() is system
    handle = add_task(double, 6)
    assert handle.wait(DEADLINE) == 12
    assert system.get_result(handle.task_id) is not None
    with pytest.warns(DeprecationWarning, match=r"add_task\(compile_to_c=") as rec:
        again = add_task(double, 7, compile_to_c=True)
    assert len(warned(rec)) == 1
    assert again.wait(DEADLINE) == 14


def test_create_task_system_makes_a_new_engine_with_options() -> None:
    engine = create_task_system(workers=2, enable_auto_scaling=False, memory_pool_mb=32)
    try:
        assert engine.config["workers"] == 2 and engine.config["memory_pool_mb"] == 32
        assert engine.config["enable_auto_scaling"] is False
        assert engine.add_task(double, 2).wait(DEADLINE) == 4
    finally:
        engine.shutdown(timeout=DEADLINE)


def test_a_0_2_program_runs_and_its_global_tasks_drain_at_exit(tmp_path: Path) -> None:
    """A program written for Catzilla 0.2, run as a script with Python's
    default warning filters: it works, each ignored option is reported once
    at the program's own line, and tasks still queued at exit run."""
    program = tmp_path / "legacy_app.py"
    program.write_text(
        textwrap.dedent(
            """
            import threading, time
            from catzilla import Catzilla
            from catzilla.background_tasks import TaskFuture, TaskPriority, add_task, task

            app = Catzilla(production=True, show_banner=False, use_jemalloc=True)
            app.enable_background_tasks(workers=2, enable_c_compilation=True)

            @app.task(priority=TaskPriority.HIGH, compile_to_c=True)
            def send(to):
                return f"sent to {to}"

            def slow_note(path):
                time.sleep(0.2)
                with open(path, "w") as f:
                    f.write("ran")

            result = app.add_task(send, "ann", compile_to_c=False)
            called, seen = threading.Event(), []
            result.add_callback(lambda value: (seen.append(value), called.set()))
            print(result.wait(10), result.get_stats().status.name, flush=True)
            print("callback:", seen[0] if called.wait(10) else "never", flush=True)
            print(TaskFuture.from_result(result, app.tasks).then(len).result(10), flush=True)
            add_task(slow_note, __import__("sys").argv[1])  # left for the exit drain
            """
        )
    )
    note = tmp_path / "note.txt"
    done = run_python(program, str(note), timeout=60, what="the 0.2 program")
    assert done.returncode == 0, done.stderr
    assert "sent to ann COMPLETED" in done.stdout
    assert "callback: sent to ann" in done.stdout
    assert "11" in done.stdout.split()
    assert note.read_text() == "ran"
    for option in ("production", "show_banner", "use_jemalloc", "enable_c_compilation"):
        assert done.stderr.count(f"({option}=...) has no effect here") == 1, done.stderr
    assert done.stderr.count("(compile_to_c=...) has no effect here") == 2, done.stderr
    assert "legacy_app.py" in done.stderr and "Traceback" not in done.stderr


# Request models written for 0.2: its Field and marker option names


def test_field_takes_0_2_s_regex_min_items_and_max_items() -> None:
    from catzilla import BaseModel, Field
    from pydantic import ValidationError

    class Signup(BaseModel):
        code: str = Field(..., regex=r"^[A-Z]{3}$")
        tags: list[str] = Field(default_factory=list, min_items=1, max_items=2)

    assert Signup(code="ABC", tags=["a"]).tags == ["a"]
    for bad in (
        {"code": "abc", "tags": ["a"]},
        {"code": "ABC", "tags": []},
        {"code": "ABC", "tags": ["a", "b", "c"]},
    ):
        with pytest.raises(ValidationError):
            Signup(**bad)
    with pytest.raises(TypeError, match="both regex= and pattern="):
        Field(regex="a", pattern="b")


def test_markers_take_0_2_s_regex() -> None:
    from catzilla import Query
    from catzilla.testing import TestClient

    app = Catzilla()

    @app.get("/sort")
    def sort(order: str = Query("asc", regex="^(asc|desc)$")) -> dict[str, str]:
        return {"order": order}

    with TestClient(app) as client:
        assert client.get("/sort", params={"order": "desc"}).json() == {"order": "desc"}
        r = client.get("/sort", params={"order": "up"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "order"]
