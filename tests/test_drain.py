"""``BackgroundTasks.drain()`` (and ``run_until_idle``): waits until nothing
is queued, delayed, running (sync or async), awaiting a retry or running the
completion callbacks of a finished task, then hands back the tasks finished
since the previous drain, in the order they finished. With a store it also
waits for this process's tasks wherever they run."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from catzilla.background_tasks import BackgroundTasks, TaskResult, TaskStatus
from helpers import DEADLINE, Recorder, run_python

MakeEngine = Callable[..., BackgroundTasks]


def ids(handles: list[TaskResult]) -> list[str]:
    return [h.task_id for h in handles]


def timed_drain(
    engine: BackgroundTasks, timeout: float = DEADLINE
) -> tuple[list[TaskResult], float]:
    started = time.monotonic()
    done = engine.drain(timeout)
    return done, time.monotonic() - started


# What drain returns


def test_drain_returns_the_finished_tasks_with_their_results(single: BackgroundTasks):
    handles = [single.add_task(pow, n, 2) for n in range(6)]
    done = single.drain(timeout=DEADLINE)
    # one worker runs them in queue order, so they finish in it
    assert ids(done) == ids(handles)
    assert [h.result() for h in done] == [0, 1, 4, 9, 16, 25]
    assert all(h.status is TaskStatus.COMPLETED for h in done)
    finished = [h.finished_at for h in done]
    assert all(f is not None for f in finished) and finished == sorted(finished)  # type: ignore[type-var]


def test_drain_orders_by_finish_not_by_queueing(engine: BackgroundTasks):
    second_done = threading.Event()

    def first() -> str:
        assert second_done.wait(DEADLINE)
        return "first"

    a = engine.add_task(first)
    b = engine.add_task(lambda: "second")
    # A finishes only after B is final (its done callback has run).
    b.add_done_callback(lambda _: second_done.set())
    done = engine.drain(DEADLINE)
    assert ids(done) == [b.task_id, a.task_id]
    assert [h.result() for h in done] == ["second", "first"]


def test_drain_with_nothing_to_do_returns_at_once(make_engine: MakeEngine):
    engine = make_engine(workers=2)
    done, took = timed_drain(engine)
    assert done == [] and took < 1.0
    engine.add_task(int, "1")
    assert len(engine.drain(DEADLINE)) == 1
    done, took = timed_drain(engine)
    assert done == [] and took < 1.0
    assert engine.run_until_idle() == []


def test_a_second_drain_returns_only_newer_tasks(engine: BackgroundTasks):
    old = [engine.add_task(str, n) for n in range(3)]
    assert sorted(ids(engine.drain(DEADLINE))) == sorted(ids(old))
    new = [engine.add_task(str, n) for n in range(3, 5)]
    done = engine.run_until_idle(DEADLINE)
    assert sorted(ids(done)) == sorted(ids(new))
    assert sorted(h.result() for h in done) == ["3", "4"]
    assert engine.drain(DEADLINE) == []


def test_failed_and_cancelled_tasks_are_in_the_outcome(engine: BackgroundTasks):
    def refuse(why: str) -> None:
        raise ValueError(why)

    ok = engine.add_task(str, 1)
    bad = engine.add_task(refuse, "no thanks", max_retries=0)
    later = engine.add_task(str, 2, delay_ms=60_000)
    assert later.cancel()
    done = {h.task_id: h for h in engine.drain(DEADLINE)}
    assert set(done) == {ok.task_id, bad.task_id, later.task_id}
    assert done[ok.task_id].status is TaskStatus.COMPLETED
    failed = done[bad.task_id]
    assert failed.status is TaskStatus.FAILED
    assert isinstance(failed.exception(), ValueError)
    assert str(failed.exception()) == "no thanks"
    with pytest.raises(ValueError, match="no thanks"):
        failed.result()
    assert done[later.task_id].status is TaskStatus.CANCELLED


# What drain waits for


def test_drain_waits_for_delayed_tasks(engine: BackgroundTasks):
    before = time.time()
    handle = engine.add_task(str, "late", delay_ms=200)
    done, took = timed_drain(engine)
    after = time.time()
    assert ids(done) == [handle.task_id] and handle.result() == "late"
    assert took >= 0.2
    assert handle.started_at is not None and handle.finished_at is not None
    # (task times are wall-clock readings: a little leeway against time.time())
    assert handle.started_at >= before + 0.2 - 0.005
    assert handle.started_at >= handle.created_at + 0.2
    assert handle.finished_at <= after + 0.005  # drain returned after it finished


def test_created_at_is_right_for_the_first_task_of_a_process():
    out = run_python(
        """
        import time
        from catzilla.background_tasks import BackgroundTasks

        engine = BackgroundTasks(workers=1)
        before = time.time()
        handle = engine.add_task(str, "x", delay_ms=300)
        handle.wait(10)
        print(handle.created_at - before, handle.started_at - handle.created_at)
        engine.shutdown()
        """,
        what="the first task of a process",
    )
    assert out.returncode == 0, out.stderr
    created_late, waited = map(float, out.stdout.split())
    assert created_late < 0.1 and waited >= 0.3, out.stdout


def test_drain_waits_for_retries(make_engine: MakeEngine):
    engine = make_engine(workers=2, retry_backoff_ms=10, retry_backoff_cap_ms=50)
    attempts = Recorder()

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError(f"attempt {len(attempts)} failed")
        return "third time lucky"

    handle = engine.add_task(flaky, max_retries=3)
    done = engine.drain(DEADLINE)
    assert ids(done) == [handle.task_id]  # one task, however many attempts
    assert handle.status is TaskStatus.COMPLETED and handle.result() == "third time lucky"
    assert handle.attempts == 3 and len(attempts) == 3
    assert [str(e) for e in handle.errors] == ["attempt 1 failed", "attempt 2 failed"]


def test_drain_waits_for_async_tasks(engine: BackgroundTasks):
    async def fetch(n: int) -> int:
        for _ in range(3):
            await asyncio.sleep(0.02)
        return n * 10

    handles = [engine.add_task(fetch, n) for n in range(5)]
    done = engine.drain(DEADLINE)
    assert sorted(ids(done)) == sorted(ids(handles))
    assert sorted(h.result() for h in done) == [0, 10, 20, 30, 40]


def test_drain_includes_tasks_queued_by_a_done_callback(engine: BackgroundTasks):
    """The no-gap guarantee: a callback of a finished task that queues more
    work does so before drain can see the engine idle. Repeated, to catch a
    race between the callback and drain."""
    for round_ in range(200):
        first = engine.add_task(int, round_)
        queued: list[TaskResult] = []
        first.add_done_callback(lambda h, q=queued: q.append(engine.add_task(str, h.result())))
        done = engine.drain(DEADLINE)
        assert len(queued) == 1, f"round {round_}: the callback did not run before drain returned"
        assert ids(done) == [first.task_id, queued[0].task_id], f"round {round_}"
        assert done[1].result() == str(round_)


def test_drain_includes_tasks_queued_by_a_success_callback(engine: BackgroundTasks):
    for round_ in range(50):
        first = engine.add_task(int, round_)
        queued: list[TaskResult] = []
        first.add_callback(lambda value, q=queued: q.append(engine.add_task(str, value)))
        done = engine.drain(DEADLINE)
        assert ids(done) == [first.task_id, queued[0].task_id], f"round {round_}"


def test_callbacks_see_what_they_should(engine: BackgroundTasks):
    seen = Recorder()

    def refuse() -> None:
        raise KeyError("nope")

    ok = engine.add_task(int, "5")
    ok.add_callback(lambda value: seen.append(("value", value)))
    ok.add_done_callback(lambda h: seen.append(("done", h.task_id, h.status)))
    bad = engine.add_task(refuse, max_retries=0)
    bad.add_callback(lambda value: seen.append(("value of a failed task", value)))
    bad.add_done_callback(lambda h: seen.append(("done", h.task_id, h.status)))
    engine.drain(DEADLINE)
    assert sorted(seen.snapshot(), key=str) == sorted(
        [
            ("value", 5),
            ("done", ok.task_id, TaskStatus.COMPLETED),
            ("done", bad.task_id, TaskStatus.FAILED),
        ],
        key=str,
    )


def test_drain_waits_for_a_chain_of_callbacks(engine: BackgroundTasks):
    def step(n: int) -> int:
        return n

    def follow(h: TaskResult) -> None:
        if h.result() > 0:
            engine.add_task(step, h.result() - 1).add_done_callback(follow)

    engine.add_task(step, 10).add_done_callback(follow)
    done = engine.drain(DEADLINE)
    assert [h.result() for h in done] == list(range(10, -1, -1))


def test_drain_waits_for_tasks_that_queue_tasks(single: BackgroundTasks):
    def countdown(n: int) -> int:
        if n > 0:
            single.add_task(countdown, n - 1)
        return n

    single.add_task(countdown, 20)
    done = single.drain(DEADLINE)
    # one worker: each finishes before the one it queued starts
    assert [h.result() for h in done] == list(range(20, -1, -1))


def test_drain_waits_for_tasks_that_queue_delayed_tasks(engine: BackgroundTasks):
    def fan_out(width: int) -> int:
        for n in range(width):
            engine.add_task(str, n, delay_ms=50)
        return width

    engine.add_task(fan_out, 4)
    done = engine.drain(DEADLINE)
    assert done[0].result() == 4
    assert sorted(h.result() for h in done[1:]) == ["0", "1", "2", "3"]


def test_periodic_schedules_do_not_keep_drain_waiting(engine: BackgroundTasks):
    hourly = engine.add_periodic_task(str, "hourly", every=3600, name="hourly")
    done, took = timed_drain(engine)
    assert done == [] and took < 1.0
    frequent = engine.add_periodic_task(str, "often", every=0.05, name="often")
    one_off = engine.add_task(str, "once")
    done, _ = timed_drain(engine)
    assert one_off.task_id in ids(done)
    assert {h.result() for h in done} <= {"once", "often"}
    for schedule in (hourly, frequent):
        assert schedule.cancel()
    engine.drain(DEADLINE)
    assert engine.drain(DEADLINE) == []


# When drain gives up


def test_drain_raises_timeout_error_saying_what_is_busy(
    make_engine: MakeEngine,
):
    engine = make_engine(workers=1, max_workers=1, enable_auto_scaling=False)
    release = threading.Event()
    try:
        stuck = engine.add_task(release.wait, DEADLINE)
        waiting = engine.add_task(str, "after")
        delayed = engine.add_task(str, "later", delay_ms=60_000)
        started = time.monotonic()
        with pytest.raises(TimeoutError) as caught:
            engine.drain(timeout=0.2)
        assert 0.2 <= time.monotonic() - started < DEADLINE
        message = str(caught.value)
        assert "still busy after 0.2 s" in message
        assert "2 queued (1 scheduled or awaiting a retry)" in message
        assert "1 running" in message
        assert "store" not in message  # no store, no store counts
        assert delayed.cancel()
    finally:
        release.set()
    done = engine.drain(DEADLINE)
    assert {stuck.task_id, waiting.task_id, delayed.task_id} == set(ids(done))
    assert stuck.result() is True


def test_drain_timeout_names_callbacks_still_running(engine: BackgroundTasks):
    release = threading.Event()
    try:
        handle = engine.add_task(str, "x")
        handle.add_done_callback(lambda _: release.wait(DEADLINE))
        with pytest.raises(TimeoutError, match="callbacks of a finished task are still running"):
            engine.drain(timeout=0.2)
    finally:
        release.set()
    assert ids(engine.drain(DEADLINE)) == [handle.task_id]


def test_a_zero_timeout_checks_once(engine: BackgroundTasks):
    assert engine.drain(0) == []
    release = threading.Event()
    try:
        engine.add_task(release.wait, DEADLINE)
        with pytest.raises(TimeoutError):
            engine.drain(0)
    finally:
        release.set()
    assert len(engine.drain(DEADLINE)) == 1


@pytest.mark.parametrize(
    ("timeout", "error"),
    [
        (-1, ValueError),
        (-0.001, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        ("1", TypeError),
        (None, TypeError),
        (True, TypeError),
    ],
)
def test_a_bad_timeout_is_refused(engine: BackgroundTasks, timeout: Any, error: type):
    with pytest.raises(error, match="timeout"):
        engine.drain(timeout)
    with pytest.raises(error, match="timeout"):
        engine.run_until_idle(timeout)


# With a shared store


def double(n: int) -> int:
    """A task function importable by name (``test_drain.double``), as a shared
    store needs."""
    return n * 2


def refuse(why: str) -> None:
    raise ValueError(why)


def fail_once(marker: str) -> str:
    """Fails on its first attempt (creating ``marker``), succeeds on the next."""
    if not Path(marker).exists():
        Path(marker).touch()
        raise RuntimeError("first attempt")
    return "second attempt"


def hold(flag: str) -> str:
    """Runs until the file ``flag`` exists (for at most DEADLINE seconds)."""
    end = time.monotonic() + DEADLINE
    while not Path(flag).exists():
        if time.monotonic() > end:
            raise RuntimeError("never released")
        time.sleep(0.005)
    return "released"


def test_drain_with_a_store_waits_for_tasks_run_by_another_engine(
    make_engine: MakeEngine, tmp_path: Path
):
    store = f"sqlite:///{tmp_path}/t.db"
    producer = make_engine(workers=0, storage=store)
    handles = [producer.add_task(double, n) for n in range(10)]
    failing = producer.add_task(refuse, "bad input", max_retries=0)
    # Nobody serves the queue yet: drain says what it waits for.
    with pytest.raises(TimeoutError, match="11 waiting in the store") as caught:
        producer.drain(timeout=0.2)
    assert "11 of its tasks not final yet" in str(caught.value)

    worker = make_engine(workers=2, storage=store)
    done = producer.drain(DEADLINE)
    assert sorted(ids(done)) == sorted(ids([*handles, failing]))
    assert all(h.is_ready() for h in handles)
    assert sorted(h.result() for h in handles) == [n * 2 for n in range(10)]
    assert failing.status is TaskStatus.FAILED
    assert str(failing.exception()) == "bad input"
    assert producer._store_waiting() == 0
    # the worker engine has run them all too
    assert sorted(ids(worker.drain(DEADLINE))) == sorted(ids(done))
    assert producer.drain(DEADLINE) == []


def test_drain_with_a_store_waits_for_a_task_running_in_another_engine(
    make_engine: MakeEngine, tmp_path: Path
):
    store = f"sqlite:///{tmp_path}/t.db"
    flag = tmp_path / "release"
    producer = make_engine(workers=0, storage=store)
    worker = make_engine(workers=1, storage=store)
    try:
        handle = producer.add_task(hold, str(flag))
        with pytest.raises(TimeoutError, match="1 of its tasks not final yet"):
            producer.drain(timeout=0.3)
    finally:
        flag.touch()
    assert ids(producer.drain(DEADLINE)) == [handle.task_id]
    assert handle.result() == "released"
    assert ids(worker.drain(DEADLINE)) == [handle.task_id]


def test_drain_with_a_store_serving_its_own_queue(make_engine: MakeEngine, tmp_path: Path):
    engine = make_engine(workers=2, storage=f"sqlite:///{tmp_path}/t.db")
    handles = [engine.add_task(double, n, delay_ms=20 * (n % 3)) for n in range(12)]
    done = engine.drain(DEADLINE)
    assert sorted(ids(done)) == sorted(ids(handles))
    assert sorted(h.result() for h in done) == sorted(n * 2 for n in range(12))
    assert engine.drain(DEADLINE) == []


def test_drain_with_a_store_settles_again_after_the_store_is_empty(
    make_engine: MakeEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # A task claimed from the store between drain's settle and its look at
    # the store is in neither: drain must see it running here and wait.
    engine = make_engine(workers=1, storage=f"sqlite:///{tmp_path}/t.db")
    late: list[TaskResult] = []

    def store_waiting() -> int:
        if not late:
            late.append(engine.add_task(double, 21))
        return 0

    monkeypatch.setattr(engine, "_store_waiting", store_waiting)
    done = engine.drain(DEADLINE)
    assert ids(done) == ids(late)
    assert late[0].result() == 42


def test_a_worker_s_drain_waits_for_tasks_another_engine_queues(
    make_engine: MakeEngine, tmp_path: Path
):
    # A task the worker's claimer has taken from the store but not yet put in
    # its buffer is in neither place: drain must not return meanwhile. Looped,
    # since the window is a claim's length (a race the review found).
    store = f"sqlite:///{tmp_path}/t.db"
    producer = make_engine(workers=0, storage=store)
    worker = make_engine(workers=2, storage=store)
    for round_ in range(150):
        handle = producer.add_task(double, round_)
        assert producer.flush(DEADLINE)
        done = worker.drain(DEADLINE)
        assert ids(done) == [handle.task_id], f"round {round_}: drain returned early"


def test_a_producer_s_handle_shows_the_attempts_and_start_of_a_task_run_elsewhere(
    make_engine: MakeEngine, tmp_path: Path
):
    store = f"sqlite:///{tmp_path}/t.db"
    producer = make_engine(workers=0, storage=store)
    worker = make_engine(workers=1, storage=store, retry_backoff_ms=10)
    before = time.time()
    handle = producer.add_task(fail_once, str(tmp_path / "marker"), max_retries=2)
    [done] = producer.drain(DEADLINE)
    assert done.task_id == handle.task_id and handle.result() == "second attempt"
    assert handle.attempts == 2
    assert handle.started_at is not None and handle.finished_at is not None
    assert before - 1 <= handle.started_at <= handle.finished_at
    assert worker.drain(DEADLINE)[0].attempts == 2


def test_drain_waits_for_the_app_s_task_event_hooks():
    from catzilla import Catzilla

    app = Catzilla()
    seen: list[str] = []

    @app.on_task_event("succeeded")
    def record(event: Any) -> None:
        time.sleep(0.002)  # a hook slower than the tasks: its events queue up
        seen.append(event.task_id)

    tasks = app.enable_background_tasks(workers=2)
    try:
        for round_ in range(20):
            handles = [app.add_task(abs, -n) for n in range(5)]
            done = tasks.drain(DEADLINE)
            assert set(ids(done)) == set(ids(handles))
            assert set(ids(handles)) <= set(seen), f"round {round_}: a hook had not run yet"
    finally:
        tasks.shutdown(timeout=DEADLINE)
