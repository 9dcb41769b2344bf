"""Bad input and error conditions: every message names what was wrong."""

from __future__ import annotations

import pytest
from catzilla import errors
from catzilla.background_tasks import (
    BackgroundTasks,
    CatzillaError,
    EngineShutdownError,
    TaskNotReadyError,
    TaskPriority,
    TaskQueueFullError,
    TaskStatus,
    task,
)
from helpers import DEADLINE, Recorder, panic_probe

# --- add_task arguments ----------------------------------------------------------


@pytest.mark.parametrize("func", [42, "print", None, [print]])
def test_non_callable_func_is_a_type_error(engine, func):
    with pytest.raises(TypeError, match="func"):
        engine.add_task(func)
    assert engine.get_stats().total_tasks_submitted == 0


@pytest.mark.parametrize("priority", ["HIGH", 1, 0, None.__class__, TaskStatus.PENDING])
def test_bad_priority_is_a_type_error(engine, priority):
    with pytest.raises(TypeError, match="priority"):
        engine.add_task(int, priority=priority)
    assert engine.get_stats().total_tasks_submitted == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("delay_ms", -1),
        ("delay_ms", -0.5),
        ("delay_ms", float("nan")),
        ("delay_ms", float("inf")),
        ("max_retries", -1),
        ("max_retries", 2**40),
        ("timeout_ms", -5),
        ("timeout_ms", float("-inf")),
    ],
)
def test_bad_values_are_value_errors_naming_the_argument(engine, name, value):
    with pytest.raises(ValueError, match=name):
        engine.add_task(int, **{name: value})
    assert engine.get_stats().total_tasks_submitted == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("delay_ms", "x"),
        ("delay_ms", True),
        ("delay_ms", [1]),
        ("max_retries", "3"),
        ("max_retries", 1.5),
        ("max_retries", False),
        ("timeout_ms", "30s"),
        ("timeout_ms", None.__class__),
    ],
)
def test_wrong_types_are_type_errors_naming_the_argument(engine, name, value):
    with pytest.raises(TypeError, match=name):
        engine.add_task(int, **{name: value})
    assert engine.get_stats().total_tasks_submitted == 0


def test_a_rejected_call_does_not_disturb_the_engine(engine):
    with pytest.raises(ValueError):
        engine.add_task(int, delay_ms=-1)
    assert engine.add_task(lambda: "fine").wait(DEADLINE) == "fine"
    assert engine.get_stats().total_tasks_submitted == 1


# --- queue full ------------------------------------------------------------------


def test_queue_full_rejects_and_keeps_what_was_queued(make_engine, blocker):
    e = make_engine(workers=1, queue_size=5, enable_auto_scaling=False)
    ran = Recorder()
    running = e.add_task(blocker)
    blocker.wait_started()
    queued = [e.add_task(ran.append, i) for i in range(5)]
    with pytest.raises(TaskQueueFullError, match="queue_size=5"):
        e.add_task(ran.append, "overflow")
    with pytest.raises(TaskQueueFullError):
        e.add_task(ran.append, "late overflow", delay_ms=10)
    stats = e.get_stats()
    assert stats.rejected_tasks == 2
    assert stats.total_tasks_submitted == 6
    assert stats.total_queued == 5
    assert stats.queue_pressure == pytest.approx(100.0)
    blocker.release()
    running.wait(DEADLINE)
    assert [q.wait(DEADLINE) for q in queued] == [0, 1, 2, 3, 4]
    assert ran.snapshot() == [0, 1, 2, 3, 4]
    # Room again once the queue drained.
    assert e.add_task(ran.append, "after").wait(DEADLINE) == "after"


def test_retries_are_never_refused_for_capacity(make_engine, make_blocker):
    e = make_engine(workers=2, queue_size=1, enable_auto_scaling=False)
    hold, gate = make_blocker(), make_blocker()
    calls = Recorder()

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            gate()
            raise ValueError("first attempt")
        return "second attempt"

    e.add_task(hold)
    hold.wait_started()
    f = e.add_task(flaky, max_retries=1)
    gate.wait_started()
    g = e.add_task(lambda: "g")  # the queue is now full
    with pytest.raises(TaskQueueFullError):
        e.add_task(int)
    gate.release()  # flaky fails while the queue is full: its retry is still admitted
    assert f.wait(DEADLINE) == "second attempt"
    assert f.attempts == 2
    assert g.wait(DEADLINE) == "g"
    assert e.get_stats().rejected_tasks == 1


def test_delayed_tasks_count_against_the_queue(make_engine):
    e = make_engine(workers=1, queue_size=2, enable_auto_scaling=False)
    first = e.add_task(int, delay_ms=10_000)
    e.add_task(int, delay_ms=10_000)
    with pytest.raises(TaskQueueFullError):
        e.add_task(int)
    assert first.cancel() is True
    assert e.add_task(lambda: "room").wait(DEADLINE) == "room"


def test_queue_full_error_is_a_catzilla_error():
    assert issubclass(TaskQueueFullError, CatzillaError)


# --- numbers too large for the native core ----------------------------------------

HUGE = 1e30
# Regression: finite numbers too large for a Rust Duration used to make
# Duration::from_secs_f64 panic, surfacing as pyo3's PanicException (a BaseException).


def outcome(call):
    """'ok', or the exception's type and message, whatever it derives from."""
    try:
        call()
    except BaseException as exc:  # the point is to see PanicException too
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def accepted_or_value_error(result: str, name: str) -> bool:
    return result == "ok" or (result.startswith("ValueError") and name in result)


@pytest.mark.parametrize("name", ["delay_ms", "timeout_ms"])
def test_huge_add_task_values_are_accepted_or_rejected_cleanly(engine, name):
    handles = []
    result = outcome(lambda: handles.append(engine.add_task(int, **{name: HUGE})))
    for h in handles:
        h.cancel()
    assert accepted_or_value_error(result, name), result


@pytest.mark.parametrize("name", ["result_ttl", "idle_timeout", "retry_backoff_ms"])
def test_huge_constructor_values_are_accepted_or_rejected_cleanly(make_engine, name):
    result = outcome(lambda: make_engine(workers=1, **{name: HUGE}))
    assert accepted_or_value_error(result, name), result


def test_huge_wait_timeout_is_accepted_or_rejected_cleanly(engine):
    r = engine.add_task(lambda: "v")
    result = outcome(lambda: r.wait(timeout=1e20))
    assert accepted_or_value_error(result, "timeout"), result


def test_huge_shutdown_timeout_is_accepted_or_rejected_cleanly(make_engine):
    e = make_engine(workers=1)
    result = outcome(lambda: e.shutdown(timeout=1e20))
    assert accepted_or_value_error(result, "timeout"), result


# --- shut down --------------------------------------------------------------------


def test_add_task_after_shutdown_raises(make_engine):
    e = make_engine(workers=1)
    assert not e.is_shutdown
    e.shutdown()
    assert e.is_shutdown
    assert "shut down" in repr(e)
    with pytest.raises(RuntimeError, match="shut down") as info:
        e.add_task(int)
    assert isinstance(info.value, EngineShutdownError)
    assert issubclass(EngineShutdownError, RuntimeError)
    assert e.get_stats().total_tasks_submitted == 0


def test_shutdown_twice_returns_the_same_report(make_engine):
    e = make_engine(workers=1)
    first = e.shutdown()
    assert e.shutdown(wait_for_completion=False, timeout=0) == first


@pytest.mark.parametrize("timeout", [-1, float("nan"), float("inf")])
def test_shutdown_rejects_a_bad_timeout(make_engine, timeout):
    e = make_engine(workers=1)
    with pytest.raises(ValueError, match="timeout"):
        e.shutdown(timeout=timeout)
    assert not e.is_shutdown


# --- constructor ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"workers": 0}, "workers"),
        ({"workers": -2}, "workers"),
        ({"workers": 4, "max_workers": 2}, "max_workers"),
        ({"min_workers": 0}, "min_workers"),
        ({"queue_size": 0}, "queue_size"),
        ({"memory_pool_mb": -1}, "memory_pool_mb"),
        ({"memory_pool_mb": 0}, "memory_pool_mb"),
        ({"result_ttl": -1}, "result_ttl"),
        ({"retry_backoff_ms": float("nan")}, "retry_backoff_ms"),
        ({"starvation_ms": -1}, "starvation_ms"),
        ({"idle_timeout": float("inf")}, "idle_timeout"),
        ({"exit_timeout": -1}, "exit_timeout"),
        ({"default_delay_ms": -1}, "delay_ms"),
        ({"default_max_retries": -1}, "max_retries"),
        ({"default_timeout_ms": -1}, "timeout_ms"),
    ],
)
def test_constructor_rejects_bad_values(options, name):
    with pytest.raises(ValueError, match=name):
        BackgroundTasks(**options)


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"workers": "4"}, "workers"),
        ({"workers": 2.0}, "workers"),
        ({"workers": True}, "workers"),
        ({"queue_size": "10"}, "queue_size"),
        ({"max_workers": 3.5}, "max_workers"),
        ({"enable_auto_scaling": 1}, "enable_auto_scaling"),
        ({"enable_profiling": "yes"}, "enable_profiling"),
        ({"memory_pool_mb": "500"}, "memory_pool_mb"),
        ({"default_priority": "HIGH"}, "priority"),
        ({"default_delay_ms": "0"}, "delay_ms"),
    ],
)
def test_constructor_rejects_wrong_types(options, name):
    with pytest.raises(TypeError, match=name):
        BackgroundTasks(**options)


def test_constructor_accepts_its_defaults(make_engine):
    e = make_engine()
    assert e.config["workers"] >= 1
    assert e.config["max_workers"] >= e.config["workers"]
    assert e.config["queue_size"] == 10000
    assert e.add_task(lambda: "ok").wait(DEADLINE) == "ok"


# --- @task options ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "name"),
    [
        ({"priority": "HIGH"}, TypeError, "priority"),
        ({"max_retries": -1}, ValueError, "max_retries"),
        ({"max_retries": 1.5}, TypeError, "max_retries"),
        ({"timeout_ms": -1}, ValueError, "timeout_ms"),
        ({"delay_ms": "soon"}, TypeError, "delay_ms"),
        ({"no_retry_for": [KeyError]}, TypeError, "no_retry_for"),
        ({"no_retry_for": (int,)}, TypeError, "no_retry_for"),
    ],
)
def test_task_decorator_rejects_bad_options(options, error, name):
    with pytest.raises(error, match=name):
        task(**options)


def test_task_decorator_needs_a_callable():
    with pytest.raises(TypeError, match="callable"):
        task(max_retries=1)(42)


# --- waiting and results ------------------------------------------------------------


def test_wait_with_timeout_on_a_blocked_task(engine, blocker):
    r = engine.add_task(blocker, "late")
    blocker.wait_started()
    with pytest.raises(TimeoutError, match=r.task_id):
        r.wait(timeout=0.1)
    with pytest.raises(TimeoutError):
        r.wait(timeout=0)
    assert r.status is TaskStatus.RUNNING
    blocker.release()
    assert r.wait(DEADLINE) == "late"


@pytest.mark.parametrize("timeout", [-1, -0.001, float("nan"), float("inf")])
def test_wait_rejects_a_bad_timeout(engine, timeout):
    r = engine.add_task(int)
    with pytest.raises(ValueError, match="timeout"):
        r.wait(timeout=timeout)


def test_result_before_finish_is_not_ready(engine, blocker):
    r = engine.add_task(blocker, "v")
    blocker.wait_started()
    with pytest.raises(TaskNotReadyError, match=r.task_id):
        r.result()
    assert r.exception() is None
    assert not r.is_ready()
    blocker.release()
    assert r.wait(DEADLINE) == "v"
    assert r.result() == "v"


def test_result_of_a_pending_task_is_not_ready(single, blocker):
    single.add_task(blocker)
    blocker.wait_started()
    r = single.add_task(int)
    with pytest.raises(TaskNotReadyError):
        r.result()


def test_every_task_error_is_exported_from_errors_and_background_tasks():
    import catzilla
    import catzilla.background_tasks as bt

    web_errors = {"HTTPError", "BadRequestError"}
    for name in errors.__all__:
        if name in web_errors:
            assert getattr(catzilla, name) is getattr(errors, name)
        else:
            assert getattr(bt, name) is getattr(errors, name)
    assert issubclass(TaskNotReadyError, CatzillaError)
    assert issubclass(errors.TaskTimeoutError, TimeoutError)
    assert not issubclass(errors.TaskInterrupt, Exception)


def test_priority_members_are_accepted(engine):
    for p in TaskPriority:
        assert engine.add_task(lambda p=p: p, priority=p).wait(DEADLINE) is p


def test_rust_panic_in_a_task_fails_the_task_and_the_worker_survives(make_engine):
    _panic_probe = panic_probe()
    e = make_engine(workers=1, max_workers=1)
    r = e.add_task(_panic_probe, "boom", max_retries=3)
    # The panic unwinds back into the worker, which contains it: the task
    # fails at once (not retried) and the same single worker carries on.
    with pytest.raises(errors.TaskPanicError, match="panic probe: boom"):
        r.wait(DEADLINE)
    assert r.status is TaskStatus.FAILED
    assert r.attempts == 1
    assert e.get_stats().panics_contained == 1
    assert e.add_task(lambda: "alive").wait(DEADLINE) == "alive"
    assert e.get_stats().total_workers == 1
