"""Statistics, auto-scaling, retention, profiling and shutdown."""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import re
import subprocess
import time
from pathlib import Path

import pytest
from catzilla.background_tasks import (
    BackgroundTasks,
    EngineStats,
    TaskCancelledError,
    TaskPriority,
    TaskStatus,
)
from helpers import DEADLINE, Recorder, run_python, wait_for_time, wait_until

P = TaskPriority

ROOT = Path(__file__).resolve().parent.parent


def documented_stats_fields() -> set[str]:
    """The fields the statistics table of docs/background-tasks.md defines."""
    text = (ROOT / "docs" / "background-tasks.md").read_text()
    table = text.split("## Statistics", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`(\w+)`", row)}


def stub_stats_fields() -> set[str]:
    """The fields the stub declares on ``EngineStats``."""
    tree = ast.parse((ROOT / "python" / "catzilla" / "_catzilla.pyi").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "EngineStats")
    return {
        f.target.id
        for f in cls.body
        if isinstance(f, ast.AnnAssign) and isinstance(f.target, ast.Name)
    }


def fail(message="failed on purpose"):
    raise ValueError(message)


def nap_50ms():
    time.sleep(0.05)
    return "rested"


def spin(seconds):
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


# --- counters and rates ---------------------------------------------------------


def test_counters_after_running_tasks(make_engine):
    e = make_engine(workers=2)
    ok = [e.add_task(lambda i=i: i) for i in range(8)]
    bad = [e.add_task(fail, max_retries=0) for _ in range(2)]
    for h in ok:
        h.wait(DEADLINE)
    for h in bad:
        with pytest.raises(ValueError):
            h.wait(DEADLINE)
    wait_until(lambda: e.get_stats().failed_tasks == 2, what="failures counted")
    wait_until(lambda: e.get_stats().total_tasks_processed == 8, what="completions counted")
    s = e.get_stats()
    assert s.total_tasks_submitted == 10
    assert s.total_tasks_processed == 8
    assert s.failed_tasks == 2
    assert s.cancelled_tasks == 0
    assert s.rejected_tasks == 0
    assert s.retry_count == 0
    assert s.error_rate == pytest.approx(20.0)
    assert s.tasks_per_second > 0
    assert s.memory_usage_mb > 0
    assert s.retained_results == 10
    assert s.total_queued == 0
    assert s.running_tasks == 0
    assert s.panics_contained == 0
    assert s.worker_memory_usage == 0


def test_running_coroutines_are_counted(make_engine):
    e = make_engine(workers=1)
    release = Recorder()

    async def nap():
        while not len(release):
            await asyncio.sleep(0.005)
        return "woke"

    r = e.add_task(nap)
    wait_until(lambda: e.get_stats().async_tasks_running == 1, what="coroutine running")
    s = e.get_stats()
    assert s.running_tasks == 1
    assert r.status is TaskStatus.RUNNING
    wait_until(lambda: e.get_stats().active_workers == 0, what="the worker to be free")
    release.append(True)
    assert r.wait(DEADLINE) == "woke"
    wait_until(lambda: e.get_stats().async_tasks_running == 0, what="coroutine counted out")
    assert e.get_stats().running_tasks == 0


def test_cancellations_count_but_not_in_the_rate(make_engine):
    e = make_engine(workers=1)
    handles = [e.add_task(int, delay_ms=60_000) for _ in range(5)]
    assert all(h.cancel() for h in handles)
    s = e.get_stats()
    assert s.cancelled_tasks == 5
    assert s.tasks_per_second == 0
    assert s.error_rate == 0
    assert s.scheduled_tasks == 0


def test_fresh_engine_stats(make_engine):
    s = make_engine(workers=3, enable_auto_scaling=False).get_stats()
    assert s.total_tasks_submitted == 0
    assert s.error_rate == 0.0
    assert s.avg_execution_time_ms == 0.0
    assert s.total_workers == 3
    assert s.idle_workers + s.active_workers == s.total_workers
    assert s.queue_pressure == 0.0


def test_execution_times_reflect_task_duration(make_engine):
    e = make_engine(workers=2)
    handles = [e.add_task(nap_50ms) for _ in range(4)]
    assert [h.wait(DEADLINE) for h in handles] == ["rested"] * 4
    s = e.get_stats()
    assert s.avg_execution_time_ms >= 40
    assert s.p95_execution_time_ms >= 40
    assert s.p99_execution_time_ms >= s.p95_execution_time_ms >= 40
    # Milliseconds, not microseconds or seconds.
    assert s.avg_execution_time_ms < 5_000


def test_coroutine_execution_times_are_recorded(make_engine):
    e = make_engine(workers=1)

    async def nap():
        await asyncio.sleep(0.05)

    e.add_task(nap).wait(DEADLINE)
    wait_until(lambda: e.get_stats().avg_execution_time_ms >= 40, what="async run time")


def test_active_workers_while_a_task_runs(single, blocker):
    single.add_task(blocker)
    blocker.wait_started()
    s = single.get_stats()
    assert s.active_workers == 1
    assert s.idle_workers == 0
    assert s.running_tasks == 1
    assert s.total_workers == 1
    wait_until(lambda: single.get_stats().avg_worker_utilization > 0, what="utilization")
    assert single.get_stats().avg_worker_utilization <= 100
    blocker.release()
    wait_until(lambda: single.get_stats().active_workers == 0, what="worker idle again")
    s = single.get_stats()
    assert s.running_tasks == 0
    assert s.idle_workers == 1


def test_queue_sizes_per_lane_and_pressure(make_engine, blocker):
    e = make_engine(workers=1, queue_size=50, enable_auto_scaling=False)
    e.add_task(blocker)
    blocker.wait_started()
    counts = {P.CRITICAL: 1, P.HIGH: 2, P.NORMAL: 3, P.LOW: 4}
    for p, n in counts.items():
        for _ in range(n):
            e.add_task(int, priority=p)
    for _ in range(2):
        e.add_task(int, delay_ms=60_000)
    s = e.get_stats()
    assert (s.critical_queue_size, s.high_queue_size, s.normal_queue_size, s.low_queue_size) == (
        1,
        2,
        3,
        4,
    )
    assert s.scheduled_tasks == 2
    assert s.total_queued == 12
    assert s.queue_pressure == pytest.approx(12 * 100 / 50)
    assert s.worker_memory_usage > 0
    blocker.release()
    wait_until(lambda: e.get_stats().total_queued == 2, what="ready lanes drained")
    s = e.get_stats()
    assert s.queue_pressure == pytest.approx(2 * 100 / 50)
    assert s.critical_queue_size == s.high_queue_size == s.normal_queue_size == 0
    assert s.low_queue_size == 0


def test_worker_cpu_usage_is_measured(make_engine):
    e = make_engine(workers=1)
    assert e.add_task(spin, 0.2).wait(DEADLINE) > 0
    wait_until(lambda: e.get_stats().worker_cpu_usage > 0, what="worker CPU")
    assert e.get_stats().engine_cpu_usage > 0


def test_memory_figures(make_engine):
    e = make_engine(workers=1, memory_pool_mb=1)
    for h in [e.add_task(lambda: "x" * 10_000) for _ in range(5)]:
        h.wait(DEADLINE)
    s = e.get_stats()
    assert s.memory_usage_mb > 0
    assert s.engine_memory_usage > 5 * 10_000 / (1024 * 1024)
    assert 0 <= s.memory_efficiency < 100
    assert s.memory_efficiency == pytest.approx(100 - s.engine_memory_usage * 100 / 1, abs=0.01)


def test_uptime_increases(engine):
    first = engine.get_stats().uptime_seconds
    assert first >= 0
    wait_until(lambda: engine.get_stats().uptime_seconds > first, what="uptime to grow")


def test_to_dict_has_every_field(engine):
    engine.add_task(int).wait(DEADLINE)
    s = engine.get_stats()
    assert isinstance(s, EngineStats)
    d = s.to_dict()
    fields = set(d)  # the native EngineStats is where the list is kept
    assert len(fields) >= 40
    public = {n for n in dir(s) if not n.startswith("_") and n != "to_dict"}
    assert public == fields
    # The stub and the docs follow it: every field declared and defined, no other.
    assert stub_stats_fields() == fields
    assert documented_stats_fields() == fields
    for name in fields:
        assert d[name] == getattr(s, name), name
    assert json.loads(json.dumps(d)) == d
    assert "total_tasks_submitted=1" in repr(s)


# --- auto-scaling -------------------------------------------------------------------


def test_auto_scaling_grows_for_a_burst_and_shrinks_back(make_engine, make_blocker):
    """A backlog that arrives in one burst right after start grows the pool
    (regression: growth used to be checked only in add_task, rate-limited from
    engine start, so a burst never grew it), then idle workers retire."""
    e = make_engine(workers=1, min_workers=1, max_workers=3, idle_timeout=0.2)
    blockers = [make_blocker() for _ in range(5)]
    handles = [e.add_task(b) for b in blockers]
    # Every worker is busy and work waits: the pool grows, up to max_workers.
    wait_until(lambda: e.get_stats().total_workers > 1, what="growth")
    wait_until(lambda: e.get_stats().total_workers == 3, what="growth to max_workers")
    s = e.get_stats()
    assert s.workers_started == 2
    assert s.workers_stopped == 0
    for b in blockers:
        b.release()
    for h in handles:
        h.wait(DEADLINE)
    wait_until(lambda: e.get_stats().total_workers == 1, what="shrink back to min_workers")
    s = e.get_stats()
    assert s.workers_stopped == 2
    assert s.workers_started == 2


def test_auto_scaling_grows_while_work_arrives_then_shrinks(make_engine, make_blocker):
    e = make_engine(workers=1, min_workers=1, max_workers=3, idle_timeout=0.2)
    blockers = []
    seen_workers = []

    def submit_and_check():
        b = make_blocker()
        blockers.append(b)
        e.add_task(b)
        n = e.get_stats().total_workers
        seen_workers.append(n)
        return n == 3

    wait_until(submit_and_check, interval=0.05, what="growth to max_workers")
    assert e.get_stats().workers_started == 2
    wait_until(lambda: e.get_stats().active_workers == 3, what="every worker busy")
    assert max(seen_workers) <= 3
    for b in blockers:
        b.release()
    wait_until(lambda: e.get_stats().total_workers == 1, what="shrink back to min_workers")
    s = e.get_stats()
    assert s.workers_stopped == 2
    assert s.total_tasks_processed == len(blockers)
    # It stays at min_workers.
    wait_for_time(0.4)
    assert e.get_stats().total_workers == 1


def test_auto_scaling_disabled_never_grows(make_engine, make_blocker):
    e = make_engine(
        workers=1, min_workers=1, max_workers=3, idle_timeout=0.2, enable_auto_scaling=False
    )
    blockers = []
    for _ in range(8):
        b = make_blocker()
        blockers.append(b)
        e.add_task(b)
        wait_for_time(0.05)
        assert e.get_stats().total_workers == 1
    s = e.get_stats()
    assert s.workers_started == 0
    assert s.normal_queue_size == 7
    for b in blockers:
        b.release()
    wait_until(lambda: e.get_stats().total_tasks_processed == 8)
    s = e.get_stats()
    assert s.total_workers == 1
    assert s.workers_stopped == 0


def test_workers_above_min_retire_when_idle(make_engine):
    e = make_engine(workers=3, min_workers=1, max_workers=3, idle_timeout=0.3)
    assert e.get_stats().total_workers == 3
    wait_until(lambda: e.get_stats().total_workers == 1, what="idle workers to retire")
    assert e.get_stats().workers_stopped == 2
    assert e.add_task(lambda: "still served").wait(DEADLINE) == "still served"


# --- retention ------------------------------------------------------------------------


def test_tiny_memory_pool_evicts_oldest_results(make_engine):
    e = make_engine(workers=1, memory_pool_mb=0.001)
    handles = [e.add_task(lambda i=i: i) for i in range(30)]
    for h in handles:
        h.wait(DEADLINE)
    # wait() returns once a task is final; its record is kept just after.
    s = wait_until(
        lambda: (s := e.get_stats()).retained_results + s.evicted_results == 30 and s,
        what="every record to be retained or evicted",
    )
    assert s.evicted_results > 0
    assert s.retained_results < 30
    assert s.retained_results + s.evicted_results == 30
    assert e.get_result(handles[0].task_id) is None
    newest = e.get_result(handles[-1].task_id)
    assert newest is not None and newest.result() == 29
    # A handle held by the caller keeps its own result.
    assert handles[0].result() == 0


def test_zero_result_ttl_evicts_at_once(make_engine):
    e = make_engine(workers=1, result_ttl=0)
    r = e.add_task(lambda: "kept by handle")
    assert r.wait(DEADLINE) == "kept by handle"
    wait_until(lambda: e.get_stats().evicted_results >= 1, what="eviction")
    assert e.get_result(r.task_id) is None
    assert r.result() == "kept by handle"
    assert e.get_stats().retained_results == 0


def test_result_ttl_expires_records(make_engine):
    e = make_engine(workers=1, result_ttl=0.5)
    r = e.add_task(lambda: 1)
    r.wait(DEADLINE)
    assert e.get_result(r.task_id) is not None
    wait_until(lambda: e.get_result(r.task_id) is None, what="the record to expire")
    assert e.get_stats().evicted_results == 1


def test_running_tasks_are_never_evicted(make_engine, blocker):
    e = make_engine(workers=2, result_ttl=0)
    running = e.add_task(blocker)
    blocker.wait_started()
    for h in [e.add_task(int) for _ in range(5)]:
        h.wait(DEADLINE)
    found = e.get_result(running.task_id)
    assert found is not None and found.status is TaskStatus.RUNNING


# --- profiling --------------------------------------------------------------------------


def profiled_sleep():
    time.sleep(0.01)
    return "p"


def profiled_fail():
    raise ValueError("profiled failure")


def test_profiling_records_each_function(make_engine):
    e = make_engine(workers=2, enable_profiling=True)
    for h in [e.add_task(profiled_sleep) for _ in range(3)]:
        h.wait(DEADLINE)
    bad = e.add_task(profiled_fail, max_retries=1)
    with pytest.raises(ValueError):
        bad.wait(DEADLINE)
    profile = e.get_profile()
    ok = profile[f"{__name__}.profiled_sleep"]
    assert ok["count"] == 3
    assert ok["failures"] == 0
    assert ok["avg_ms"] >= 5
    assert ok["max_ms"] >= ok["avg_ms"]
    assert ok["p99_ms"] >= ok["p95_ms"] > 0
    failing = profile[f"{__name__}.profiled_fail"]
    assert failing["count"] == 2
    assert failing["failures"] == 2


def test_profiling_is_off_by_default(engine):
    engine.add_task(profiled_sleep).wait(DEADLINE)
    assert engine.get_profile() == {}


# --- shutdown --------------------------------------------------------------------------


def test_shutdown_waits_for_running_and_queued_tasks(single):
    ran = Recorder()
    started = Recorder()

    def first():
        started.append("first")
        time.sleep(0.2)
        ran.append("first")
        return "first done"

    running = single.add_task(first)
    wait_until(lambda: len(started) == 1, what="the first task to start")
    queued = [single.add_task(ran.append, i) for i in range(3)]
    delayed = single.add_task(ran.append, "delayed", delay_ms=50)
    report = single.shutdown(wait_for_completion=True, timeout=DEADLINE)
    assert report == {
        "drained": True,
        "cancelled": [],
        "still_running": [],
        "handed_back": [],
    }
    assert running.status is TaskStatus.COMPLETED
    assert running.result() == "first done"
    assert all(q.status is TaskStatus.COMPLETED for q in queued)
    assert delayed.status is TaskStatus.COMPLETED
    assert ran.snapshot()[:4] == ["first", 0, 1, 2]
    assert set(ran.snapshot()) == {"first", 0, 1, 2, "delayed"}
    assert single.is_shutdown


def test_shutdown_timeout_cancels_queued_tasks(single, blocker, caplog):
    ran = Recorder()
    running = single.add_task(blocker, "finished late")
    blocker.wait_started()
    queued = [single.add_task(ran.append, i) for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="catzilla.tasks"):
        report = single.shutdown(wait_for_completion=True, timeout=0.2)
    assert report["drained"] is False
    assert report["cancelled"] == [q.task_id for q in queued]
    assert report["still_running"] == [running.task_id]
    for q in queued:
        assert q.status is TaskStatus.CANCELLED
        with pytest.raises(TaskCancelledError):
            q.wait(DEADLINE)
    messages = [r.getMessage() for r in caplog.records if r.name == "catzilla.tasks"]
    cancelled_msgs = [m for m in messages if "cancelled 3" in m]
    assert len(cancelled_msgs) == 1
    assert all(q.task_id in cancelled_msgs[0] for q in queued)
    assert any(running.task_id in m and "still running" in m for m in messages)
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "catzilla.tasks")
    # The running task is not cut short: it finishes after shutdown returned.
    blocker.release()
    assert running.wait(DEADLINE) == "finished late"
    assert ran.snapshot() == []
    assert single.get_stats().cancelled_tasks == 3


def test_shutdown_without_waiting_cancels_queued_at_once(single, blocker, caplog):
    ran = Recorder()
    running = single.add_task(blocker)
    blocker.wait_started()
    queued = [single.add_task(ran.append, i, priority=p) for i, p in enumerate(P)]
    with caplog.at_level(logging.WARNING, logger="catzilla.tasks"):
        report = single.shutdown(wait_for_completion=False, timeout=DEADLINE)
    # It did not wait for the running task, which is still held.
    assert running.status is TaskStatus.RUNNING
    assert report["drained"] is False
    assert report["cancelled"] == [q.task_id for q in queued]  # highest lane first
    assert report["still_running"] == [running.task_id]
    assert all(q.status is TaskStatus.CANCELLED for q in queued)
    assert any("cancelled 4" in r.getMessage() for r in caplog.records)
    blocker.release()
    running.wait(DEADLINE)
    assert ran.snapshot() == []


def test_delayed_task_due_after_the_deadline_is_cancelled(single, caplog):
    ran = Recorder()
    early = single.add_task(ran.append, "early", delay_ms=50)
    late = single.add_task(ran.append, "late", delay_ms=60_000)
    with caplog.at_level(logging.WARNING, logger="catzilla.tasks"):
        report = single.shutdown(wait_for_completion=True, timeout=DEADLINE)
    assert early.status is TaskStatus.COMPLETED
    assert late.status is TaskStatus.CANCELLED
    assert report["cancelled"] == [late.task_id]
    assert report["still_running"] == []
    assert ran.snapshot() == ["early"]
    with pytest.raises(TaskCancelledError):
        late.result()
    assert any(late.task_id in r.getMessage() for r in caplog.records)


def test_shutdown_cancels_a_waiting_retry(make_engine):
    e = make_engine(workers=1, retry_backoff_ms=1e9, retry_backoff_cap_ms=1e9)
    r = e.add_task(fail, max_retries=3)
    wait_until(lambda: r.status is TaskStatus.RETRYING, what="RETRYING")
    report = e.shutdown(wait_for_completion=True, timeout=0.5)
    assert report["cancelled"] == [r.task_id]
    assert r.status is TaskStatus.CANCELLED
    assert r.attempts == 1
    assert len(r.errors) == 1


def test_shutdown_waits_for_a_running_coroutine(engine):
    async def nap():
        await asyncio.sleep(0.2)
        return "awake"

    r = engine.add_task(nap)
    wait_until(lambda: engine.get_stats().async_tasks_running == 1, what="coroutine running")
    report = engine.shutdown(wait_for_completion=True, timeout=DEADLINE)
    assert report == {
        "drained": True,
        "cancelled": [],
        "still_running": [],
        "handed_back": [],
    }
    assert r.result() == "awake"


@pytest.mark.parametrize(
    ("wait", "timeout"), [(False, DEADLINE), (True, 0.2)], ids=["no-wait", "deadline"]
)
def test_shutdown_cancels_a_running_coroutine_and_reports_it(engine, wait, timeout):
    """Regression: a coroutine cancelled by shutdown used to be reported nowhere,
    with drained=True."""

    async def long_nap():
        await asyncio.sleep(30)

    r = engine.add_task(long_nap)
    wait_until(lambda: engine.get_stats().async_tasks_running == 1, what="coroutine running")
    report = engine.shutdown(wait_for_completion=wait, timeout=timeout)
    wait_until(lambda: r.is_ready(), what="the coroutine to be cancelled")
    assert r.status is TaskStatus.CANCELLED
    with pytest.raises(TaskCancelledError):
        r.result()
    # Work was cut short: the report must not claim a clean drain.
    assert report["drained"] is False
    assert r.task_id in report["cancelled"] + report["still_running"]


def test_no_work_runs_after_shutdown(single, blocker):
    ran = Recorder()
    running = single.add_task(blocker)
    blocker.wait_started()
    queued = single.add_task(ran.append, "never")
    single.shutdown(wait_for_completion=False, timeout=0)
    blocker.release()
    running.wait(DEADLINE)
    assert queued.status is TaskStatus.CANCELLED
    assert ran.snapshot() == []
    wait_until(lambda: single.get_stats().total_workers == 0, what="workers to exit")


# --- interpreter exit -------------------------------------------------------------------


def assert_clean_exit(proc: subprocess.CompletedProcess[str]) -> None:
    err = proc.stderr.lower()
    assert proc.returncode == 0, proc.stderr
    assert "fatal" not in err, proc.stderr
    assert "panicked" not in err, proc.stderr
    assert "traceback" not in err, proc.stderr


def test_exit_with_a_task_still_running_does_not_crash(tmp_path):
    marker = tmp_path / "finished.txt"
    proc = run_python(
        """
        import sys, time
        from catzilla import Catzilla

        app = Catzilla()
        app.enable_background_tasks(workers=1, exit_timeout=0.5)

        def slow(path):
            for _ in range(300):  # 3 s in short sleeps
                time.sleep(0.01)
            open(path, "w").write("finished")

        r = app.add_task(slow, sys.argv[1])
        while r.status.value != "running":
            time.sleep(0.001)
        print("exiting")
        """,
        str(marker),
    )
    assert_clean_exit(proc)
    assert proc.stdout.strip() == "exiting"
    assert "still running" in proc.stderr
    # The exit drain gave up after exit_timeout rather than waiting for the task.
    assert not marker.exists()


def test_exit_drains_queued_tasks(tmp_path):
    out = tmp_path / "out.txt"
    proc = run_python(
        """
        import sys, time
        from catzilla import Catzilla
        from catzilla.background_tasks import BackgroundTasks

        path = sys.argv[1]

        def write(line):
            time.sleep(0.02)
            with open(path, "a") as f:
                f.write(f"{line}\\n")

        app = Catzilla()
        app.enable_background_tasks(workers=1, max_workers=1, exit_timeout=30)
        for i in range(5):
            app.add_task(write, f"app-{i}")
        app.add_task(write, "delayed", delay_ms=100)
        plain = BackgroundTasks(workers=1, exit_timeout=30)
        plain.add_task(write, "plain")
        """,
        str(out),
    )
    assert_clean_exit(proc)
    lines = out.read_text().splitlines()
    assert sorted(lines) == sorted([f"app-{i}" for i in range(5)] + ["delayed", "plain"])
    app_lines = [x for x in lines if x.startswith("app-")]
    assert app_lines == [f"app-{i}" for i in range(5)]


def test_exit_with_a_running_coroutine_does_not_crash():
    proc = run_python(
        """
        import asyncio, time
        from catzilla.background_tasks import BackgroundTasks

        engine = BackgroundTasks(workers=1, exit_timeout=0.3)

        async def forever():
            await asyncio.sleep(30)

        r = engine.add_task(forever)
        while engine.get_stats().async_tasks_running == 0:
            time.sleep(0.001)
        """
    )
    assert_clean_exit(proc)


def test_worker_cpu_is_seen_while_a_task_runs(make_engine):
    import time as _time

    e = make_engine(workers=1, max_workers=1)
    stop = _time.monotonic() + 3.0

    def burn() -> None:
        while _time.monotonic() < stop:
            sum(range(1000))

    r = e.add_task(burn, timeout_ms=0)
    e.get_stats()  # first sample
    readings = []

    def busy_reading() -> bool:
        readings.append(e.get_stats().worker_cpu_usage)
        return readings[-1] > 20

    wait_until(busy_reading, timeout=2.8, what="worker CPU while the task runs")
    assert not r.is_ready()  # seen live, before the task ended
    r.wait(DEADLINE)


def test_async_counter_never_wraps(make_engine):
    import asyncio as _asyncio

    e = make_engine(workers=2)

    async def instant() -> int:
        await _asyncio.sleep(0)
        return 1

    results = [e.add_task(instant) for _ in range(3000)]
    seen = []
    for r in results[::100]:
        seen.append(e.get_stats().async_tasks_running)
        r.wait(DEADLINE)
    for r in results:
        r.wait(DEADLINE)
    assert all(0 <= n <= 3000 for n in seen), max(seen)
    wait_until(lambda: e.get_stats().async_tasks_running == 0, what="no coroutine left")


def test_concurrent_shutdowns_share_one_report(make_engine, make_blocker):
    import threading as _threading

    e = make_engine(workers=1, max_workers=1)
    b = make_blocker()
    e.add_task(b)
    b.wait_started()
    queued = [e.add_task(lambda: None) for _ in range(3)]
    reports = []
    threads = [
        _threading.Thread(target=lambda: reports.append(e.shutdown(timeout=0.2))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    b.release()
    assert len(reports) == 3
    assert all(r == reports[0] for r in reports)
    assert sorted(reports[0]["cancelled"]) == sorted(q.task_id for q in queued)


def test_defaults_fit_many_workers_and_idle_timeout_must_be_positive():
    e = BackgroundTasks(workers=80)
    try:
        assert e.config["max_workers"] == 80
    finally:
        e.shutdown(timeout=1)
    with pytest.raises(ValueError, match="idle_timeout"):
        BackgroundTasks(workers=1, idle_timeout=0)
