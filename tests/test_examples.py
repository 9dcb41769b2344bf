"""The project's own examples: imported in this process and called through
``TestClient``, their tasks awaited with ``drain()`` (no sleeps, no polling);
and served in a subprocess and called over HTTP where serving itself (real
sockets, a periodic run some seconds after start, the app's own ``listen``)
is what is tested."""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from catzilla import Catzilla
from catzilla.background_tasks import NonRetryableError, TaskStatus, TaskTimeoutError
from catzilla.testing import TestClient
from helpers import DEADLINE, Client, ServerProcess, wait_until

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def call(client: Client, path: str, method: str = "GET") -> tuple[int, Any]:
    r = client.request(method, path)
    return r.status, json.loads(r.body)


def test_health_monitor_runs_its_periodic_check(spawn):
    p: ServerProcess = spawn([str(EXAMPLES / "health_monitor_app.py"), "0"])
    host, port = p.wait_serving()
    client = Client(host, port, timeout=DEADLINE)
    status, body = call(client, "/monitoring")
    assert status == 200
    names = [t["name"] for t in body["periodic_tasks"]]
    assert names == ["system-health", "nightly-report"]
    nightly = body["periodic_tasks"][1]
    assert (
        nightly["schedule"] == 'cron "0 3 * * *" (UTC)'
        and nightly["next_run_at"] % 86400 == 3 * 3600
    )
    # The first health check runs one interval after start. The reading is
    # there (200) from when the run is queued; wait for it to end.
    status, latest = wait_until(
        lambda: (
            (r := call(client, "/health/latest"))[0] == 200
            and r[1]["status"] in ("completed", "failed", "cancelled")
            and r
        ),
        timeout=30,
        what="the first health reading",
    )
    assert latest["status"] == "completed", latest
    assert 0 <= latest["result"]["memory_percent"] <= 100
    p.wait_for("System health - CPU:")
    status, paused = call(client, "/monitoring/pause", "POST")
    assert status == 200 and paused["paused"] is True
    status, resumed = call(client, "/monitoring/resume", "POST")
    assert status == 200 and resumed["paused"] is False and resumed["runs"] >= 1
    assert p.stop() == 0


def test_monitoring_app_serves_progress_metrics_and_dashboard_over_http(spawn):
    p: ServerProcess = spawn([str(EXAMPLES / "monitoring_app.py"), "0"])
    host, port = p.wait_serving()
    client = Client(host, port, timeout=DEADLINE)
    status, body = call(client, "/reports?pages=8", method="POST")
    assert status == 202
    task_id = body["task_id"]
    # The progress stream: events until "done", progress never going back.
    r = client.request("GET", f"/reports/{task_id}/events")
    assert r.status == 200 and r.header("content-type").startswith("text/event-stream")
    events = [
        (block.split("\n")[0].removeprefix("event: "), json.loads(block.split("data: ", 1)[1]))
        for block in r.body.decode().strip().split("\n\n")
        if block.startswith("event: ")
    ]
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"progress"}, kinds
    progress = [d["progress"] for k, d in events if k == "progress"]
    assert progress == sorted(progress)
    done = events[-1][1]
    assert done["task_id"] == task_id and done["status"] in ("completed", "failed")
    # (What the failure hook sees is tested in-process, outcome chosen, below.)
    metrics = client.request("GET", "/metrics").body.decode()
    series = 'priority="normal",queue="default",task="__main__.build_report"'
    assert f"catzilla_tasks_submitted_total{{{series}}} 1.0" in metrics
    page = client.request("GET", "/_catzilla")
    assert page.status == 200 and b'name="csrf-token"' in page.body


# In-process: each test imports a fresh copy of the example (a module name of
# its own, so its engine and module state are its own), and calls it through
# TestClient.

_copies = itertools.count()

LoadExample = Callable[[str], ModuleType]


@pytest.fixture
def load_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LoadExample]:
    """Imports ``examples/<stem>.py`` as a new module (not served: its
    ``listen`` is under ``if __name__ == "__main__"``). The module is in
    ``sys.modules`` while the test runs, so its task functions import by
    name (as a store needs). At teardown an engine still running is shut
    down and the module forgotten."""
    monkeypatch.setenv("CATZILLA_EXAMPLE_DB", str(tmp_path / "example-tasks.db"))
    loaded: list[ModuleType] = []

    def load(stem: str) -> ModuleType:
        name = f"example_{stem}_{next(_copies)}"
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{stem}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        loaded.append(module)
        spec.loader.exec_module(module)
        return module

    yield load
    for module in loaded:
        app = getattr(module, "app", None)
        if isinstance(app, Catzilla) and app.tasks is not None and not app.tasks.is_shutdown:
            app.tasks.shutdown(wait_for_completion=False, timeout=1)
        sys.modules.pop(module.__name__, None)


@pytest.mark.parametrize("stem", sorted(p.stem for p in EXAMPLES.glob("*.py")))
def test_every_example_imports_without_serving(
    load_example: LoadExample, stem: str, capsys: pytest.CaptureFixture[str]
):
    module = load_example(stem)
    app = module.app
    assert isinstance(app, Catzilla) and app._server is None
    assert app.tasks is not None and not app.tasks.is_shutdown
    assert "serving on" not in capsys.readouterr().out
    assert app.tasks.drain(DEADLINE) == []  # importing queues no work


def sse_events(body: str) -> list[tuple[str, Any]]:
    """(event, data) of each event of a Server-Sent Events body."""
    return [
        (block.split("\n")[0].removeprefix("event: "), json.loads(block.split("data: ", 1)[1]))
        for block in body.strip().split("\n\n")
        if block.startswith("event: ")
    ]


def test_newsletter_subscribe_sends_the_welcome_email(
    load_example: LoadExample, capsys: pytest.CaptureFixture[str]
):
    example = load_example("newsletter_app")
    app = example.app
    with TestClient(app) as client:
        assert client.get("/").json() == {"app": "newsletter", "subscribers": 0}
        r = client.post("/subscribers", json={"email": "ann@example.com"})
        assert r.status_code == 202
        task_id = r.json()["task_id"]
        assert r.json() == {"subscribed": "ann@example.com", "task_id": task_id}
        assert r.headers["location"] == f"/tasks/{task_id}"

        [sent] = app.tasks.drain(timeout=DEADLINE)
        assert sent.task_id == task_id and sent.result() == {"sent_to": "ann@example.com"}
        assert client.get(r.headers["location"]).json() == {
            "task_id": task_id,
            "status": "completed",
            "attempts": 1,
            "result": {"sent_to": "ann@example.com"},
        }
        assert "welcome e-mail sent to ann@example.com" in capsys.readouterr().out

        again = client.post("/subscribers", json={"email": "ann@example.com"})
        assert again.status_code == 409 and "already subscribed" in again.json()["error"]
        assert client.get("/").json()["subscribers"] == 1
        assert app.tasks.drain(DEADLINE) == []  # a refused subscription queues nothing


def test_newsletter_refuses_bad_requests(load_example: LoadExample):
    example = load_example("newsletter_app")
    with TestClient(example.app) as client:
        for body in ({"email": "not-an-address"}, {"name": "Ann"}, ["ann@example.com"]):
            assert client.post("/subscribers", json=body).status_code == 422, body
        r = client.post(
            "/subscribers", content=b"{oops", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400
        assert client.post("/subscribers", content=b"x" * (64 * 1024 + 1)).status_code == 413
        assert client.delete("/subscribers").status_code == 405
        assert client.post("/reports", params={"rows": 0}).status_code == 422
        assert client.post("/reports", params={"rows": "many"}).status_code == 422
        assert client.get("/tasks/no-such-task").status_code == 404
        assert client.get("/no/such/page").status_code == 404
        assert example.app.tasks.drain(DEADLINE) == []
        assert example.subscribers == set()


def test_newsletter_report_and_stats(load_example: LoadExample):
    example = load_example("newsletter_app")
    app = example.app
    with TestClient(app) as client:
        ids = [
            client.post("/reports", params={"rows": rows}).json()["task_id"] for rows in (2500, 10)
        ]
        done = {t.task_id: t.result() for t in app.tasks.drain(DEADLINE)}
        assert done == {
            ids[0]: {"rows": 2500, "total": sum(range(2500))},
            ids[1]: {"rows": 10, "total": 45},
        }
        status = client.get(f"/tasks/{ids[0]}").json()
        assert status["status"] == "completed" and status["result"]["total"] == sum(range(2500))
        stats = client.get("/stats").json()
        assert stats["total_tasks_submitted"] == 2 and stats["total_tasks_processed"] == 2
        assert stats["failed_tasks"] == 0

        r = client.get("/hello/Ann")
        assert r.text == "<h1>Hello, Ann!</h1>" and r.headers["content-type"].startswith(
            "text/html"
        )
    assert app.tasks.is_shutdown


def test_progress_import_runs_to_completion(load_example: LoadExample):
    example = load_example("progress_app")
    app = example.app
    with TestClient(app) as client:
        r = client.post("/imports", json={"rows": 1000})
        assert r.status_code == 202
        task_id = r.json()["task_id"]
        assert r.json()["status_url"] == f"/imports/{task_id}"
        [done] = app.tasks.drain(DEADLINE)
        assert done.task_id == task_id
        info = client.get(r.json()["status_url"]).json()
        assert info["status"] == "completed" and info["progress"] == 100.0
        assert info["result"] == {"imported": 1000, "batches": 1}
        assert info["current_step"] == "batch 1/1"
        listed = client.get("/imports", params={"status": "completed"}).json()
        assert listed["count"] == 1 and listed["imports"][0]["task_id"] == task_id
        assert client.get("/imports", params={"status": "running"}).json()["count"] == 0


def test_progress_reports_each_batch(load_example: LoadExample):
    """The example's pretend database writes (``time.sleep``) replaced by a
    gate the test opens one batch at a time."""
    example = load_example("progress_app")
    app = example.app
    entered = threading.Semaphore(0)
    proceed = threading.Semaphore(0)

    def one_batch(seconds: float) -> None:
        entered.release()
        assert proceed.acquire(timeout=DEADLINE), "the test never let the batch finish"

    example.time = SimpleNamespace(sleep=one_batch)
    with TestClient(app) as client:
        task_id = client.post("/imports", json={"rows": 3000}).json()["task_id"]
        for batch in range(3):
            assert entered.acquire(timeout=DEADLINE)  # the batch is under way
            info = client.get(f"/imports/{task_id}").json()
            assert info["status"] == "running"
            assert info["progress"] == pytest.approx(batch * 100 / 3)
            assert info["current_step"] == (f"batch {batch}/3" if batch else None)
            running = client.get("/imports", params={"status": "running"}).json()
            assert [t["task_id"] for t in running["imports"]] == [task_id]
            proceed.release()
        [done] = app.tasks.drain(DEADLINE)
        assert done.result() == {"imported": 3000, "batches": 3}
        assert done.current_step == "batch 3/3" and done.progress == 100.0


def test_progress_refuses_bad_requests(load_example: LoadExample):
    example = load_example("progress_app")
    with TestClient(example.app) as client:
        for body in ({"rows": 0}, {"rows": "many"}, {}, [1]):
            assert client.post("/imports", json=body).status_code == 422, body
        assert client.get("/imports/no-such-task").status_code == 404
        r = client.get("/imports", params={"status": "bogus"})
        assert r.status_code == 422 and "bogus" in r.text
        assert client.get("/imports").json() == {"imports": [], "count": 0}
        assert example.app.tasks.drain(DEADLINE) == []


def test_persistent_results_survive_a_restart(load_example: LoadExample):
    first = load_example("persistent_results_app")
    with TestClient(first.app) as client:
        r = client.post("/calculations", json={"n": 1000})
        assert r.status_code == 202
        task_id = r.json()["task_id"]
        [done] = first.app.tasks.drain(DEADLINE)
        expected = {"n": 1000, "sum_of_squares": sum(i * i for i in range(1000))}
        assert done.task_id == task_id and done.result() == expected
        assert client.post("/calculations", json={"n": 0}).status_code == 422
    # A new process, the same database: the result is still there.
    second = load_example("persistent_results_app")
    with TestClient(second.app) as client:
        info = client.get(f"/calculations/{task_id}").json()
        assert info["status"] == "completed" and info["result"] == expected
        assert info["progress"] == 100.0
        listed = client.get("/calculations").json()["calculations"]
        assert [c["task_id"] for c in listed] == [task_id]
        assert client.get("/calculations/unknown").status_code == 404
        assert second.app.tasks.drain(DEADLINE) == []


@pytest.mark.parametrize("fails", [False, True])
def test_monitoring_report_progress_stream_and_failure_hook(load_example: LoadExample, fails: bool):
    example = load_example("monitoring_app")
    app = example.app
    # The example fails one report in five, at random: here the test decides.
    example.random = SimpleNamespace(random=lambda: 0.0 if fails else 0.99)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        r = client.post("/reports", params={"pages": 4})
        assert r.status_code == 202
        task_id = r.json()["task_id"]
        # The stream ends by itself once the report is final.
        r = client.get(f"/reports/{task_id}/events")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.text)
        kinds = [k for k, _ in events]
        assert kinds[-1] == "done" and set(kinds[:-1]) == {"progress"}, kinds
        progress = [d["progress"] for k, d in events if k == "progress"]
        assert progress == sorted(progress)
        outcome = "failed" if fails else "completed"
        assert events[-1][1]["task_id"] == task_id and events[-1][1]["status"] == outcome

        [done] = app.tasks.drain(DEADLINE)
        assert done.task_id == task_id
        if fails:
            assert done.status is TaskStatus.FAILED
            assert str(done.exception()) == "the printer caught fire"
            # drain also waited for the event hooks (they run on a thread of their own)
            assert client.get("/failures").json() == [
                {
                    "task_id": task_id,
                    "name": f"{example.__name__}.build_report",
                    "kind": "failed",
                    "error": "RuntimeError('the printer caught fire')",
                }
            ]
        else:
            assert done.result() == {"pages": 4} and done.progress == 100.0
            assert client.get("/failures").json() == []

        metrics = client.get("/metrics").text
        series = f'priority="normal",queue="default",task="{example.__name__}.build_report"'
        assert f"catzilla_tasks_submitted_total{{{series}}} 1.0" in metrics
        assert 'route="/reports/{task_id}/events"' in metrics
        page = client.get("/_catzilla")
        assert page.status_code == 200 and 'name="csrf-token"' in page.text


def test_health_monitor_schedules_pause_and_resume(load_example: LoadExample):
    example = load_example("health_monitor_app")
    app = example.app
    with TestClient(app) as client:
        # The schedules are there; none is due yet, so drain has nothing to wait for.
        assert app.tasks.drain(DEADLINE) == []
        body = client.get("/monitoring").json()
        assert [t["name"] for t in body["periodic_tasks"]] == ["system-health", "nightly-report"]
        health, nightly = body["periodic_tasks"]
        assert health["runs"] == 0 and health["paused"] is False
        assert nightly["schedule"] == 'cron "0 3 * * *" (UTC)'
        assert nightly["next_run_at"] % 86400 == 3 * 3600
        r = client.get("/health/latest")
        assert r.status_code == 404 and "no reading yet" in r.text
        assert client.post("/monitoring/pause").json()["paused"] is True
        assert client.post("/monitoring/resume").json()["paused"] is False
        # The check itself, run as a task of the app's engine:
        reading = app.add_task(example.check_system_health)
        [done] = app.tasks.drain(DEADLINE)
        assert done.task_id == reading.task_id
        assert 0 <= done.result()["memory_percent"] <= 100


def test_task_engine_tour_outcomes(load_example: LoadExample):
    tour = load_example("task_engine_tour")
    app = tour.app
    emails = [app.add_task(tour.send_email, f"u{i}@example.com", "Hi") for i in range(3)]
    report = app.add_task(tour.build_report, 1000)
    reminder = app.add_task(tour.send_email, "boss@example.com", "Reminder", delay_ms=100)
    flaky = app.add_task(tour.flaky_service, max_retries=3)
    invalid = app.add_task(tour.validate, "{oops")
    timed = app.add_task(tour.stuck, timeout_ms=200, max_retries=0)
    pages = [app.add_task(tour.fetch, n) for n in range(5)]
    done = app.tasks.drain(DEADLINE)
    everything = [*emails, report, reminder, flaky, invalid, timed, *pages]
    assert sorted(h.task_id for h in done) == sorted(h.task_id for h in everything)
    assert [h.result() for h in emails] == [f"sent 'Hi' to u{i}@example.com" for i in range(3)]
    assert report.result() == {"rows": 1000, "total": sum(range(1000))}
    assert reminder.result() == "sent 'Reminder' to boss@example.com"
    assert flaky.result() == "answered on attempt 3" and len(flaky.errors) == 2
    assert isinstance(invalid.exception(), NonRetryableError) and invalid.attempts == 1
    assert isinstance(timed.exception(), TaskTimeoutError)
    assert [p.result() for p in pages] == [f"page {n}" for n in range(5)]
    stats = app.get_task_stats()
    assert stats.failed_tasks == 2 and stats.timeout_count == 1 and stats.retry_count == 2
    report_ = app.tasks.shutdown(timeout=5)
    assert report_["still_running"] == [] and report_["cancelled"] == []
