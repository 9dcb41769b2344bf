"""Task state and progress: get_task, list_tasks, current_task, TaskInfo."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from catzilla import Catzilla
from catzilla.background_tasks import (
    NonRetryableError,
    TaskInfo,
    TaskPriority,
    TaskStatus,
    current_task,
)
from helpers import DEADLINE, wait_until


def named_task(x: int) -> int:
    return x * 2


def test_get_task_follows_every_status(single, blocker):
    first = single.add_task(blocker)
    blocker.wait_started()
    assert single.get_task(first.task_id).status is TaskStatus.RUNNING
    pending = single.add_task(named_task, 21, priority=TaskPriority.HIGH)
    scheduled = single.add_task(named_task, 1, delay_ms=60_000)
    cancelled = single.add_task(named_task, 2)
    assert single.get_task(pending.task_id).status is TaskStatus.PENDING
    assert single.get_task(scheduled.task_id).status is TaskStatus.SCHEDULED
    assert cancelled.cancel()
    assert single.get_task(cancelled.task_id).status is TaskStatus.CANCELLED
    blocker.release()
    assert pending.wait(DEADLINE) == 42
    info = single.get_task(pending.task_id)
    assert isinstance(info, TaskInfo)
    assert info.status is TaskStatus.COMPLETED
    assert info.result == 42
    assert info.name == f"{__name__}.named_task"
    assert info.priority is TaskPriority.HIGH
    assert info.attempts == 1
    assert info.progress == 100.0
    assert info.error is None
    assert info.created_at <= info.started_at <= info.finished_at


def test_retrying_then_failed_with_error_details(make_engine):
    e = make_engine(workers=1, retry_backoff_ms=400, retry_backoff_cap_ms=400)
    calls = []

    def flaky() -> None:
        calls.append(1)
        raise ValueError(f"bad attempt {len(calls)}")

    # Each backoff is a random part of its 400 ms ceiling (full jitter), a
    # few ms at times: with four of them, RETRYING is in sight long enough in
    # at least one, whatever the luck of a single draw.
    r = e.add_task(flaky, max_retries=4)
    seen = wait_until(
        lambda: (
            (s := e.get_task(r.task_id).status) in (TaskStatus.RETRYING, TaskStatus.FAILED) and s
        ),
        what="retrying",
    )
    assert seen is TaskStatus.RETRYING, "failed without ever showing RETRYING"
    with pytest.raises(ValueError):
        r.wait(DEADLINE)
    info = e.get_task(r.task_id)
    assert info.status is TaskStatus.FAILED
    assert info.attempts == 5
    assert info.error["type"] == "ValueError"
    assert info.error["message"] == "bad attempt 5"
    assert "Traceback" in info.error["traceback"] and "flaky" in info.error["traceback"]
    assert info.finished_at is not None


def test_progress_from_a_sync_task(engine):
    reached = threading.Event()
    go_on = threading.Event()

    def work() -> str:
        current_task().set_progress(40, "parsing")
        reached.set()
        go_on.wait(DEADLINE)
        current_task().set_progress(90)
        return "done"

    r = engine.add_task(work)
    assert reached.wait(DEADLINE)
    info = engine.get_task(r.task_id)
    assert (info.progress, info.current_step) == (40.0, "parsing")
    go_on.set()
    assert r.wait(DEADLINE) == "done"
    info = engine.get_task(r.task_id)
    assert info.progress == 100.0
    assert info.current_step == "parsing"  # a step stays until a new one is given


def test_progress_from_an_async_task(engine):
    reached = threading.Event()

    async def work() -> str:
        current_task().set_progress(25.5, "fetching")
        reached.set()
        await asyncio.sleep(0.3)
        return current_task().task_id

    r = engine.add_task(work)
    assert reached.wait(DEADLINE)
    info = engine.get_task(r.task_id)
    assert (info.progress, info.current_step) == (25.5, "fetching")
    assert r.wait(DEADLINE) == r.task_id


def test_current_task_outside_a_task_raises():
    with pytest.raises(RuntimeError, match="outside a running background task"):
        current_task()


@pytest.mark.parametrize(
    ("percent", "error"),
    [
        (-1, ValueError),
        (100.5, ValueError),
        ("50", TypeError),
        (True, TypeError),
        (None, TypeError),
    ],
)
def test_set_progress_rejects_bad_values(engine, percent, error):
    def work() -> None:
        current_task().set_progress(percent)

    r = engine.add_task(work, max_retries=0)
    with pytest.raises(error, match="percent"):
        r.wait(DEADLINE)


def test_list_tasks_newest_first_with_filter_and_limit(single):
    ok = [single.add_task(named_task, i) for i in range(3)]
    bad = single.add_task(lambda: (_ for _ in ()).throw(NonRetryableError("no")))
    for r in ok:
        r.wait(DEADLINE)
    with pytest.raises(NonRetryableError):
        bad.wait(DEADLINE)
    every = single.list_tasks()
    assert [t.task_id for t in every] == [bad.task_id] + [r.task_id for r in reversed(ok)]
    failed = single.list_tasks(status=TaskStatus.FAILED)
    assert [t.task_id for t in failed] == [bad.task_id]
    assert [t.task_id for t in single.list_tasks(limit=2)] == [bad.task_id, ok[2].task_id]
    assert single.list_tasks(status=TaskStatus.RUNNING) == []
    with pytest.raises(ValueError, match="limit"):
        single.list_tasks(limit=-1)
    with pytest.raises(TypeError, match="status"):
        single.list_tasks(status="failed")


def test_finished_records_expire_with_result_ttl(make_engine):
    e = make_engine(workers=1, result_ttl=0)
    r = e.add_task(named_task, 1)
    assert r.wait(DEADLINE) == 2
    wait_until(lambda: e.get_task(r.task_id) is None, what="the record to expire")
    assert e.get_stats().evicted_results >= 1
    assert r.result() == 2  # the handle keeps its own result


def test_to_dict_is_json_ready(engine):
    r = engine.add_task(lambda: {"when": __import__("datetime").date(2024, 1, 2), "n": [1, 2]})
    r.wait(DEADLINE)
    data = engine.get_task(r.task_id).to_dict()
    text = json.dumps(data)
    assert json.loads(text)["result"] == {"when": "datetime.date(2024, 1, 2)", "n": [1, 2]}
    assert data["status"] == "completed"
    assert data["priority"] == "NORMAL"
    assert data["created_at"].endswith("+00:00")


def test_app_level_lookup():
    app = Catzilla()
    with pytest.raises(RuntimeError):
        app.get_task("x")
    app.enable_background_tasks(workers=1)
    try:
        r = app.add_task(named_task, 5)
        r.wait(DEADLINE)
        assert app.get_task(r.task_id).result == 10
        assert app.get_task("0" * 20) is None
        assert [t.task_id for t in app.list_tasks()] == [r.task_id]
    finally:
        assert app.tasks is not None
        app.tasks.shutdown(timeout=1)
