"""Periodic tasks: intervals and cron, overlap, pause/resume/cancel, durable
schedules across restarts and processes, and bad input."""

from __future__ import annotations

import math
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from catzilla import Catzilla
from catzilla.background_tasks import (
    BackgroundTasks,
    EngineShutdownError,
    PeriodicTask,
    TaskPriority,
    TaskStatus,
)
from conftest import DEADLINE, Blocker, Recorder, wait_for_time, wait_until


def stamp(into: Recorder) -> Any:
    def run() -> float:
        return into.append(time.time())

    return run


# Intervals


def test_interval_runs_follow_the_schedule_not_the_previous_run(make_engine):
    engine = make_engine(workers=2)
    starts = Recorder()
    period = 0.1

    def slowish() -> None:
        starts.append(time.time())
        time.sleep(0.03)  # a run that takes time must not push the next one later

    p = engine.add_periodic_task(slowish, every=period)
    first_due = p.next_run_at
    assert first_due is not None
    assert first_due >= time.time() - 0.01  # the first run is one period from now
    wait_until(lambda: len(starts) >= 8, what="eight runs")
    runs = starts.snapshot()[:8]
    for k, started in enumerate(runs):
        due = first_due + k * period
        assert started >= due - 0.002, f"run {k} started {due - started:.3f} s early"
        # Generous: the point is that lateness does not add up run after run.
        assert started - due < 0.5, f"run {k} drifted {started - due:.3f} s"
    assert p.runs >= 8 and p.failures == 0 and p.skipped == 0
    assert p.name.endswith("slowish")
    assert p.schedule == "every 0.1 s"


def test_each_run_is_an_ordinary_task_with_retries_and_stats(make_engine):
    engine = make_engine(workers=2, retry_backoff_ms=1)
    attempts = Recorder()

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) % 2 == 1:
            raise RuntimeError("first attempt of each run fails")
        return "ok"

    p = engine.add_periodic_task(
        flaky, every=0.05, max_retries=1, priority=TaskPriority.HIGH, name="flaky"
    )
    wait_until(lambda: p.runs >= 3, what="three runs")
    p.cancel()
    last = engine.get_result(p.last_result_id)
    assert last is not None and last.wait(DEADLINE) == "ok"
    info = engine.get_task(p.last_result_id)
    assert info is not None and info.name.endswith("flaky") and info.priority is TaskPriority.HIGH
    assert info.status is TaskStatus.COMPLETED and info.result == "ok" and info.attempts == 2
    stats = engine.get_stats()
    assert stats.total_tasks_submitted >= 3 and stats.retry_count >= 3
    assert p.failures == 0


def test_failed_runs_are_counted(make_engine):
    engine = make_engine(workers=2)

    def broken() -> None:
        raise ValueError("always")

    p = engine.add_periodic_task(broken, every=0.05, max_retries=0)
    wait_until(lambda: p.failures >= 3, what="three failed runs")
    assert p.runs >= p.failures
    assert engine.get_task(p.last_result_id) is not None


def test_arguments_and_timedelta(make_engine):
    engine = make_engine(workers=2)
    seen = Recorder()
    p = engine.add_periodic_task(
        lambda a, b=0: seen.append((a, b)), 1, b=2, every=timedelta(milliseconds=50)
    )
    wait_until(lambda: len(seen) >= 2, what="two runs")
    assert seen.snapshot()[:2] == [(1, 2), (1, 2)]
    assert p.schedule == "every 0.05 s"


def test_start_at_sets_the_first_run(make_engine):
    engine = make_engine(workers=2)
    runs = Recorder()
    start = time.time() + 0.4
    p = engine.add_periodic_task(stamp(runs), every=10, start_at=start)
    assert p.next_run_at == pytest.approx(start)
    wait_until(lambda: runs, what="the first run")
    assert runs.snapshot()[0] >= start - 0.002
    when = datetime.now(UTC) + timedelta(seconds=5)
    q = engine.add_periodic_task(stamp(runs), every=60, start_at=when, name="later")
    assert q.next_run_at == pytest.approx(when.timestamp())


def test_jitter_moves_runs_later_only_and_within_bound(make_engine):
    engine = make_engine(workers=2)
    runs = Recorder()
    p = engine.add_periodic_task(stamp(runs), every=0.1, jitter_ms=50)
    first_due = p.next_run_at
    assert first_due is not None
    wait_until(lambda: len(runs) >= 4, what="four runs")
    # next_run_at includes the jitter; the schedule itself stays on the grid.
    for started in runs.snapshot()[:4]:
        k = round((started - first_due) / 0.1)
        offset = started - (first_due + k * 0.1)
        assert -0.06 <= offset < 0.5


# Cron


def test_cron_with_seconds_fires_on_the_named_seconds(make_engine):
    engine = make_engine(workers=2)
    runs = Recorder()
    p = engine.add_periodic_task(stamp(runs), cron="* * * * * *")  # every second
    due = p.next_run_at
    assert due is not None and due == math.floor(due) and due > time.time() - 1
    wait_until(lambda: len(runs) >= 2, timeout=DEADLINE, what="two runs a second apart")
    a, b = runs.snapshot()[:2]
    assert a >= due and b >= due + 1
    assert math.floor(b) - math.floor(a) >= 1
    assert p.schedule == 'cron "* * * * * *" (UTC)'


def test_cron_five_fields_and_time_zones(make_engine):
    engine = make_engine(workers=1)
    now = time.time()
    every_5 = engine.add_periodic_task(print, cron="*/5 * * * *", name="five")
    nxt = every_5.next_run_at
    assert nxt is not None and nxt % 300 == 0 and now < nxt <= now + 300
    tokyo = engine.add_periodic_task(print, cron="0 3 * * *", timezone="Asia/Tokyo", name="tk")
    at = datetime.fromtimestamp(tokyo.next_run_at or 0, UTC)
    assert (at.hour, at.minute) == (18, 0)  # 03:00 in Tokyo is 18:00 UTC
    assert "Asia/Tokyo" in tokyo.schedule
    assert [p.name for p in engine.list_periodic_tasks()] == ["five", "tk"]


# Overlap, pause, resume, cancel


def test_a_run_still_going_makes_the_next_one_skip(make_engine, make_blocker):
    engine = make_engine(workers=2)
    block: Blocker = make_blocker()
    p = engine.add_periodic_task(block, every=0.05)
    block.wait_started()
    wait_until(lambda: p.skipped >= 3, what="firings skipped while the run goes on")
    assert p.runs == 1 and block.calls == 1
    block.release()
    wait_until(lambda: p.runs >= 3, what="runs to resume after the long one ended")
    assert engine.get_stats().running_tasks <= 1


def test_overlap_true_lets_runs_overlap(make_engine, make_blocker):
    engine = make_engine(workers=4, max_workers=4)
    block: Blocker = make_blocker()
    p = engine.add_periodic_task(block, every=0.05, overlap=True)
    wait_until(lambda: block.calls >= 3, what="three runs at once")
    assert p.skipped == 0 and p.overlap is True
    block.release()


def test_pause_resume_and_cancel(make_engine):
    engine = make_engine(workers=2)
    runs = Recorder()
    p = engine.add_periodic_task(stamp(runs), every=0.05, name="beat")
    wait_until(lambda: len(runs) >= 2, what="two runs")
    p.pause()
    assert p.is_paused
    paused_at = len(runs)
    before = p.next_run_at or 0
    wait_until(lambda: (p.next_run_at or 0) >= before + 0.15, what="three paused firings")
    assert len(runs) <= paused_at + 1  # at most one run already on its way
    held = len(runs)
    wait_until(lambda: (p.next_run_at or 0) >= before + 0.3, what="more paused firings")
    assert len(runs) == held
    p.resume()
    wait_until(lambda: len(runs) >= held + 2, what="runs after resume")
    assert p.cancel() is True
    assert p.is_cancelled and p.next_run_at is None
    assert engine.list_periodic_tasks() == []
    stopped = len(runs)
    wait_for_time(0.2)
    assert len(runs) <= stopped + 1
    assert p.cancel() is False
    with pytest.raises(ValueError, match="cancelled"):
        p.pause()
    with pytest.raises(ValueError, match="cancelled"):
        p.resume()
    # The name is free again.
    again = engine.add_periodic_task(stamp(runs), every=1, name="beat")
    assert again.name == "beat" and not again.is_cancelled


def test_shutdown_stops_the_schedules(make_engine):
    engine = make_engine(workers=2)
    runs = Recorder()
    engine.add_periodic_task(stamp(runs), every=0.05)
    wait_until(lambda: len(runs) >= 1, what="a run")
    engine.shutdown(timeout=DEADLINE)
    after = len(runs)
    wait_for_time(0.2)
    assert len(runs) == after
    with pytest.raises(EngineShutdownError):
        engine.add_periodic_task(print, every=1)


# The app API


def test_app_decorator_and_listing():
    app = Catzilla()
    app.enable_background_tasks(workers=2)
    try:
        seen = Recorder()

        @app.periodic(every=0.05, name="pulse")
        def pulse() -> None:
            seen.append(1)

        assert pulse() is None and seen.snapshot() == [1]  # the function is unchanged
        (p,) = app.list_periodic_tasks()
        assert isinstance(p, PeriodicTask) and p.name == "pulse"
        wait_until(lambda: len(seen) >= 3, what="runs of the decorated function")
        q = app.add_periodic_task(seen.append, "x", cron="0 3 * * *")
        assert q.name.endswith("append")
        assert app.get_task(p.last_result_id) is not None
    finally:
        app.tasks.shutdown(timeout=DEADLINE)


# Bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every": 0}, ValueError, "every must be a positive"),
        ({"every": -5}, ValueError, "every must be a positive"),
        ({"every": float("nan")}, ValueError, "every must be a positive"),
        ({"every": timedelta(0)}, ValueError, "every must be a positive"),
        ({"every": "5"}, TypeError, "every must be a number"),
        ({"every": True}, TypeError, "every must be a number"),
        ({}, ValueError, "needs every= .* or cron="),
        ({"every": 1, "cron": "* * * * *"}, ValueError, "not both"),
        ({"cron": "not a cron"}, ValueError, "cron .* fields"),
        ({"cron": "61 * * * *"}, ValueError, "cron .*not a valid cron"),
        ({"cron": "0 0 30 2 *"}, ValueError, "never matches"),
        ({"cron": 5}, TypeError, "cron must be a str"),
        ({"cron": "* * * * *", "timezone": "Mars/Base"}, ValueError, "unknown time zone"),
        ({"every": 1, "timezone": "Europe/Paris"}, ValueError, "timezone only applies"),
        ({"cron": "* * * * *", "start_at": 5.0}, ValueError, "start_at only applies"),
        ({"every": 1, "start_at": "soon"}, TypeError, "start_at must be"),
        ({"every": 1, "jitter_ms": -1}, ValueError, "jitter_ms must be"),
        ({"every": 1, "overlap": "no"}, TypeError, "overlap must be a bool"),
        ({"every": 1, "missed": "later"}, ValueError, "missed must be one of"),
        ({"every": 1, "name": ""}, ValueError, "name must not be empty"),
        ({"every": 1, "name": 7}, TypeError, "name must be a str"),
        ({"every": 1, "priority": "high"}, (TypeError, ValueError), "priority"),
        ({"every": 1, "max_retries": -1}, ValueError, "max_retries"),
        ({"every": 1, "timeout_ms": -1}, ValueError, "timeout_ms"),
    ],
)
def test_bad_schedules_get_a_clear_error(engine, kwargs, error, match):
    with pytest.raises(error, match=match):
        engine.add_periodic_task(print, **kwargs)
    assert engine.list_periodic_tasks() == []


def test_non_callables_and_duplicate_names_are_refused(engine):
    with pytest.raises(TypeError, match="func must be callable"):
        engine.add_periodic_task("print", every=1)
    engine.add_periodic_task(print, every=60, name="once")
    with pytest.raises(ValueError, match="already the name"):
        engine.add_periodic_task(print, every=60, name="once")


# Durable schedules


def storage(db: Path) -> str:
    return f"sqlite:///{db}"


def test_schedules_and_last_run_survive_a_restart(tmp_path: Path):
    db = tmp_path / "tasks.db"
    first = BackgroundTasks(workers=2, storage=storage(db))
    try:
        p = first.add_periodic_task(print, "beat", every=0.2, name="beat")
        wait_until(lambda: p.runs >= 2, what="two runs")
        ran, last_run, last_id = p.runs, p.last_run_at, p.last_result_id
    finally:
        first.shutdown(timeout=DEADLINE)
    second = BackgroundTasks(workers=2, storage=storage(db))
    try:
        q = second.add_periodic_task(print, "beat", every=0.2, name="beat", missed="skip")
        assert q.runs == ran
        assert q.last_run_at == pytest.approx(last_run)
        assert q.last_result_id == last_id
        info = second.get_task(last_id)  # the run itself, from the store
        assert info is not None and info.status is TaskStatus.COMPLETED
        # The interval keeps its grid from the first process.
        assert q.next_run_at is not None
        periods = (q.next_run_at - (p.next_run_at or 0)) / 0.2
        assert abs(periods - round(periods)) < 1e-6, periods
    finally:
        second.shutdown(timeout=DEADLINE)


@pytest.mark.parametrize("missed", ["run_once", "skip"])
def test_runs_missed_while_down_follow_the_policy(tmp_path: Path, missed: str):
    db = tmp_path / "tasks.db"
    first = BackgroundTasks(workers=2, storage=storage(db))
    try:
        p = first.add_periodic_task(print, every=0.3, name="nightly")
        wait_until(lambda: p.runs >= 1, what="a first run")
    finally:
        first.shutdown(timeout=DEADLINE)
    wait_for_time(0.7)  # down long enough to miss two runs
    second = BackgroundTasks(workers=2, storage=storage(db))
    try:
        before = time.time()
        q = second.add_periodic_task(print, every=0.3, name="nightly", missed=missed)
        after = time.time()
        due = q.next_run_at
        assert due is not None
        if missed == "run_once":
            assert due <= after, "the missed run is due at once"
            wait_until(lambda: q.runs == p.runs + 1, what="one catch-up run")
            # One run for all the missed ones, then back on the schedule.
            assert (q.next_run_at or 0) > before
        else:
            assert due > before, "missed runs are skipped"
            assert q.runs == p.runs
    finally:
        second.shutdown(timeout=DEADLINE)


TWO_PROCESSES = """
import os, sys, time
from catzilla.background_tasks import BackgroundTasks

log = sys.argv[2]


def beat():
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {time.time()}\\n")


engine = BackgroundTasks(workers=2, storage="sqlite:///" + sys.argv[1])
p = engine.add_periodic_task(beat, every=0.1, name="shared-beat")
print("READY", flush=True)
end = time.time() + float(sys.argv[3])
while time.time() < end:
    time.sleep(0.01)
p.cancel()
engine.shutdown(timeout=10)
print("RUNS", p.runs, flush=True)
"""


def test_two_processes_on_one_store_fire_each_run_once(tmp_path: Path):
    db = tmp_path / "tasks.db"
    log = tmp_path / "beats.log"
    script = tmp_path / "two.py"
    script.write_text(textwrap.dedent(TWO_PROCESSES))
    BackgroundTasks(workers=1, storage=storage(db)).shutdown()  # create the file first
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(db), str(log), "2.0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    beats = [line.split() for line in log.read_text().splitlines()]
    pids = {b[0] for b in beats}
    times = sorted(float(b[1]) for b in beats)
    with sqlite3.connect(db) as conn:
        claimed = conn.execute(
            "SELECT COUNT(*), COUNT(DISTINCT pid) FROM catzilla_schedule_runs "
            "WHERE name = 'shared-beat'"
        ).fetchone()
    assert len(beats) == claimed[0], "every claimed run ran once, and no run ran unclaimed"
    assert 10 <= len(beats) <= 25, f"{len(beats)} runs in about 2 s at 10 per second"
    # Both processes took part, and no run was fired by both.
    assert len(pids) == 2 and claimed[1] == 2
    # The claims are unique per due time (the table's key), so equal counts
    # mean no due time ran twice, whichever process ran it.
    assert times[-1] - times[0] < 5


def test_schedule_changes_start_over(tmp_path: Path):
    db = tmp_path / "tasks.db"
    first = BackgroundTasks(workers=1, storage=storage(db))
    try:
        p = first.add_periodic_task(print, every=0.05, name="job")
        wait_until(lambda: p.runs >= 1, what="a run")
    finally:
        first.shutdown(timeout=DEADLINE)
    second = BackgroundTasks(workers=1, storage=storage(db))
    try:
        q = second.add_periodic_task(print, every=60, name="job")
        assert q.runs == 0 and q.last_run_at is None
    finally:
        second.shutdown(timeout=DEADLINE)


def test_fork_child_has_no_schedules_of_the_parent(tmp_path: Path):
    code = textwrap.dedent(
        """
        import os
        from catzilla import Catzilla
        app = Catzilla()
        app.enable_background_tasks(workers=1)
        app.add_periodic_task(print, every=60, name="parent-only")
        pid = os.fork()
        if pid == 0:
            assert app.list_periodic_tasks() == []
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert [p.name for p in app.list_periodic_tasks()] == ["parent-only"]
        print("OK")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr


def test_threads_adding_schedules_at_once(make_engine):
    engine = make_engine(workers=2)
    errors: list[BaseException] = []

    def add(i: int) -> None:
        try:
            engine.add_periodic_task(print, every=60, name=f"n{i}")
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert not errors
    assert sorted(p.name for p in engine.list_periodic_tasks()) == sorted(
        f"n{i}" for i in range(16)
    )
