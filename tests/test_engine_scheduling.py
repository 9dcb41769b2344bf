"""Scheduling: priorities, starvation guard, delays, retries, timeouts,
coroutines, cancellation and callbacks."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
from catzilla.background_tasks import (
    NonRetryableError,
    TaskCancelledError,
    TaskPriority,
    TaskResult,
    TaskStatus,
    TaskTimeoutError,
    task,
)
from helpers import DEADLINE, Recorder, wait_for_time, wait_until

P = TaskPriority


def sleepy_loop(seconds: float) -> str:
    """Sleeps in short slices, so a timeout interrupt lands between them."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.005)
    return "finished"


# --- priorities -------------------------------------------------------------


def test_priority_order_and_fifo_within_a_lane(single, blocker):
    order = Recorder()
    single.add_task(blocker)
    blocker.wait_started()
    handles = []
    for n in (1, 2, 3):
        for p in (P.LOW, P.NORMAL, P.HIGH, P.CRITICAL):
            handles.append(single.add_task(order.append, (p.name, n), priority=p))
    blocker.release()
    for h in handles:
        h.wait(DEADLINE)
    assert order.snapshot() == [
        (name, n) for name in ("CRITICAL", "HIGH", "NORMAL", "LOW") for n in (1, 2, 3)
    ]
    assert single.get_stats().starvation_promotions == 0


def test_starved_low_task_runs_before_newer_high_tasks(make_engine, blocker):
    e = make_engine(workers=1, max_workers=1, enable_auto_scaling=False, starvation_ms=50)
    order = Recorder()
    e.add_task(blocker)
    blocker.wait_started()
    low = e.add_task(order.append, "low", priority=P.LOW)
    wait_for_time(0.15)  # the LOW task ages past the 50 ms bound
    highs = [e.add_task(order.append, f"high{i}", priority=P.HIGH) for i in range(3)]
    blocker.release()
    for h in [low, *highs]:
        h.wait(DEADLINE)
    assert order.snapshot() == ["low", "high0", "high1", "high2"]
    assert e.get_stats().starvation_promotions > 0


def test_no_promotion_before_the_starvation_bound(make_engine, blocker):
    e = make_engine(workers=1, max_workers=1, enable_auto_scaling=False, starvation_ms=60_000)
    order = Recorder()
    e.add_task(blocker)
    blocker.wait_started()
    low = e.add_task(order.append, "low", priority=P.LOW)
    wait_for_time(0.1)
    high = e.add_task(order.append, "high", priority=P.HIGH)
    blocker.release()
    low.wait(DEADLINE)
    high.wait(DEADLINE)
    assert order.snapshot() == ["high", "low"]
    assert e.get_stats().starvation_promotions == 0


# --- delays ------------------------------------------------------------------


def test_delayed_task_starts_after_its_delay(engine):
    started = Recorder()
    t0 = time.monotonic()
    r = engine.add_task(lambda: started.append(time.monotonic()), delay_ms=150)
    assert r.status is TaskStatus.SCHEDULED
    assert engine.get_stats().scheduled_tasks == 1
    r.wait(DEADLINE)
    assert started.snapshot()[0] - t0 >= 0.150
    assert r.status is TaskStatus.COMPLETED
    assert engine.get_stats().scheduled_tasks == 0


def test_delayed_tasks_run_in_due_order(single):
    order = Recorder()
    handles = [
        single.add_task(order.append, "c", delay_ms=120),
        single.add_task(order.append, "a", delay_ms=40),
        single.add_task(order.append, "b", delay_ms=80),
    ]
    for h in handles:
        h.wait(DEADLINE)
    assert order.snapshot() == ["a", "b", "c"]


def test_fractional_delay_is_accepted(engine):
    assert engine.add_task(lambda: 1, delay_ms=0.5).wait(DEADLINE) == 1


# --- retries -----------------------------------------------------------------


def test_retries_until_success(engine):
    calls = Recorder()

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ValueError(f"attempt {len(calls)}")
        return "ok"

    r = engine.add_task(flaky, max_retries=3)
    assert r.wait(DEADLINE) == "ok"
    assert r.status is TaskStatus.COMPLETED
    assert r.attempts == 3
    assert len(calls) == 3
    assert [str(e) for e in r.errors] == ["attempt 1", "attempt 2"]
    assert all(isinstance(e, ValueError) for e in r.errors)
    stats = engine.get_stats()
    assert stats.retry_count == 2
    assert stats.failed_tasks == 0


def test_exhausted_retries_fail_with_the_last_exception(engine):
    calls = Recorder()

    def always():
        calls.append(1)
        raise ValueError(f"fail {len(calls)}")

    r = engine.add_task(always, max_retries=2)
    with pytest.raises(ValueError, match="fail 3") as info:
        r.wait(DEADLINE)
    assert info.value is r.errors[-1]
    assert r.exception() is r.errors[-1]
    assert r.status is TaskStatus.FAILED
    assert r.attempts == 3
    assert [str(e) for e in r.errors] == ["fail 1", "fail 2", "fail 3"]
    wait_until(lambda: engine.get_stats().failed_tasks == 1)
    assert engine.get_stats().retry_count == 2


def test_zero_retries_means_one_attempt(engine):
    calls = Recorder()

    def fail():
        calls.append(1)
        raise OSError("nope")

    r = engine.add_task(fail, max_retries=0)
    with pytest.raises(OSError):
        r.wait(DEADLINE)
    assert r.attempts == 1
    assert len(calls) == 1


def test_retry_waits_its_backoff_as_retrying(make_engine):
    # Full jitter over an enormous ceiling: the retry is due far in the future.
    e = make_engine(workers=1, retry_backoff_ms=1e9, retry_backoff_cap_ms=1e9)
    calls = Recorder()

    def fail():
        calls.append(1)
        raise ValueError("first attempt fails")

    r = e.add_task(fail, max_retries=1)
    wait_until(lambda: r.status is TaskStatus.RETRYING, what="RETRYING")
    stats = e.get_stats()
    assert stats.retry_count == 1
    assert stats.scheduled_tasks == 1
    assert r.attempts == 1
    assert len(r.errors) == 1
    assert not r.is_ready()
    assert r.cancel() is True
    assert r.status is TaskStatus.CANCELLED
    with pytest.raises(TaskCancelledError):
        r.wait(DEADLINE)
    assert len(calls) == 1


def test_backoff_cap_bounds_the_retry_delay(make_engine):
    e = make_engine(workers=1, retry_backoff_ms=1e9, retry_backoff_cap_ms=20)
    calls = Recorder()

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ValueError("again")
        return "done"

    assert e.add_task(flaky, max_retries=5).wait(DEADLINE) == "done"


def test_non_retryable_error_fails_at_once(engine):
    class Fatal(NonRetryableError):
        pass

    calls = Recorder()

    def fail():
        calls.append(1)
        raise Fatal("do not retry")

    r = engine.add_task(fail, max_retries=5)
    with pytest.raises(Fatal, match="do not retry"):
        r.wait(DEADLINE)
    assert r.attempts == 1
    assert len(calls) == 1
    assert r.status is TaskStatus.FAILED
    assert engine.get_stats().retry_count == 0


def test_no_retry_for_covers_subclasses(engine):
    calls = Recorder()

    def fail(exc_type):
        calls.append(exc_type)
        raise exc_type("x")

    picky = task(no_retry_for=(LookupError,), max_retries=4)(fail)
    r = engine.add_task(picky, KeyError)
    with pytest.raises(KeyError):
        r.wait(DEADLINE)
    assert r.attempts == 1
    r2 = engine.add_task(picky, ValueError)
    with pytest.raises(ValueError):
        r2.wait(DEADLINE)
    assert r2.attempts == 5


@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt])
def test_base_exceptions_fail_the_task_but_not_the_worker(single, exc_type):
    def stop():
        raise exc_type("stop")

    r = single.add_task(stop, max_retries=3)
    with pytest.raises(exc_type):
        r.wait(DEADLINE)
    assert r.status is TaskStatus.FAILED
    assert r.attempts == 1
    assert single.add_task(lambda: "still here").wait(DEADLINE) == "still here"
    assert single.get_stats().total_workers == 1


# --- timeouts ------------------------------------------------------------------


def test_sync_task_timeout(single):
    t0 = time.monotonic()
    r = single.add_task(sleepy_loop, 5.0, timeout_ms=200, max_retries=0)
    with pytest.raises(TaskTimeoutError, match="200 ms") as info:
        r.wait(DEADLINE)
    assert time.monotonic() - t0 >= 0.2
    assert isinstance(info.value, TimeoutError)
    assert r.status is TaskStatus.FAILED
    assert r.attempts == 1
    assert single.get_stats().timeout_count == 1
    # The worker survives, and no stray interrupt hits its next tasks.
    follow = [single.add_task(sleepy_loop, 0.01, timeout_ms=5000) for _ in range(5)]
    assert [f.wait(DEADLINE) for f in follow] == ["finished"] * 5
    assert single.get_stats().timeout_count == 1
    assert single.get_stats().total_workers == 1


def test_very_long_timeout_does_not_wrap_around(single):
    """Regression: the watchdog truncated deadlines to u64 nanoseconds, so a
    timeout of 2^64 ns + 50 ms fired after about 50 ms."""
    timeout_ms = 2**64 / 1e6 + 50  # 2^64 ns plus 50 ms
    r = single.add_task(sleepy_loop, 0.3, timeout_ms=timeout_ms, max_retries=0)
    assert r.wait(DEADLINE) == "finished"


def test_timeout_is_not_swallowed_by_except_exception(single):
    def stubborn():
        try:
            sleepy_loop(5.0)
        except Exception:
            return "swallowed"
        return "finished"

    r = single.add_task(stubborn, timeout_ms=100, max_retries=0)
    with pytest.raises(TaskTimeoutError):
        r.wait(DEADLINE)


def test_timed_out_attempts_are_retried(single):
    r = single.add_task(sleepy_loop, 5.0, timeout_ms=100, max_retries=1)
    with pytest.raises(TaskTimeoutError):
        r.wait(DEADLINE)
    assert r.attempts == 2
    assert [type(e) for e in r.errors] == [TaskTimeoutError, TaskTimeoutError]
    stats = single.get_stats()
    assert stats.timeout_count == 2
    assert stats.retry_count == 1


def test_zero_timeout_means_no_timeout(single):
    assert single.add_task(sleepy_loop, 0.3, timeout_ms=0).wait(DEADLINE) == "finished"
    assert single.get_stats().timeout_count == 0


def test_async_task_timeout(engine):
    async def sleeper():
        await asyncio.sleep(5)
        return "late"

    r = engine.add_task(sleeper, timeout_ms=200, max_retries=0)
    with pytest.raises(TaskTimeoutError):
        r.wait(DEADLINE)
    assert r.status is TaskStatus.FAILED
    assert engine.get_stats().timeout_count == 1


# --- coroutines ----------------------------------------------------------------


def test_coroutine_tasks_run_concurrently(make_engine):
    e = make_engine(workers=4)
    n = 100
    # Counted, not timed: each coroutine waits until all n have been in
    # flight at once. Run a few at a time (one per worker), they could never
    # all be; then the first to give up makes the others give up too.
    flight = {"in": 0, "peak": 0, "gave_up": False}
    lock = threading.Lock()

    async def gather(i):
        with lock:
            flight["in"] += 1
            flight["peak"] = max(flight["peak"], flight["in"])
        try:
            end = time.monotonic() + DEADLINE
            while flight["peak"] < n and not flight["gave_up"]:
                if time.monotonic() >= end:
                    flight["gave_up"] = True
                await asyncio.sleep(0.005)
        finally:
            with lock:
                flight["in"] -= 1
        return i

    handles = [e.add_task(gather, i) for i in range(n)]
    results = [h.wait(DEADLINE * 2) for h in handles]
    assert results == list(range(n))
    assert flight["peak"] == n and not flight["gave_up"], flight
    assert all(h.status is TaskStatus.COMPLETED for h in handles)


def test_coroutine_runs_on_the_engine_event_loop(engine):
    async def where():
        await asyncio.sleep(0)
        return threading.current_thread().name

    assert engine.add_task(where).wait(DEADLINE) == "catzilla-asyncio"


def test_sync_callable_returning_a_coroutine_is_awaited(engine):
    async def value(x):
        await asyncio.sleep(0.01)
        return x * 2

    def make(x):
        return value(x)

    assert engine.add_task(make, 21).wait(DEADLINE) == 42


def test_coroutine_failure_is_retried(engine):
    calls = Recorder()

    async def flaky():
        calls.append(1)
        await asyncio.sleep(0)
        if len(calls) < 2:
            raise ValueError("first")
        return "second"

    r = engine.add_task(flaky, max_retries=2)
    assert r.wait(DEADLINE) == "second"
    assert r.attempts == 2
    assert [str(e) for e in r.errors] == ["first"]


def test_coroutine_task_can_await_another_task(engine):
    async def outer():
        inner = engine.add_task(lambda: "inner value")
        return f"outer got {await inner}"

    assert engine.add_task(outer).wait(DEADLINE) == "outer got inner value"


def test_task_can_queue_more_tasks(engine):
    def parent():
        children = [engine.add_task(lambda i=i: i) for i in range(3)]
        return [c.wait(DEADLINE) for c in children]

    assert engine.add_task(parent).wait(DEADLINE) == [0, 1, 2]


def test_await_task_result(engine):
    async def main():
        ok = engine.add_task(lambda: 5)
        bad = engine.add_task(lambda: 1 / 0, max_retries=0)
        value = await ok
        with pytest.raises(ZeroDivisionError):
            await bad
        return value

    assert asyncio.run(main()) == 5


def test_await_does_not_block_the_awaiting_loop(engine, blocker):
    async def main():
        r = engine.add_task(blocker, "released")
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        t = asyncio.ensure_future(ticker())
        while ticks < 5:
            await asyncio.sleep(0.005)
        blocker.release()
        value = await r
        t.cancel()
        return value, ticks

    value, ticks = asyncio.run(main())
    assert value == "released"
    assert ticks >= 5


# --- cancellation ----------------------------------------------------------------


def test_cancel_delayed_task(single):
    ran = Recorder()
    r = single.add_task(ran.append, "cancelled one", delay_ms=100)
    assert r.cancel() is True
    assert r.status is TaskStatus.CANCELLED
    assert r.is_ready()
    with pytest.raises(TaskCancelledError):
        r.wait(DEADLINE)
    with pytest.raises(TaskCancelledError):
        r.result()
    assert isinstance(r.exception(), TaskCancelledError)
    assert r.cancel() is False
    # A later task, due after the cancelled one would have been, shows it never ran.
    single.add_task(ran.append, "control", delay_ms=200).wait(DEADLINE)
    assert ran.snapshot() == ["control"]
    assert r.attempts == 0
    stats = single.get_stats()
    assert stats.cancelled_tasks == 1
    assert stats.scheduled_tasks == 0


def test_cancel_queued_task(single, blocker):
    ran = Recorder()
    single.add_task(blocker)
    blocker.wait_started()
    r = single.add_task(ran.append, "never")
    other = single.add_task(ran.append, "other")
    assert r.cancel() is True
    assert single.get_stats().normal_queue_size == 1
    blocker.release()
    other.wait(DEADLINE)
    assert ran.snapshot() == ["other"]
    assert r.status is TaskStatus.CANCELLED


def test_cancel_running_or_finished_task_is_refused(engine, blocker):
    r = engine.add_task(blocker, "ran")
    blocker.wait_started()
    assert r.cancel() is False
    assert r.status is TaskStatus.RUNNING
    blocker.release()
    assert r.wait(DEADLINE) == "ran"
    assert r.cancel() is False
    assert r.status is TaskStatus.COMPLETED


# --- callbacks -------------------------------------------------------------------


def test_callback_called_once_with_the_handle(engine, blocker):
    calls = Recorder()
    r = engine.add_task(blocker, "value")
    r.add_done_callback(calls.append)
    blocker.wait_started()
    assert len(calls) == 0
    blocker.release()
    r.wait(DEADLINE)
    wait_until(lambda: len(calls) == 1, what="the callback")
    (handle,) = calls.snapshot()
    assert isinstance(handle, TaskResult)
    assert handle.task_id == r.task_id
    assert handle.status is TaskStatus.COMPLETED
    assert handle.result() == "value"
    # Later engine activity never calls it again.
    engine.add_task(int).wait(DEADLINE)
    assert len(calls) == 1


def test_callback_added_after_completion_runs_at_once(engine):
    r = engine.add_task(lambda: "done")
    r.wait(DEADLINE)
    calls = Recorder()
    r.add_done_callback(calls.append)
    assert calls.snapshot() == [r]


def test_callbacks_run_for_failed_and_cancelled_tasks(single, blocker):
    seen = Recorder()
    single.add_task(blocker)
    blocker.wait_started()
    failing = single.add_task(lambda: 1 / 0, max_retries=0)
    failing.add_done_callback(lambda h: seen.append(("failed", h.status)))
    cancelled = single.add_task(int)
    cancelled.add_done_callback(lambda h: seen.append(("cancelled", h.status)))
    assert cancelled.cancel() is True
    assert seen.snapshot() == [("cancelled", TaskStatus.CANCELLED)]
    blocker.release()
    wait_until(lambda: len(seen) == 2)
    assert seen.snapshot()[1] == ("failed", TaskStatus.FAILED)


def test_several_callbacks_run_in_order(engine, blocker):
    seen = Recorder()
    r = engine.add_task(blocker)
    for i in range(3):
        r.add_callback(lambda h, i=i: seen.append(i))
    blocker.release()
    wait_until(lambda: len(seen) == 3)
    assert seen.snapshot() == [0, 1, 2]


def test_raising_callback_is_logged_and_worker_survives(single, blocker, caplog):
    after = Recorder()

    def bad(handle):
        raise RuntimeError("callback exploded")

    with caplog.at_level(logging.ERROR, logger="catzilla.tasks"):
        r = single.add_task(blocker, "v")
        r.add_callback(bad)
        r.add_callback(after.append)
        blocker.release()
        assert r.wait(DEADLINE) == "v"
        wait_until(lambda: len(after) == 1, what="the callback after the raising one")
        records = [rec for rec in caplog.records if rec.name == "catzilla.tasks"]
        assert any(r.task_id in rec.getMessage() for rec in records)
        (record,) = [rec for rec in records if rec.exc_info]
        assert record.levelno == logging.ERROR
        assert isinstance(record.exc_info[1], RuntimeError)
        assert str(record.exc_info[1]) == "callback exploded"
        assert r.status is TaskStatus.COMPLETED
        assert single.add_task(lambda: "alive").wait(DEADLINE) == "alive"
        # Added after completion: still logged, not raised to the caller.
        r.add_callback(bad)
        assert len([rec for rec in caplog.records if rec.exc_info]) == 2


def test_coroutine_callbacks_run_on_the_event_loop_thread(engine):
    names = Recorder()

    async def co():
        await asyncio.sleep(0.05)
        return 3

    r = engine.add_task(co)
    r.add_callback(lambda h: names.append(threading.current_thread().name))
    assert r.wait(DEADLINE) == 3
    wait_until(lambda: len(names) == 1)
    assert names.snapshot() == ["catzilla-asyncio"]


def test_add_callback_needs_a_callable(engine):
    r = engine.add_task(int)
    with pytest.raises(TypeError, match="callback"):
        r.add_callback("not callable")
