"""One queue, many processes: with a storage URL the store is the queue.
Tasks queued in one process run in others (worker processes started with
``python -m catzilla worker``), exactly once while their owner lives, again
after a lease expires when it does not; priorities, delays, progress,
results, named queues and graceful stops hold across processes."""

from __future__ import annotations

import importlib
import itertools
import shutil
import signal
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from catzilla.background_tasks import TaskStatus
from helpers import DEADLINE, RedisServer, ServerProcess, wait_until

SERVING = "serving queue(s)"
_prefixes = itertools.count()

JOBS = textwrap.dedent(
    """
    import os, time
    from pathlib import Path
    from catzilla.background_tasks import BackgroundTasks, current_task

    HERE = Path(__file__).parent
    # The test process only queues (workers=0); worker processes get their
    # workers from the command line.
    app = BackgroundTasks(
        storage={store!r},
        storage_prefix={prefix!r},
        workers=0,
        lease_timeout=float(os.environ.get("JOBS_LEASE", "30")),
    )


    def note(text):
        with open(HERE / "runs.log", "a") as f:
            f.write(text + "\\n")


    def record(n, pause=0.0):
        time.sleep(pause)
        note(f"{{n}} {{os.getpid()}}")
        return n


    def stamp(tag):
        return {{"tag": tag, "at": time.time(), "pid": os.getpid()}}


    def hold(tag):
        print(f"started {{tag}} in {{os.getpid()}}", flush=True)
        current_task().set_progress(50, "halfway")
        end = time.monotonic() + 60
        while not (HERE / f"release-{{tag}}").exists():
            if time.monotonic() > end:
                raise RuntimeError("never released")
            time.sleep(0.01)
        return f"done {{tag}}"


    def fails(why):
        raise ValueError(why)
    """
)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the module; each test has a key prefix of its own."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs it with apt)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "redis":
        return str(request.getfixturevalue("redis_server").url)
    return f"sqlite:///{tmp_path / 'tasks.db'}"


@pytest.fixture
def jobs(store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The app module, imported here as a producer (``workers=0``)."""
    prefix = f"t{next(_prefixes)}"
    (tmp_path / "jobs.py").write_text(JOBS.format(store=store_url, prefix=prefix))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("jobs", None)
    module = importlib.import_module("jobs")
    yield module
    module.app.shutdown(wait_for_completion=False)
    sys.modules.pop("jobs", None)


Worker = Callable[..., ServerProcess]


@pytest.fixture
def worker(spawn: Callable[..., ServerProcess], tmp_path: Path, jobs: ModuleType) -> Worker:
    """Starts ``python -m catzilla worker jobs:app`` and waits until it serves."""

    def start(*options: str) -> ServerProcess:
        w = spawn(["-m", "catzilla", "worker", "jobs:app", *options], cwd=str(tmp_path))
        w.wait_for(SERVING, stream="stderr")
        return w

    return start


def runs(tmp_path: Path) -> list[tuple[str, int]]:
    log = tmp_path / "runs.log"
    if not log.exists():
        return []
    return [(n, int(pid)) for n, pid in (line.split() for line in log.read_text().splitlines())]


def test_each_task_runs_exactly_once_across_three_worker_processes(jobs, worker, tmp_path):
    workers = [worker("--workers", "2") for _ in range(3)]
    handles = [jobs.app.add_task(jobs.record, i, 0.005) for i in range(300)]
    for i, h in enumerate(handles):
        assert h.wait(DEADLINE) == i
    done = runs(tmp_path)
    counts = Counter(n for n, _ in done)
    assert sorted(counts) == sorted(str(i) for i in range(300))
    assert set(counts.values()) == {1}, "a task ran twice"
    ran_in = {pid for _, pid in done}
    assert ran_in <= {w.pid for w in workers} and len(ran_in) >= 2, ran_in
    assert jobs.os.getpid() not in ran_in, "the producer has no workers"


def test_a_sigkilled_worker_s_task_runs_again_elsewhere_after_its_lease(
    jobs, worker, tmp_path, monkeypatch
):
    monkeypatch.setenv("JOBS_LEASE", "1")
    first = worker("--workers", "1")
    h = jobs.app.add_task(jobs.hold, "k")
    first.wait_for(f"started k in {first.pid}")
    second = worker("--workers", "1")
    killed_at = time.monotonic()
    first.proc.send_signal(signal.SIGKILL)
    second.wait_for(f"started k in {second.pid}", timeout=DEADLINE)
    # The lease (1 s) had to lapse first: the second worker never took a live one.
    assert time.monotonic() - killed_at >= 0.5
    (tmp_path / "release-k").touch()
    assert h.wait(DEADLINE) == "done k"
    info = jobs.app.get_task(h.task_id)
    assert info.status is TaskStatus.COMPLETED and info.attempts == 2


def test_priorities_and_delays_hold_across_processes(jobs, worker, tmp_path):
    from catzilla.background_tasks import TaskPriority as P

    order = [("low", P.LOW), ("normal", P.NORMAL), ("critical", P.CRITICAL), ("high", P.HIGH)]
    handles = [jobs.app.add_task(jobs.record, name, priority=p) for name, p in order]
    queued_at = time.time()
    delayed = jobs.app.add_task(jobs.stamp, "later", delay_ms=600)
    assert jobs.app.flush()
    worker("--workers", "1")
    for h in handles:
        h.wait(DEADLINE)
    assert [n for n, _ in runs(tmp_path)] == ["critical", "high", "normal", "low"]
    stamped = delayed.wait(DEADLINE)
    assert stamped["at"] - queued_at >= 0.6, "a delayed task started before it was due"


def test_progress_results_and_errors_are_seen_from_the_queuing_process(jobs, worker, tmp_path):
    w = worker("--workers", "2")
    h = jobs.app.add_task(jobs.hold, "p")
    w.wait_for(f"started p in {w.pid}")

    def halfway() -> bool:
        info = jobs.app.get_task(h.task_id)
        return info is not None and info.status is TaskStatus.RUNNING and info.progress == 50

    wait_until(halfway, what="progress from the worker process")
    assert jobs.app.get_task(h.task_id).current_step == "halfway"
    assert [t.task_id for t in jobs.app.list_tasks(status=TaskStatus.RUNNING)] == [h.task_id]
    (tmp_path / "release-p").touch()
    assert h.wait(DEADLINE) == "done p"
    bad = jobs.app.add_task(jobs.fails, "no good", max_retries=1)
    with pytest.raises(ValueError, match="no good") as raised:
        bad.wait(DEADLINE)
    assert any("fails" in note for note in raised.value.__notes__), "the remote traceback"
    assert jobs.app.get_task(bad.task_id).attempts == 2


def test_named_queues_are_served_only_by_their_workers(jobs, worker, tmp_path):
    worker("--workers", "1", "--queues", "emails")
    plain = jobs.app.add_task(jobs.record, "plain")
    mail = jobs.app.add_task(jobs.record, "mail", queue="emails")
    assert mail.wait(DEADLINE) == "mail"
    # Queued after `plain`: had this worker served the default queue, it
    # would have run `plain` first.
    assert jobs.app.add_task(jobs.record, "mail2", queue="emails").wait(DEADLINE) == "mail2"
    assert jobs.app.get_task(plain.task_id).status is TaskStatus.PENDING
    worker("--workers", "1")
    assert plain.wait(DEADLINE) == "plain"


def test_a_worker_stopped_mid_task_hands_it_back(jobs, worker, tmp_path):
    first = worker("--workers", "1", "--grace", "0.3")
    h = jobs.app.add_task(jobs.hold, "g")
    first.wait_for(f"started g in {first.pid}")
    first.proc.send_signal(signal.SIGTERM)
    first.wait_for("handed back to the queue=1", stream="stderr")
    assert first.wait_exit(DEADLINE, "SIGTERM") == 0
    second = worker("--workers", "1")
    second.wait_for(f"started g in {second.pid}")
    (tmp_path / "release-g").touch()
    assert h.wait(DEADLINE) == "done g"


def test_a_function_a_worker_cannot_import_fails_with_the_reason(jobs, worker, tmp_path):
    (tmp_path / "extra.py").write_text("def gone():\n    return 1\n")
    import extra

    h = jobs.app.add_task(extra.gone)
    (tmp_path / "extra.py").unlink()  # gone before any worker could import it
    worker("--workers", "1")
    with pytest.raises(Exception, match="cannot run here") as raised:
        h.wait(DEADLINE)
    assert "extra" in str(raised.value)
    assert jobs.app.get_task(h.task_id).attempts == 1, "not retried"
    sys.modules.pop("extra", None)
