"""Task event hooks: ``@app.on_task_event(...)``, called with a ``TaskEvent``
on the engine's events thread for each change in a task's life."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from catzilla import Catzilla
from catzilla.background_tasks import TaskPriority, TaskStatus
from catzilla.errors import TaskTimeoutError
from catzilla.events import EVENT_KINDS, TaskEvent
from helpers import DEADLINE, Recorder, wait_until

KINDS = ("submitted", "started", "retrying", "timed_out", "succeeded", "failed", "cancelled")


def nap(seconds: float = 0.05) -> str:
    time.sleep(seconds)
    return "rested"


def bad() -> None:
    raise ValueError("bad input 42")


def always_fails() -> None:
    raise ValueError("still broken")


def too_slow() -> None:
    for _ in range(1000):  # interruptible: the timeout lands between short sleeps
        time.sleep(0.01)


def never() -> None:
    raise AssertionError("a cancelled task ran")


def quick(n: int) -> int:
    return n


def fullname(func: Callable[..., Any]) -> str:
    return f"{func.__module__}.{func.__qualname__}"


ENGINE = {"workers": 4, "retry_backoff_ms": 1, "retry_backoff_cap_ms": 5}


@pytest.fixture
def make_app() -> Iterator[Callable[[], Catzilla]]:
    """Creates apps; their engines are shut down at teardown."""
    apps: list[Catzilla] = []

    def make() -> Catzilla:
        apps.append(Catzilla())
        return apps[-1]

    yield make
    for app in apps:
        if app.tasks is not None and not app.tasks.is_shutdown:
            app.tasks.shutdown(wait_for_completion=False, timeout=1)


def hooked(app: Catzilla) -> tuple[dict[str, Recorder], Recorder]:
    """One recording hook per kind, and one for all kinds."""
    by_kind = {kind: Recorder() for kind in KINDS}
    for kind, rec in by_kind.items():
        app.on_task_event(kind)(rec.append)
    every = Recorder()
    app.on_task_event(every.append)
    return by_kind, every


def test_each_kind_reaches_its_hooks_with_the_events_fields(make_app):
    app = make_app()
    by_kind, every = hooked(app)
    app.enable_background_tasks(**ENGINE)
    before = time.time()
    napping = app.add_task(nap)
    high = app.add_task(quick, 7, priority=TaskPriority.HIGH)
    failing = app.add_task(bad, max_retries=0)
    retried = app.add_task(always_fails, max_retries=2)
    slow = app.add_task(too_slow, timeout_ms=50, max_retries=0)
    cancelled = app.add_task(never, delay_ms=600_000)
    assert cancelled.cancel() is True
    assert napping.wait(DEADLINE) == "rested" and high.wait(DEADLINE) == 7
    for handle, error in ((failing, ValueError), (retried, ValueError), (slow, TaskTimeoutError)):
        with pytest.raises(error):
            handle.wait(DEADLINE)
    wanted = {"submitted": 6, "started": 7, "succeeded": 2, "failed": 3, "retrying": 2,
              "timed_out": 1, "cancelled": 1}  # fmt: skip
    wait_until(
        lambda: {k: len(r) for k, r in by_kind.items()} == wanted and len(every) == 22,
        what=f"the hooks to see {wanted}",
    )
    after = time.time()
    events = {kind: rec.snapshot() for kind, rec in by_kind.items()}
    assert sorted(events, key=KINDS.index) == list(EVENT_KINDS)
    for kind, seen in events.items():
        assert all(isinstance(e, TaskEvent) and e.kind == kind for e in seen), kind
        assert all(e.queue == "default" and before <= e.timestamp <= after for e in seen), kind
    # The all-kinds hook got the same events as the per-kind hooks together.
    assert sorted(every.snapshot(), key=repr) == sorted(sum(events.values(), []), key=repr)

    def one(kind: str, handle: Any) -> list[TaskEvent]:
        return [e for e in events[kind] if e.task_id == handle.task_id]

    (s,) = one("succeeded", napping)
    assert s.name == fullname(nap) and s.priority is TaskPriority.NORMAL
    assert (s.attempt, s.error) == (1, None)
    assert isinstance(s.duration, float) and 0.05 <= s.duration < DEADLINE
    (h,) = one("succeeded", high)
    assert h.priority is TaskPriority.HIGH and h.name == fullname(quick)
    for kind in ("submitted", "started"):
        for handle in (napping, high):
            (e,) = one(kind, handle)
            assert e.duration is None and e.error is None and isinstance(e.priority, TaskPriority)
    assert [e.attempt for e in one("submitted", napping) + one("started", napping)] == [0, 1]

    (f,) = one("failed", failing)
    assert f.name == fullname(bad) and f.attempt == 1 and isinstance(f.duration, float)
    assert isinstance(f.error, ValueError) and str(f.error) == "bad input 42"

    retrying = one("retrying", retried)
    assert [e.attempt for e in retrying] == [1, 2]
    assert [e.attempt for e in one("started", retried)] == [1, 2, 3]
    (last,) = one("failed", retried)
    assert last.attempt == 3
    for e in [*retrying, last]:
        assert isinstance(e.error, ValueError) and str(e.error) == "still broken"
        assert isinstance(e.duration, float) and e.duration >= 0

    (t,) = one("timed_out", slow)
    assert isinstance(t.error, TaskTimeoutError) and t.attempt == 1
    assert isinstance(t.duration, float) and 0.04 <= t.duration < DEADLINE
    (tf,) = one("failed", slow)
    assert isinstance(tf.error, TaskTimeoutError)

    (c,) = one("cancelled", cancelled)
    assert c.name == fullname(never) and c.duration is None and c.error is None
    assert c.attempt == 0 and not one("started", cancelled)


def test_all_kinds_hook_sees_each_tasks_events_in_order(make_app):
    app = make_app()
    every = Recorder()
    app.on_task_event(every.append)
    app.enable_background_tasks(**ENGINE)
    ok = [app.add_task(quick, i) for i in range(5)]
    retried = app.add_task(always_fails, max_retries=2)
    slow = app.add_task(too_slow, timeout_ms=50, max_retries=0)
    cancelled = app.add_task(never, delay_ms=600_000)
    cancelled.cancel()
    assert [h.wait(DEADLINE) for h in ok] == list(range(5))
    for handle in (retried, slow):
        with pytest.raises(Exception):  # noqa: B017 - the kinds are checked through the events
            handle.wait(DEADLINE)

    def kinds(handle: Any) -> list[str]:
        return [e.kind for e in every.snapshot() if e.task_id == handle.task_id]

    wait_until(lambda: len(every) == 5 * 3 + 7 + 4 + 2, what="every event")
    for h in ok:
        assert kinds(h) == ["submitted", "started", "succeeded"]
    assert kinds(retried) == ["submitted", *["started", "retrying"] * 2, "started", "failed"]
    assert kinds(slow) == ["submitted", "started", "timed_out", "failed"]
    assert kinds(cancelled) == ["submitted", "cancelled"]


def test_a_raising_hook_is_logged_and_harms_neither_the_task_nor_other_hooks(make_app, caplog):
    app = make_app()
    before, after = Recorder(), Recorder()
    app.on_task_event("succeeded")(before.append)

    @app.on_task_event("succeeded")
    def exploding_hook(event: TaskEvent) -> None:
        raise RuntimeError(f"hook exploded on {event.task_id}")

    app.on_task_event("succeeded")(after.append)
    app.enable_background_tasks(**ENGINE)
    with caplog.at_level(logging.ERROR, logger="catzilla.events"):
        handles = [app.add_task(quick, i) for i in range(3)]
        assert [h.wait(DEADLINE) for h in handles] == [0, 1, 2]
        wait_until(lambda: len(before) == 3 and len(after) == 3, what="the other hooks")

        def logged() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.name == "catzilla.events"]

        wait_until(lambda: len(logged()) == 3, what="three logged hook errors")
        records = logged()
    assert {e.task_id for e in after.snapshot()} == {h.task_id for h in handles}
    for record in records:
        assert record.levelno == logging.ERROR
        assert "exploding_hook" in record.getMessage() and "succeeded" in record.getMessage()
        assert isinstance(record.exc_info[1], RuntimeError)
        assert str(record.exc_info[1]) == f"hook exploded on {record.getMessage().split()[-1]}"
    assert {r.getMessage().split()[-1] for r in records} == {h.task_id for h in handles}
    assert all(h.status is TaskStatus.COMPLETED for h in handles)
    assert app.add_task(quick, 9).wait(DEADLINE) == 9  # the events thread carries on
    wait_until(lambda: len(after) == 4, what="a later event")


@pytest.mark.parametrize("hooks_first", [True, False], ids=["hook-then-engine", "engine-then-hook"])
def test_hooks_work_whether_registered_before_or_after_enabling_tasks(make_app, hooks_first):
    app = make_app()
    seen = Recorder()
    if hooks_first:
        app.on_task_event("succeeded")(seen.append)
        app.enable_background_tasks(**ENGINE)
    else:
        app.enable_background_tasks(**ENGINE)
        app.on_task_event("succeeded")(seen.append)
    handle = app.add_task(quick, 3)
    assert handle.wait(DEADLINE) == 3
    (event,) = wait_until(seen.snapshot, what="the succeeded event")
    assert event.task_id == handle.task_id and event.name == fullname(quick)
    # A second hook added later joins the first.
    more = Recorder()
    app.on_task_event(more.append)
    assert app.add_task(quick, 4).wait(DEADLINE) == 4
    wait_until(lambda: len(seen) == 2 and len(more) == 3, what="both hooks")


def test_bad_hook_registrations_are_refused(make_app):
    app = make_app()
    with pytest.raises(ValueError) as info:
        app.on_task_event("finished")
    assert "finished" in str(info.value)
    assert all(kind in str(info.value) for kind in EVENT_KINDS)
    with pytest.raises(ValueError):
        app.on_task_event("succeeded", "done")

    async def async_hook(event: TaskEvent) -> None:
        pass

    with pytest.raises(TypeError, match="async"):
        app.on_task_event(async_hook)
    with pytest.raises(TypeError, match="async"):
        app.on_task_event("failed")(async_hook)
    with pytest.raises(TypeError, match="callable"):
        app.on_task_event("failed")(42)
    with pytest.raises(TypeError, match="callable"):
        app.on_task_event(42)
    # Nothing was registered: the engine gets no event sink from the refusals.
    assert not app._event_hooks


def test_every_event_is_delivered_before_shutdown_returns(make_app):
    app = make_app()
    succeeded = Recorder()
    app.on_task_event("succeeded")(succeeded.append)
    tasks = app.enable_background_tasks(**ENGINE)
    handles = [app.add_task(quick, i) for i in range(200)]
    tasks.shutdown(wait_for_completion=True, timeout=DEADLINE)
    assert all(h.status is TaskStatus.COMPLETED for h in handles)
    seen = succeeded.snapshot()  # at once: no waiting after shutdown
    assert len(seen) == 200
    assert {e.task_id for e in seen} == {h.task_id for h in handles}
