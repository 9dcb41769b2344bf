"""Basic behaviour: values, arguments, statuses, ids, lookup, the app object and @task."""

from __future__ import annotations

import gc
import re
import threading
import weakref
from collections.abc import Iterator

import catzilla
import pytest
from catzilla import Catzilla
from catzilla import TaskPriority as AppTaskPriority
from catzilla.background_tasks import (
    BackgroundTasks,
    EngineStats,
    TaskFunction,
    TaskPriority,
    TaskResult,
    TaskStatus,
    registered_tasks,
    task,
)
from helpers import DEADLINE, Recorder, wait_until

# --- module-level task functions, so that their import names are stable ----


@task
def plain_add(a, b=0):
    return a + b


@task(priority=TaskPriority.HIGH, max_retries=1)
def flaky_high(calls):
    calls.append("call")
    raise ValueError(f"flaky_high failed on call {len(calls)}")


@task(delay_ms=5000)
def delayed_value(value):
    return value


@task(no_retry_for=(KeyError,), max_retries=3)
def picky(calls, exc_type):
    calls.append("call")
    raise exc_type("picky failed")


# --- values and arguments -----------------------------------------------------


def test_returns_the_value(engine):
    r = engine.add_task(lambda: {"answer": 42})
    assert isinstance(r, TaskResult)
    assert r.wait(DEADLINE) == {"answer": 42}
    assert r.result() == {"answer": 42}
    assert r.exception() is None
    assert r.is_ready()
    assert r.status is TaskStatus.COMPLETED
    assert r.attempts == 1
    assert r.errors == []


def test_positional_and_keyword_arguments_are_passed(engine):
    def collect(*args, **kwargs):
        return args, kwargs

    r = engine.add_task(collect, 1, "two", [3], flag=True, name="x")
    assert r.wait(DEADLINE) == ((1, "two", [3]), {"flag": True, "name": "x"})


def test_option_names_are_not_passed_to_the_function(engine):
    def collect(*args, **kwargs):
        return args, kwargs

    r = engine.add_task(collect, 7, priority=TaskPriority.LOW, max_retries=0, timeout_ms=0, k=1)
    assert r.wait(DEADLINE) == ((7,), {"k": 1})
    assert r.priority is TaskPriority.LOW


def test_the_same_objects_reach_the_function(engine):
    payload = {"list": [1, 2]}
    r = engine.add_task(lambda obj: obj, payload)
    assert r.wait(DEADLINE) is payload


def test_task_runs_on_a_worker_thread(engine):
    r = engine.add_task(threading.get_ident)
    assert r.wait(DEADLINE) != threading.get_ident()


def test_many_tasks_all_return_their_own_value(engine):
    handles = [engine.add_task(lambda i=i: i * i) for i in range(300)]
    assert [h.wait(DEADLINE) for h in handles] == [i * i for i in range(300)]


class Payload:
    pass


def payload_size(payload):
    return 1


def collected(ref):
    gc.collect()
    return ref() is None


def test_arguments_are_released_once_the_task_is_final(engine):
    payload = Payload()
    ref = weakref.ref(payload)
    r = engine.add_task(payload_size, payload)
    del payload
    assert r.wait(DEADLINE) == 1
    wait_until(lambda: collected(ref), what="the argument to be released")
    assert engine.get_result(r.task_id) is not None  # the record is still retained


def test_arguments_of_a_cancelled_task_are_released(engine):
    payload = Payload()
    ref = weakref.ref(payload)
    r = engine.add_task(payload_size, payload=payload, delay_ms=60_000)
    del payload
    assert r.cancel() is True
    wait_until(lambda: collected(ref), what="the argument to be released")


# --- statuses -----------------------------------------------------------------


def test_status_pending_then_running_then_completed(single, make_blocker):
    first, second = make_blocker(), make_blocker()
    r1 = single.add_task(first, "one")
    first.wait_started()
    assert r1.status is TaskStatus.RUNNING
    r2 = single.add_task(second, "two")
    assert r2.status is TaskStatus.PENDING
    assert not r2.is_ready()

    first.release()
    assert r1.wait(DEADLINE) == "one"
    assert r1.status is TaskStatus.COMPLETED
    second.wait_started()
    assert r2.status is TaskStatus.RUNNING
    second.release()
    assert r2.wait(DEADLINE) == "two"
    assert r2.status is TaskStatus.COMPLETED


def test_status_scheduled_then_running_then_completed(engine, blocker):
    r = engine.add_task(blocker, "later", delay_ms=100)
    assert r.status is TaskStatus.SCHEDULED
    blocker.wait_started()
    assert r.status is TaskStatus.RUNNING
    blocker.release()
    assert r.wait(DEADLINE) == "later"
    assert r.status is TaskStatus.COMPLETED


def test_failed_task_status(engine):
    def boom():
        raise ValueError("boom")

    r = engine.add_task(boom, max_retries=0)
    with pytest.raises(ValueError, match="boom"):
        r.wait(DEADLINE)
    assert r.status is TaskStatus.FAILED
    assert isinstance(r.exception(), ValueError)
    with pytest.raises(ValueError, match="boom"):
        r.result()


def test_due_delayed_task_waiting_for_a_worker_is_pending(single, blocker):
    """Once its delay has passed, a task waiting in a ready lane is "queued,
    ready to run": PENDING, no longer SCHEDULED ("waiting for its delay").
    Regression: it used to stay SCHEDULED until a worker took it."""
    single.add_task(blocker)
    blocker.wait_started()
    r = single.add_task(lambda: "done", delay_ms=30)
    assert r.status is TaskStatus.SCHEDULED
    wait_until(
        lambda: single.get_stats().scheduled_tasks == 0 and single.get_stats().normal_queue_size,
        what="the delayed task to move to its lane",
    )
    assert r.status is TaskStatus.PENDING
    blocker.release()
    assert r.wait(DEADLINE) == "done"


@pytest.mark.parametrize(
    "backoff_ms",
    [
        pytest.param(0, id="no-backoff"),
        pytest.param(1, id="backoff"),
    ],
)
def test_due_retry_waiting_for_a_worker_is_pending(make_engine, blocker, backoff_ms):
    """A retry whose backoff has passed waits in a ready lane: PENDING, no
    longer RETRYING ("the next one waits for its backoff delay")."""
    e = make_engine(
        workers=1,
        max_workers=1,
        enable_auto_scaling=False,
        retry_backoff_ms=backoff_ms,
        retry_backoff_cap_ms=backoff_ms,
    )
    calls = Recorder()

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("first attempt")
        return "second attempt"

    r = e.add_task(flaky, max_retries=1)
    e.add_task(blocker)  # runs after flaky's first attempt, holding the only worker
    blocker.wait_started()
    wait_until(
        lambda: e.get_stats().scheduled_tasks == 0 and e.get_stats().normal_queue_size == 1,
        what="the retry to wait in its lane",
    )
    assert r.attempts == 1
    assert r.status is TaskStatus.PENDING
    blocker.release()
    assert r.wait(DEADLINE) == "second attempt"


# --- ids and lookup -------------------------------------------------------------


def test_task_ids_are_unique_strings(engine):
    handles = [engine.add_task(int) for _ in range(500)]
    ids = [h.task_id for h in handles]
    assert len(set(ids)) == len(ids)
    assert all(isinstance(i, str) and re.fullmatch(r"[0-9a-f]{20}", i) for i in ids)
    for h in handles:
        h.wait(DEADLINE)


def test_task_ids_differ_between_engines(make_engine):
    a, b = make_engine(workers=1), make_engine(workers=1)
    ra, rb = a.add_task(int), b.add_task(int)
    assert ra.task_id != rb.task_id
    ra.wait(DEADLINE)
    rb.wait(DEADLINE)
    assert a.get_result(rb.task_id) is None
    assert b.get_result(ra.task_id) is None


def test_get_result_finds_a_task_by_id(engine, blocker):
    r = engine.add_task(blocker, "value")
    blocker.wait_started()
    running = engine.get_result(r.task_id)
    assert running is not None
    assert running.task_id == r.task_id
    assert running.status is TaskStatus.RUNNING
    blocker.release()
    r.wait(DEADLINE)
    found = engine.get_result(r.task_id)
    assert found is not None
    assert found.status is TaskStatus.COMPLETED
    assert found.result() == "value"


@pytest.mark.parametrize("unknown", ["nope", "", "0" * 20, "f" * 20, "x" * 20])
def test_get_result_of_an_unknown_id_is_none(engine, unknown):
    engine.add_task(int).wait(DEADLINE)
    assert engine.get_result(unknown) is None


def test_get_result_needs_a_string(engine):
    with pytest.raises(TypeError, match="task_id"):
        engine.get_result(1)


def test_repr_mentions_id(engine):
    r = engine.add_task(int)
    r.wait(DEADLINE)
    assert r.task_id in repr(r)
    assert "running" in repr(engine)


def test_engine_defaults_apply_to_add_task(make_engine):
    e = make_engine(workers=1, default_priority=TaskPriority.HIGH, default_max_retries=0)
    calls = Recorder()

    def fail():
        calls.append(1)
        raise ValueError("no")

    r = e.add_task(fail)
    assert r.priority is TaskPriority.HIGH
    with pytest.raises(ValueError):
        r.wait(DEADLINE)
    assert r.attempts == 1
    assert len(calls) == 1
    assert e.add_task(int).priority is TaskPriority.HIGH


def test_engine_default_delay_applies(make_engine):
    e = make_engine(workers=1, default_delay_ms=5000)
    r = e.add_task(int)
    assert r.status is TaskStatus.SCHEDULED
    assert e.add_task(int, delay_ms=0).wait(DEADLINE) == 0


# --- the app object ---------------------------------------------------------------


@pytest.fixture
def app() -> Iterator[Catzilla]:
    app = Catzilla()
    yield app
    if app.tasks is not None:
        app.tasks.shutdown(wait_for_completion=False, timeout=1)


def test_task_priority_is_importable_from_catzilla():
    assert AppTaskPriority is TaskPriority
    assert catzilla.BackgroundTasks is BackgroundTasks
    assert catzilla.TaskStatus is TaskStatus
    assert [p.name for p in TaskPriority] == ["CRITICAL", "HIGH", "NORMAL", "LOW"]


def test_app_methods_before_enabling_raise(app):
    assert app.tasks is None
    with pytest.raises(RuntimeError, match="enable_background_tasks"):
        app.add_task(print)
    with pytest.raises(RuntimeError, match="enable_background_tasks"):
        app.task(max_retries=1)
    with pytest.raises(RuntimeError, match="enable_background_tasks"):
        app.get_task_stats()
    with pytest.raises(RuntimeError, match="enable_background_tasks"):
        app.get_task_result("x")


def test_app_enable_runs_tasks(app):
    engine = app.enable_background_tasks(workers=2, queue_size=100, retry_backoff_ms=1)
    assert isinstance(engine, BackgroundTasks)
    assert app.tasks is engine
    assert engine.config["workers"] == 2
    assert engine.config["queue_size"] == 100
    r = app.add_task(plain_add, 2, b=3, priority=TaskPriority.CRITICAL)
    assert r.wait(DEADLINE) == 5
    assert r.priority is TaskPriority.CRITICAL
    stats = app.get_task_stats()
    assert isinstance(stats, EngineStats)
    assert stats.total_tasks_submitted == 1
    found = app.get_task_result(r.task_id)
    assert found is not None and found.result() == 5


def test_app_enable_twice_raises(app):
    first = app.enable_background_tasks(workers=1)
    with pytest.raises(RuntimeError, match="already enabled"):
        app.enable_background_tasks(workers=1)
    assert app.tasks is first
    assert not first.is_shutdown


def test_app_task_decorator_after_enabling(app):
    app.enable_background_tasks(workers=1)

    @app.task(priority=TaskPriority.LOW)
    def job(x):
        return x + 1

    assert isinstance(job, TaskFunction)
    assert job(1) == 2
    r = app.add_task(job, 10)
    assert r.priority is TaskPriority.LOW
    assert r.wait(DEADLINE) == 11


def test_app_enable_with_bad_options_leaves_tasks_unset(app):
    with pytest.raises(ValueError, match="workers"):
        app.enable_background_tasks(workers=0)
    assert app.tasks is None


# --- @task ----------------------------------------------------------------------


def test_task_function_runs_normally_when_called():
    assert plain_add(2, b=3) == 5
    assert isinstance(plain_add, TaskFunction)
    assert plain_add.__name__ == "plain_add"
    assert plain_add.__wrapped__(1, 1) == 2
    calls = Recorder()
    with pytest.raises(ValueError, match="call 1"):
        flaky_high(calls)
    assert delayed_value("now") == "now"


def test_task_functions_are_registered_by_import_name():
    assert registered_tasks[f"{__name__}.plain_add"] is plain_add
    assert registered_tasks[f"{__name__}.flaky_high"] is flaky_high
    assert registered_tasks[f"{__name__}.picky"] is picky
    assert plain_add.name == f"{__name__}.plain_add"
    assert plain_add.name in repr(plain_add)


def test_task_decorator_registers_nested_functions_by_qualname():
    @task(max_retries=2)
    def inner():
        return None

    name = f"{__name__}.test_task_decorator_registers_nested_functions_by_qualname.<locals>.inner"
    assert registered_tasks[name] is inner


def test_engine_exposes_the_decorator():
    assert BackgroundTasks.task is task


def test_bare_task_uses_engine_defaults(engine):
    r = engine.add_task(plain_add, 1, 2)
    assert r.priority is TaskPriority.NORMAL
    assert r.wait(DEADLINE) == 3


def test_task_options_are_add_task_defaults(engine):
    calls = Recorder()
    r = engine.add_task(flaky_high, calls)
    assert r.priority is TaskPriority.HIGH
    with pytest.raises(ValueError, match="call 2"):
        r.wait(DEADLINE)
    assert r.attempts == 2  # max_retries=1 from the decorator
    assert len(calls) == 2


def test_explicit_add_task_arguments_win(engine):
    calls = Recorder()
    r = engine.add_task(flaky_high, calls, priority=TaskPriority.LOW, max_retries=0)
    assert r.priority is TaskPriority.LOW
    with pytest.raises(ValueError, match="call 1"):
        r.wait(DEADLINE)
    assert r.attempts == 1
    assert len(calls) == 1


def test_task_delay_option_and_override(engine):
    r = engine.add_task(delayed_value, "slow")
    assert r.status is TaskStatus.SCHEDULED
    now = engine.add_task(delayed_value, "fast", delay_ms=0)
    assert now.wait(DEADLINE) == "fast"
    assert r.status is TaskStatus.SCHEDULED
    assert r.cancel() is True


def test_task_timeout_option(engine):
    import time

    @task(timeout_ms=100, max_retries=0)
    def slow():
        for _ in range(1000):
            time.sleep(0.01)

    r = engine.add_task(slow)
    with pytest.raises(TimeoutError):
        r.wait(DEADLINE)


def test_no_retry_for_fails_at_once(engine):
    calls = Recorder()
    r = engine.add_task(picky, calls, KeyError)
    with pytest.raises(KeyError):
        r.wait(DEADLINE)
    assert r.status is TaskStatus.FAILED
    assert r.attempts == 1
    assert len(calls) == 1


def test_no_retry_for_does_not_stop_other_retries(engine):
    calls = Recorder()
    r = engine.add_task(picky, calls, ValueError)
    with pytest.raises(ValueError):
        r.wait(DEADLINE)
    assert r.attempts == 4  # max_retries=3 from the decorator
    assert len(calls) == 4


def test_decorated_function_runs_on_a_worker(single):
    """A TaskFunction is unwrapped: the engine calls the original function."""
    seen = Recorder()

    @task
    def who():
        seen.append(threading.current_thread().name)
        return "ok"

    assert single.add_task(who).wait(DEADLINE) == "ok"
    assert seen.snapshot()[0] != threading.current_thread().name
