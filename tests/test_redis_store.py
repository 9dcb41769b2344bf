"""The Redis store's own faults, on a real ``redis-server``: unreachable at
start, lost and back while running (append-only: nothing acknowledged is
lost, nothing accepted is dropped), keys under the prefix that are not ours,
and a periodic schedule run once per beat by three processes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from catzilla.background_tasks import BackgroundTasks, StorageError, TaskStatus
from helpers import DEADLINE, RedisServer, free_port, wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="redis-server is not installed (.ci/run installs it with apt)",
)


def square(x: int) -> int:
    return x * x


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, appendonly=True)
    yield server
    server.stop()


def test_redis_unreachable_at_start_names_the_url_without_its_password():
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    with pytest.raises(StorageError) as raised:
        BackgroundTasks(workers=1, storage=url)
    message = str(raised.value)
    assert f"redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in message, message
    assert "s3cret" not in message


def test_a_redis_restart_loses_nothing_acknowledged_or_accepted(redis: RedisServer):
    engine = BackgroundTasks(workers=2, storage=redis.url, storage_prefix="restart")
    try:
        done = [engine.add_task(square, i) for i in range(50)]
        assert [h.wait(DEADLINE) for h in done] == [i * i for i in range(50)]
        assert engine.flush(DEADLINE)
        redis.stop()
        # Tasks accepted before the engine notices are kept and sent later;
        # once it has noticed, add_task says so instead of dropping anything.
        accepted = []
        deadline = time.monotonic() + DEADLINE
        while True:
            assert time.monotonic() < deadline, "add_task never reported the lost store"
            try:
                accepted.append(engine.add_task(square, 100 + len(accepted)))
            except StorageError as exc:
                assert "unreachable" in str(exc) and f"127.0.0.1:{redis.port}" in str(exc)
                break
            time.sleep(0.01)
        redis.start()
        wait_until(lambda: _accepts(engine), what="add_task to work again once Redis is back")
        results = [h.wait(DEADLINE) for h in accepted]
        assert results == [(100 + i) ** 2 for i in range(len(accepted))]
        # The results acknowledged before the restart survived it (append-only file).
        for i, h in enumerate(done):
            info = engine.get_task(h.task_id)
            assert info is not None and info.status is TaskStatus.COMPLETED
            assert info.result == i * i
    finally:
        engine.shutdown(timeout=DEADLINE)


def _accepts(engine: BackgroundTasks) -> bool:
    try:
        engine.add_task(square, 0)
    except StorageError:
        return False
    return True


def test_keys_under_the_prefix_that_are_not_ours_are_skipped(redis: RedisServer):
    p = "foreign"
    redis.command("SET", f"{p}:t:junk", "not a hash")
    redis.command("ZADD", f"{p}:q:default", "0", "junk")
    redis.command("ZADD", f"{p}:all", "9999999999", "junk")
    redis.command("HSET", f"{p}:t:half", "name", "no id")
    redis.command("ZADD", f"{p}:q:default", "0", "half")
    engine = BackgroundTasks(workers=2, storage=redis.url, storage_prefix=p)
    try:
        assert engine.add_task(square, 7).wait(DEADLINE) == 49
        listed = engine.list_tasks()
        assert [t.result for t in listed] == [49]
        assert engine.get_task("junk") is None
        assert engine.get_task("half") is None
    finally:
        engine.shutdown(timeout=DEADLINE)


BEATS = """
import os, sys, time
from catzilla.background_tasks import BackgroundTasks

log, stop = sys.argv[2], sys.argv[3]


def beat():
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {time.time()}\\n")


engine = BackgroundTasks(workers=1, storage=sys.argv[1], storage_prefix="beats")
engine.add_periodic_task(beat, every=0.2, name="beat")
print("READY", flush=True)
end = time.monotonic() + 60
while not os.path.exists(stop) and time.monotonic() < end:
    time.sleep(0.01)
engine.shutdown(timeout=10)
"""


def test_a_periodic_schedule_runs_once_per_beat_across_three_processes(
    redis: RedisServer, tmp_path: Path
):
    script = tmp_path / "beats.py"
    script.write_text(textwrap.dedent(BEATS))
    log, stop = tmp_path / "beats.log", tmp_path / "stop"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), redis.url, str(log), str(stop)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]

    def beats() -> list[str]:
        text = log.read_text() if log.exists() else ""
        return text[: text.rfind("\n") + 1].splitlines()

    try:
        wait_until(
            lambda: len(beats()) >= 15 or any(p.poll() is not None for p in procs),
            timeout=60,
            what="fifteen beats",
        )
    finally:
        stop.touch()
        outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    ran = beats()
    claimed = int(redis.command("ZCARD", "beats:runs:beat").lstrip(":"))
    assert len(ran) == claimed, "each claimed beat ran once, and nothing unclaimed ran"
    times = sorted(float(line.split()[1]) for line in ran)
    # One grid for all three: a beat every 0.2 s, not three.
    span = times[-1] - times[0]
    assert len(times) <= span / 0.2 + 3, (len(times), span)


def test_a_claim_whose_reply_was_lost_lapses_and_the_task_runs(redis: RedisServer):
    # Claimed on the server for a live process that never heard of it (the
    # reply was lost): that process does not renew what it does not hold, so
    # the lease lapses and the task runs.
    p = "stray"
    producer = BackgroundTasks(workers=0, storage=redis.url, storage_prefix=p)
    worker = BackgroundTasks(workers=1, storage=redis.url, storage_prefix=p, lease_timeout=0.6)
    try:
        worker_id = worker.owner_id
        assert worker_id is not None
        # Delayed a minute, so the worker cannot claim it the usual way first.
        h = producer.add_task(square, 9, delay_ms=60_000)
        assert producer.flush(DEADLINE)
        redis.command("ZREM", f"{p}:d:default", h.task_id)
        soon = str(time.time() + 0.6)
        redis.command("HSET", f"{p}:t:{h.task_id}", "owner", worker_id, "lease_until", soon)
        redis.command("HSET", f"{p}:t:{h.task_id}", "status", "running", "attempts", "1")
        redis.command("ZADD", f"{p}:leases", soon, h.task_id)
        redis.command("SADD", f"{p}:own:{worker_id}", h.task_id)
        assert h.wait(DEADLINE) == 81
        assert producer.get_task(h.task_id).attempts == 2
    finally:
        worker.shutdown(timeout=DEADLINE)
        producer.shutdown(timeout=DEADLINE)


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_queue_depths_are_counted_per_named_queue_in_the_store(
    store: str, redis: RedisServer, tmp_path: Path
):
    from catzilla import metrics

    url = redis.url if store == "redis" else f"sqlite:///{tmp_path / 'tasks.db'}"
    engine = BackgroundTasks(
        workers=1, storage=url, storage_prefix="depths", queues=["default", "emails", "idle"]
    )
    try:
        for _ in range(4):
            engine.add_task(square, 1, delay_ms=3_600_000)
        for _ in range(3):
            engine.add_task(square, 2, delay_ms=3_600_000, queue="emails")
        depths = metrics.queue_depths(engine, engine.get_stats())
        assert depths == {"default": 4, "emails": 3, "idle": 0}
        # A task that ran is no longer waiting.
        assert engine.add_task(square, 3, queue="emails").wait(DEADLINE) == 9
        assert metrics.queue_depths(engine, engine.get_stats())["emails"] == 3
    finally:
        engine.shutdown(wait_for_completion=False, timeout=DEADLINE)
