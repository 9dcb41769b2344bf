"""Durable storage (SQLite): records, lookups across restarts, recovery, a crash test."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from catzilla.background_tasks import BackgroundTasks, StorageError, TaskStatus, current_task
from helpers import DEADLINE, wait_until

JOBS = """
import time

from catzilla.background_tasks import current_task


def double(x):
    return {"double": x * 2}


def slow(i, pause=0.004):
    time.sleep(pause)
    return i


def returns_a_set():
    return {1, 2}


def report(steps):
    for n in range(steps):
        current_task().set_progress((n + 1) * 100 / steps, f"step {n + 1}")
    return steps
"""


@pytest.fixture
def jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An importable module of task functions, as a real app would have."""
    (tmp_path / "durable_jobs.py").write_text(JOBS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("durable_jobs", None)
    import durable_jobs

    yield durable_jobs
    sys.modules.pop("durable_jobs", None)


def url(path: Path) -> str:
    return f"sqlite:///{path}"


def rows(db: Path) -> dict[str, str]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT task_id, status FROM catzilla_tasks"))


def test_records_progress_results_and_errors_are_stored(tmp_path, jobs):
    db = tmp_path / "tasks.db"
    e = BackgroundTasks(workers=2, storage=url(db), retry_backoff_ms=1)
    try:
        ok = e.add_task(jobs.double, 21)
        progress = e.add_task(jobs.report, 4)
        bad = e.add_task(jobs.double, None, max_retries=1)
        assert ok.wait(DEADLINE) == {"double": 42}
        assert progress.wait(DEADLINE) == 4
        with pytest.raises(TypeError):
            bad.wait(DEADLINE)
        assert e.flush()
        assert e.storage_error is None
    finally:
        e.shutdown(timeout=5)
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        by_id = {r["task_id"]: r for r in conn.execute("SELECT * FROM catzilla_tasks")}
    assert json.loads(by_id[ok.task_id]["result"]) == {"double": 42}
    assert by_id[ok.task_id]["status"] == "completed"
    assert by_id[ok.task_id]["name"] == "durable_jobs.double"
    assert by_id[progress.task_id]["current_step"] == "step 4"
    failed = by_id[bad.task_id]
    assert (failed["status"], failed["attempts"]) == ("failed", 2)
    assert json.loads(failed["error"])["type"] == "TypeError"
    assert failed["args"] is None  # arguments are dropped once a task is final


def test_finished_tasks_can_be_looked_up_after_a_restart(tmp_path, jobs):
    db = tmp_path / "tasks.db"
    first = BackgroundTasks(workers=1, storage=url(db))
    r = first.add_task(jobs.double, 5)
    r.wait(DEADLINE)
    first.shutdown(timeout=5)
    second = BackgroundTasks(workers=1, storage=url(db))
    try:
        info = second.get_task(r.task_id)
        assert info is not None
        assert (info.status, info.result) == (TaskStatus.COMPLETED, {"double": 10})
        assert [t.task_id for t in second.list_tasks(status=TaskStatus.COMPLETED)] == [r.task_id]
        assert second.get_task("0" * 20) is None
    finally:
        second.shutdown(timeout=5)


def test_a_restart_runs_what_the_last_process_left_in_the_queue(tmp_path, jobs):
    db = tmp_path / "tasks.db"
    first = BackgroundTasks(workers=1, max_workers=1, storage=url(db))
    blocker = first.add_task(jobs.slow, -1, 0.5)
    wait_until(lambda: blocker.status is TaskStatus.RUNNING, what="the blocker to start")
    queued = [first.add_task(jobs.double, i) for i in range(3)]
    later = first.add_task(jobs.double, 9, delay_ms=200)
    report = first.shutdown(wait_for_completion=False)
    # The running task went back to the queue (its end here is not recorded);
    # queued ones stayed there: the next process runs them all.
    assert report["handed_back"] == [blocker.task_id]
    assert blocker.wait(DEADLINE) == -1
    second = BackgroundTasks(workers=2, storage=url(db))
    try:
        assert second.recover() == {"resubmitted": [], "failed": []}, "no lease was lost"
        for q in [blocker, *queued, later]:
            wait_until(
                lambda q=q: second.get_task(q.task_id).status is TaskStatus.COMPLETED,
                what=f"{q.task_id} to run in the second process",
            )
        assert second.get_task(queued[2].task_id).result == {"double": 4}
        assert second.get_task(later.task_id).result == {"double": 18}
    finally:
        second.shutdown(timeout=5)


def test_a_shared_store_refuses_tasks_that_carry_live_objects(tmp_path, jobs):
    e = BackgroundTasks(workers=1, storage=url(tmp_path / "t.db"))
    try:
        with pytest.raises(TypeError, match="lambda"):
            e.add_task(lambda: 1)

        def local() -> None:
            pass

        with pytest.raises(TypeError, match="local function"):
            e.add_task(local)
        with pytest.raises(TypeError, match=r"args\[1\] \(set \{1, 2\}\) is not JSON"):
            e.add_task(jobs.slow, 1, {1, 2})
        with pytest.raises(TypeError, match="keyword argument pause"):
            e.add_task(jobs.slow, 1, pause=object())
        assert e.add_task(jobs.double, 1).wait(DEADLINE) == {"double": 2}
        # A result that is not JSON fails the task, saying why, without retries.
        bad = e.add_task(jobs.returns_a_set)
        with pytest.raises(TypeError, match="not JSON"):
            bad.wait(DEADLINE)
        assert bad.attempts == 1
    finally:
        e.shutdown(timeout=5)


def test_bad_storage_gets_a_clear_error(tmp_path):
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"not a database " * 100)
    with pytest.raises(StorageError, match="not a usable SQLite database"):
        BackgroundTasks(workers=1, storage=url(corrupt))
    with pytest.raises(StorageError, match="cannot open"):
        BackgroundTasks(workers=1, storage=url(tmp_path / "missing" / "dir" / "t.db"))
    locked = tmp_path / "locked.db"
    BackgroundTasks(workers=1, storage=url(locked)).shutdown(timeout=1)
    # Another process holds the write lock (a lock held in this process would
    # not count: POSIX locks are per process).
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE')\n"
            "print('LOCKED', flush=True)\n"
            "time.sleep(60)\n",
            str(locked),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "LOCKED"
        with pytest.raises(StorageError, match="locked"):
            BackgroundTasks(workers=1, storage=url(locked))
    finally:
        holder.kill()
        holder.wait(DEADLINE)
        holder.stdout.close()
    with pytest.raises(ValueError, match="sqlite:///"):
        BackgroundTasks(workers=1, storage="postgres://db")
    with pytest.raises(ValueError, match="needs a shared store"):
        BackgroundTasks(workers=0)


def test_progress_is_stored(tmp_path, jobs):
    db = tmp_path / "t.db"
    e = BackgroundTasks(workers=1, storage=url(db))
    try:
        r = e.add_task(jobs.report, 3)
        r.wait(DEADLINE)
        e.flush()
        info = e.list_tasks()[0]
        assert (info.progress, info.current_step) == (100.0, "step 3")
    finally:
        e.shutdown(timeout=5)
    assert current_task is not None


CHILD = """
import sys, time
sys.path.insert(0, {jobs_dir!r})
import durable_jobs
from catzilla.background_tasks import BackgroundTasks

engine = BackgroundTasks(workers=2, max_workers=2, queue_size=5000, storage={url!r})
if {recover}:
    print("RECOVERED", len(engine.recover()["resubmitted"]), flush=True)
else:
    for i in range({count}):
        engine.add_task(durable_jobs.slow, i, 0.004)
    engine.flush()
    print("ENQUEUED", flush=True)
time.sleep(120)
"""


def test_sigkill_halfway_loses_nothing(tmp_path, jobs):
    db = tmp_path / "crash.db"
    count = 1000

    def start(recover: bool) -> subprocess.Popen[str]:
        code = CHILD.format(jobs_dir=str(tmp_path), url=url(db), recover=recover, count=count)
        return subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    first = start(recover=False)
    try:
        assert first.stdout is not None
        assert first.stdout.readline().strip() == "ENQUEUED"
        wait_until(
            lambda: 200 <= list(rows(db).values()).count("completed"),
            timeout=60,
            what="a good share of the tasks to complete",
        )
        os.kill(first.pid, signal.SIGKILL)
        first.wait(DEADLINE)
    finally:
        first.kill()
        first.wait(DEADLINE)
        first.stdout.close()
    before = rows(db)
    assert len(before) == count
    done_before = list(before.values()).count("completed")
    assert done_before < count, "the child finished before it was killed"
    # The dead process's claims (running or prepared to run) are taken back
    # at once, without waiting out their lease; the rest waited in the queue.
    with sqlite3.connect(db) as conn:
        (held,) = conn.execute(
            "SELECT COUNT(*) FROM catzilla_tasks WHERE owner IS NOT NULL"
        ).fetchone()
    assert held > 0
    second = start(recover=True)
    try:
        assert second.stdout is not None
        line = ""
        while not line.startswith("RECOVERED"):
            line = second.stdout.readline().strip()
            assert line or second.poll() is None, "the second process ended early"
        assert line == f"RECOVERED {held}", line
        wait_until(
            lambda: list(rows(db).values()).count("completed") == count,
            timeout=120,
            what="every task to complete after the restart",
        )
    finally:
        second.kill()
        second.wait(DEADLINE)
        second.stdout.close()
    after = rows(db)
    assert len(after) == count
    assert set(after.values()) == {"completed"}


def test_a_huge_idle_timeout_on_a_store_still_runs_tasks(tmp_path, jobs):
    # The worker's wait for a claimed task once overflowed its deadline and
    # the worker thread died, leaving the task claimed and never run.
    e = BackgroundTasks(workers=1, storage=url(tmp_path / "t.db"), idle_timeout=1.7e19)
    try:
        assert e.add_task(jobs.double, 2).wait(DEADLINE) == {"double": 4}
    finally:
        e.shutdown(timeout=5)
