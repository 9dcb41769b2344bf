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
from helpers import DEADLINE, Blocker, Recorder, run_python, wait_for_time, wait_until


def stamp(into: Recorder) -> Any:
    def run() -> float:
        return into.append(time.time())

    return run


# Intervals


# Due times against start times: the engine computes due times from
# SystemTime (CLOCK_REALTIME), the same clock as time.time(), and only turns
# them into monotonic deadlines to sleep, in a way that errs late (the wall
# clock is read before the monotonic one). So a run that reads
# ``p.next_run_at`` and then time.time() has started at or after the due
# time that armed that next run, exactly: EPS only absorbs float rounding of
# epoch seconds (about 1e-7 s), not scheduling noise. A wall clock stepped
# back while the test runs would still break this, and nothing else should.
EPS = 1e-4


def on_grid(t: float, origin: float, period: float) -> int:
    """The index of ``t`` on the grid ``origin + k * period``; fails if ``t``
    is off it by more than float rounding."""
    k = round((t - origin) / period)
    off = t - (origin + k * period)
    assert abs(off) < EPS, f"{t} is {off:+.6f} s off the grid of {period} s"
    return k


def test_interval_runs_follow_the_schedule_not_the_previous_run(make_engine):
    engine = make_engine(workers=2)
    seen = Recorder()  # (next_run_at as the run started, time.time() just after)
    period = 0.1
    added = threading.Event()
    holder: list[PeriodicTask] = []

    def slowish() -> None:
        assert added.wait(DEADLINE)
        seen.append((holder[0].next_run_at, time.time()))
        time.sleep(0.03)  # a run that takes time must not push the next one later

    before = time.time()
    p = engine.add_periodic_task(slowish, every=period)
    after = time.time()
    holder.append(p)
    added.set()
    first_due = p.next_run_at
    assert first_due is not None
    # The first run is one period after the call (same clock on both sides).
    assert before + period - EPS <= first_due <= after + period + EPS
    wait_until(lambda: len(seen) >= 8, what="eight runs")
    runs = seen.snapshot()[:8]
    slots = []
    for i, (nxt, started) in enumerate(runs):
        assert nxt is not None
        # Every next due time is on the grid of the first one: computed from
        # the schedule, never from when a run started or ended (a run ends
        # 0.03 s after it starts, so that would be far off the grid).
        k = on_grid(nxt, first_due, period)
        slots.append(k)
        # The firing that armed slot k was due at slot k - 1: the run started
        # at or after that due time, never early.
        due = first_due + (k - 1) * period
        assert started >= due - EPS, f"run {i} started {due - started:.6f} s before it was due"
    # Each run is a later slot than the one before (a late run may let the
    # schedule skip a slot under load, but never repeats or goes back).
    assert slots[0] >= 1 and slots == sorted(set(slots)), slots
    assert p.runs >= 8 and p.failures == 0
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
    assert runs.snapshot()[0] >= start - EPS
    when = datetime.now(UTC) + timedelta(seconds=5)
    q = engine.add_periodic_task(stamp(runs), every=60, start_at=when, name="later")
    assert q.next_run_at == pytest.approx(when.timestamp())


def test_jitter_moves_runs_later_only_and_within_bound(make_engine):
    engine = make_engine(workers=2)
    period, jitter = 0.2, 0.05
    seen = Recorder()  # (next_run_at as the run started, time.time() just after)
    added = threading.Event()
    holder: list[PeriodicTask] = []

    def run() -> None:
        assert added.wait(DEADLINE)
        seen.append((holder[0].next_run_at, time.time()))

    before = time.time()
    p = engine.add_periodic_task(run, every=period, jitter_ms=jitter * 1000)
    after = time.time()
    holder.append(p)
    added.set()
    first_fire = p.next_run_at
    assert first_fire is not None
    wait_until(lambda: len(seen) >= 6, what="six runs")
    records = seen.snapshot()
    # next_run_at is when the next run fires: its due time plus its jitter.
    # The due times are on the grid anchored at the call (the engine read its
    # clock between before and after), so each firing time less its slot's
    # offset lies in [due_0, due_0 + jitter): later only, by less than jitter.
    # (jitter is a quarter period, so the slot of a firing time is unambiguous.)
    fires = {0: first_fire}  # slot -> firing time
    for nxt, _ in records:
        assert nxt is not None
        fires[round((nxt - first_fire) / period)] = nxt
    offsets = [fire - k * period for k, fire in fires.items()]
    for base in offsets:
        assert before + period - EPS <= base, f"a run fires {before + period - base:.4f} s early"
        assert base < after + period + jitter + EPS, f"jitter {base - before - period:.4f} s"
    # The jitter is drawn afresh for each run: the firing times are not all
    # on one grid.
    assert max(offsets) - min(offsets) > 1e-6, offsets
    # Each run starts at or after its firing time: the run that saw slot k
    # armed was fired by slot k - 1 (when that one was seen armed).
    checked = 0
    for nxt, started in records:
        k = round((nxt - first_fire) / period)
        if k - 1 in fires:
            assert started >= fires[k - 1] - EPS, f"a run started {fires[k - 1] - started} s early"
            checked += 1
    assert checked >= 1


# Cron


def test_cron_with_seconds_fires_on_the_named_seconds(make_engine):
    engine = make_engine(workers=2)
    runs = Recorder()
    before = time.time()
    p = engine.add_periodic_task(stamp(runs), cron="* * * * * *")  # every second
    after = time.time()
    due = p.next_run_at
    # The first whole second after the call (the engine read the same clock
    # between before and after).
    assert due is not None and due == math.floor(due) and before < due <= math.floor(after) + 1
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


PROCESSES = """
import os, sys, time
from catzilla.background_tasks import BackgroundTasks

log, stop = sys.argv[2], sys.argv[3]


def beat():
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {time.time()}\\n")


engine = BackgroundTasks(workers=2, storage="sqlite:///" + sys.argv[1])
p = engine.add_periodic_task(beat, every=0.1, name="shared-beat")
print("READY", flush=True)
end = time.monotonic() + 60  # in case the test dies without saying stop
while not os.path.exists(stop) and time.monotonic() < end:
    time.sleep(0.01)
p.cancel()
engine.shutdown(timeout=10)
print("RUNS", p.runs, flush=True)
"""


def test_three_processes_on_one_store_fire_each_run_once(tmp_path: Path):
    db = tmp_path / "tasks.db"
    log = tmp_path / "beats.log"
    stop = tmp_path / "stop"
    script = tmp_path / "beats.py"
    script.write_text(textwrap.dedent(PROCESSES))
    BackgroundTasks(workers=1, storage=storage(db)).shutdown()  # create the file first
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(db), str(log), str(stop)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]

    def beats() -> list[list[str]]:
        if not log.exists():
            return []
        text = log.read_text()
        return [line.split() for line in text[: text.rfind("\n") + 1].splitlines()]

    def all_ran() -> bool:
        if any(p.poll() is not None for p in procs):
            return True  # one ended early: stop waiting, the checks below say why
        ran = beats()
        return len({b[0] for b in ran}) == 3 and len(ran) >= 15

    try:
        # Until every process has run some of the shared schedule's runs (a
        # condition, not a fixed time: any may be slow to start). A run is a
        # task in the shared queue: any process may run the one another claimed.
        wait_until(
            all_ran, timeout=60, interval=0.05, what="every process to run the shared schedule"
        )
    finally:
        stop.touch()
        outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    ran = beats()
    with sqlite3.connect(db) as conn:
        (anchor,) = conn.execute(
            "SELECT anchor FROM catzilla_schedules WHERE name = 'shared-beat'"
        ).fetchone()
        claims = conn.execute(
            "SELECT due_ms, pid FROM catzilla_schedule_runs WHERE name = 'shared-beat'"
        ).fetchall()
    assert len(ran) == len(claims), "every claimed run ran once, and no run ran unclaimed"
    assert {int(b[0]) for b in ran} == {p.pid for p in procs}
    assert {pid for _, pid in claims} <= {p.pid for p in procs}
    # The processes fire on the one grid of the stored schedule (due_ms is
    # rounded to the millisecond) and a due time is claimed once (the table's
    # key): so no due time ran twice, whichever process ran it. Three
    # processes each on a grid of their own would run three times as often.
    dues = [due_ms for due_ms, _ in claims]
    assert len(set(dues)) == len(dues)
    for due_ms in dues:
        slots = (due_ms / 1000 - anchor) / 0.1
        assert abs(slots - round(slots)) < 0.011, f"due {due_ms} ms is off the shared grid"


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
    done = run_python(
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
