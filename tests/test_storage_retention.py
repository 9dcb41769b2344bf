"""The SQLite store stays bounded while tasks keep flowing: finished rows older
than ``result_ttl`` are pruned by the store's thread, and the file reuses the
space they held. Rows not yet final are never pruned."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from catzilla.background_tasks import BackgroundTasks, TaskStatus
from helpers import DEADLINE, wait_for_time, wait_until

PAYLOAD = "x" * 2000

# Task functions live at module level: a shared store runs tasks by import name.
ATTEMPTS: list[int] = []
STARTED = threading.Event()
RELEASE = threading.Event()


def payload(i: int) -> str:
    return PAYLOAD


def fails_once() -> None:
    ATTEMPTS.append(1)
    raise RuntimeError("first attempt fails")


def blocks() -> None:
    STARTED.set()
    RELEASE.wait(60)


def disk_bytes(db: Path) -> int:
    return sum(
        os.path.getsize(f"{db}{suffix}")
        for suffix in ("", "-wal")
        if os.path.exists(f"{db}{suffix}")
    )


def stored_rows(engine: BackgroundTasks) -> int:
    return len(engine.list_tasks(limit=1_000_000))


def test_the_store_stays_bounded_while_tasks_keep_flowing(tmp_path: Path):
    db = tmp_path / "tasks.db"
    waves, per_wave, ttl = 12, 1000, 0.2
    engine = BackgroundTasks(workers=2, storage=f"sqlite:///{db}", result_ttl=ttl)
    try:
        sizes, rows = [], []
        first_id = None
        for _ in range(waves):
            results = [engine.add_task(payload, i) for i in range(per_wave)]
            first_id = first_id or results[0].task_id
            for r in results:
                assert r.wait(DEADLINE) == PAYLOAD
            engine.flush()
            # Each wave's rows leave the store soon after their TTL.
            wait_until(lambda: stored_rows(engine) < per_wave, what="the wave to be pruned")
            sizes.append(disk_bytes(db))
            rows.append(stored_rows(engine))
        # Without pruning the file would grow by each wave's 2 MB, and the
        # second half of the run would need about twice what the first did;
        # with it, the later waves fit in the space the first ones left.
        half = waves // 2
        assert max(sizes[half:]) <= 1.25 * max(sizes[:half]), f"the file grows: {sizes}"
        assert max(rows) < per_wave, rows
        # A pruned task is gone from lookups too, as an evicted one is in memory.
        assert engine.get_task(first_id) is None
    finally:
        engine.shutdown()


def test_tasks_not_yet_final_are_never_pruned(tmp_path: Path):
    engine = BackgroundTasks(
        workers=1,
        max_workers=1,
        enable_auto_scaling=False,
        storage=f"sqlite:///{tmp_path / 'tasks.db'}",
        result_ttl=0.0,
        retry_backoff_ms=600_000,
        retry_backoff_cap_ms=600_000,
    )
    ATTEMPTS.clear()
    STARTED.clear()
    RELEASE.clear()
    try:
        done = engine.add_task(payload, 0)
        assert done.wait(DEADLINE) == PAYLOAD
        retrying = engine.add_task(fails_once, max_retries=1)
        wait_until(lambda: ATTEMPTS, what="the first attempt")
        running = engine.add_task(blocks)
        assert STARTED.wait(DEADLINE)
        queued = engine.add_task(payload, 1)
        delayed = engine.add_task(payload, 2, delay_ms=600_000)
        engine.flush()
        # Pruning runs once a second: let two rounds pass.
        wait_for_time(2.5)
        assert engine.get_task(done.task_id) is None, "the finished task was pruned"
        expected = {
            retrying.task_id: (TaskStatus.RETRYING, TaskStatus.SCHEDULED),
            running.task_id: (TaskStatus.RUNNING,),
            queued.task_id: (TaskStatus.PENDING,),
            delayed.task_id: (TaskStatus.SCHEDULED,),
        }
        for task_id, statuses in expected.items():
            info = engine.get_task(task_id)
            assert info is not None and info.status in statuses, (task_id, info)
        RELEASE.set()
        assert queued.wait(DEADLINE) == PAYLOAD
    finally:
        RELEASE.set()
        engine.shutdown(wait_for_completion=False)


def test_a_drained_shutdown_closes_the_store(tmp_path: Path, caplog):
    # Once shut down with nothing left running, the file is the program's
    # again: every record is committed, and deleting it is no store failure.
    db = tmp_path / "tasks.db"
    engine = BackgroundTasks(workers=2, storage=f"sqlite:///{db}")
    ids = [engine.add_task(payload, i).task_id for i in range(50)]
    report = engine.shutdown()
    assert report["drained"], report
    again = BackgroundTasks(workers=1, storage=f"sqlite:///{db}")
    try:
        infos = [again.get_task(i) for i in ids]
        assert all(info is not None and info.status is TaskStatus.COMPLETED for info in infos)
    finally:
        again.shutdown()
    with caplog.at_level("ERROR", logger="catzilla"):
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        wait_for_time(1.5)  # the store's file check runs once a second while open
    assert not engine.get_stats().storage_degraded
    assert [r for r in caplog.records if "storage" in r.getMessage()] == []
