"""The built-in dashboard over HTTP (no browser): access control, CSRF, its
files, the snapshot and its stream, and the actions. Apps are served in this
process on a free port."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from catzilla import Catzilla
from catzilla.background_tasks import TaskStatus, current_task
from helpers import DEADLINE, Client, Recorder, Reply, free_port, wait_until

TOKEN = "s3cret-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
SNAPSHOT_KEYS = {"stats", "lanes", "workers", "latency_ms", "history", "running", "queued",
                 "failures", "schedules", "http"}  # fmt: skip


def dashboard_app(token: str | None = TOKEN) -> Catzilla:
    app = Catzilla()
    app.enable_background_tasks(workers=2, retry_backoff_ms=1, retry_backoff_cap_ms=5)
    app.enable_dashboard(token=token)
    return app


@pytest.fixture
def served(serve_app: Callable[[Catzilla], Client]) -> tuple[Catzilla, Client]:
    app = dashboard_app()
    return app, serve_app(app)


def csrf_of(client: Client, headers: dict[str, str] = BEARER) -> str:
    page = client.get("/_catzilla", headers=headers)
    assert page.status == 200
    found = re.search(rb'<meta name="csrf-token" content="([0-9a-f]{32,})">', page.body)
    assert found, page.body[:500]
    return found.group(1).decode()


def act(client: Client, path: str, csrf: str, **headers: str) -> Reply:
    return client.post(f"/_catzilla/api/{path}", headers=BEARER | {"X-CSRF-Token": csrf} | headers)


def is_json_401(r: Reply) -> bool:
    return r.status == 401 and r.json() == {"error": "Unauthorized"}


def read_event(client: Client, headers: dict[str, str]) -> tuple[int, str, list[str]]:
    """Opens the stream and reads its first event (its lines up to the blank
    one); returns the status, content type and lines, and closes the connection."""
    conn = client.connection()
    try:
        conn.request("GET", "/_catzilla/api/stream", headers=headers)
        r = conn.getresponse()
        kind = r.getheader("content-type") or ""
        if r.status != 200:
            return r.status, kind, [r.read().decode()]
        lines: list[str] = []
        while raw := r.readline():
            line = raw.decode().rstrip("\r\n")
            if not line and lines:
                break
            if line:
                lines.append(line)
        return r.status, kind, lines
    finally:
        conn.close()


# Access


def test_token_guards_every_dashboard_url(served):
    app, client = served
    page = client.get("/_catzilla")
    assert page.status == 401
    assert b'name="token"' in page.body and b"<form" in page.body
    assert page.header("www-authenticate") == 'Bearer realm="catzilla dashboard"'
    for path in ("/_catzilla/api/snapshot", "/_catzilla/api/stream",
                 "/_catzilla/static/dashboard.js", "/_catzilla/static/dashboard.css"):  # fmt: skip
        assert is_json_401(client.get(path)), path
        assert is_json_401(client.get(path, headers={"Authorization": "Bearer wrong-token!"}))
        assert is_json_401(client.get(path, headers={"Authorization": TOKEN})), path
        assert is_json_401(client.get(path, headers={"Cookie": "catzilla_dashboard=forged"}))
    assert is_json_401(client.post("/_catzilla/api/tasks/abc/cancel"))

    snap = client.get("/_catzilla/api/snapshot", headers=BEARER)
    assert snap.status == 200
    assert SNAPSHOT_KEYS <= set(snap.json())
    assert client.get("/_catzilla", headers={"Authorization": f"bearer {TOKEN}"}).status == 200


def test_login_form_sets_a_strict_session_cookie(served):
    app, client = served
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    wrong = client.post("/_catzilla/login", "token=not-the-token", headers=form)
    assert wrong.status == 401 and b"Wrong token." in wrong.body
    assert wrong.header("set-cookie") is None
    r = client.post("/_catzilla/login", f"token={TOKEN}", headers=form)
    assert r.status == 303 and r.header("location") == "/_catzilla"
    cookie = r.header("set-cookie")
    assert cookie is not None
    attributes = [part.strip() for part in cookie.split(";")]
    assert {"HttpOnly", "SameSite=Strict", "Path=/_catzilla"} <= set(attributes)
    session = {"Cookie": attributes[0]}
    assert TOKEN not in attributes[0]
    page = client.get("/_catzilla", headers=session)
    assert page.status == 200 and b"csrf-token" in page.body
    assert SNAPSHOT_KEYS <= set(client.get("/_catzilla/api/snapshot", headers=session).json())
    # Already signed in: the login page sends the browser on.
    assert client.get("/_catzilla/login", headers=session).status == 303


def test_stream_sends_snapshot_events_to_an_authorised_client(served):
    app, client = served
    assert read_event(client, {})[:2] == (401, "application/json")
    status, kind, lines = read_event(client, BEARER)
    assert status == 200 and kind.startswith("text/event-stream")
    assert "event: snapshot" in lines
    data = "\n".join(x.removeprefix("data:").strip() for x in lines if x.startswith("data:"))
    assert SNAPSHOT_KEYS <= set(json.loads(data))


def test_static_files_and_security_headers(served):
    app, client = served
    js = client.get("/_catzilla/static/dashboard.js", headers=BEARER)
    assert js.status == 200 and js.header("content-type") == "text/javascript; charset=utf-8"
    css = client.get("/_catzilla/static/dashboard.css", headers=BEARER)
    assert css.status == 200 and css.header("content-type") == "text/css; charset=utf-8"
    assert js.body and css.body
    assert client.get("/_catzilla/static/index.html", headers=BEARER).status == 404
    assert client.get("/_catzilla/static/..%2Fapp.py", headers=BEARER).status == 404

    page = client.get("/_catzilla", headers=BEARER)
    assert (page.header("content-type") or "").startswith("text/html")
    csp = page.header("content-security-policy") or ""
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert page.header("x-content-type-options") == "nosniff"
    assert re.search(rb'<meta name="csrf-token" content="[0-9a-f]{64}">', page.body)
    assert b"{{" not in page.body  # every placeholder filled


# CSRF and actions


def test_actions_need_the_csrf_token_and_the_same_origin(served):
    app, client = served
    csrf = csrf_of(client)
    delayed = [app.add_task(nightly, delay_ms=600_000) for _ in range(3)]
    path = f"tasks/{delayed[0].task_id}/cancel"
    assert client.post(f"/_catzilla/api/{path}", headers=BEARER).status == 403
    assert act(client, path, "").status == 403
    wrong = act(client, path, "0" * len(csrf))
    assert wrong.status == 403 and "CSRF" in wrong.json()["error"]
    for origin in ("http://evil.example", "null", "http://["):
        assert act(client, path, csrf, Origin=origin).status == 403, origin
    assert delayed[0].status is TaskStatus.SCHEDULED  # nothing was done
    ok = act(client, path, csrf, Origin=f"http://127.0.0.1:{client.port}")
    assert ok.status == 200 and ok.json() == {"cancelled": True}
    assert act(client, f"tasks/{delayed[1].task_id}/cancel", csrf).json() == {"cancelled": True}
    assert delayed[0].status is TaskStatus.CANCELLED
    assert app.get_task(delayed[1].task_id).status is TaskStatus.CANCELLED
    assert delayed[2].status is TaskStatus.SCHEDULED
    # Cancelling again: nothing left to cancel.
    assert act(client, path, csrf).json() == {"cancelled": False}


_flaky_calls: dict[str, int] = {}
_flaky_lock = threading.Lock()


def flaky(key: str) -> str:
    """Fails the first time it runs for ``key``, succeeds after."""
    with _flaky_lock:
        _flaky_calls[key] = _flaky_calls.get(key, 0) + 1
        first = _flaky_calls[key] == 1
    if first:
        raise ValueError(f"first attempt fails for {key}")
    return f"done {key}"


def nightly() -> None:
    pass


def test_retry_cancel_and_schedule_actions(served):
    app, client = served
    csrf = csrf_of(client)
    key = f"order-{time.monotonic_ns()}"
    failed = app.add_task(flaky, key, max_retries=0)
    with pytest.raises(ValueError):
        failed.wait(DEADLINE)
    r = act(client, f"tasks/{failed.task_id}/retry", csrf)
    assert r.status == 200
    new_id = r.json()["task_id"]
    assert new_id != failed.task_id
    retried = app.get_task_result(new_id)
    assert retried is not None and retried.wait(DEADLINE) == f"done {key}"
    assert _flaky_calls[key] == 2
    assert failed.status is TaskStatus.FAILED  # the old task stays as it was
    # A second click on the same failure queues nothing: it was retried already.
    again = act(client, f"tasks/{failed.task_id}/retry", csrf)
    assert again.status == 409 and new_id in again.json()["error"]
    assert _flaky_calls[key] == 2
    snap = client.get("/_catzilla/api/snapshot", headers=BEARER).json()
    row = next(f for f in snap["failures"] if f["task_id"] == failed.task_id)
    assert row["retried_as"] == new_id

    not_failed = act(client, f"tasks/{new_id}/retry", csrf)
    assert not_failed.status == 409 and not_failed.json()["error"]
    assert act(client, "tasks/00000000000000000000/cancel", csrf).status == 404
    assert act(client, "tasks/00000000000000000000/retry", csrf).status == 404
    assert act(client, f"tasks/{new_id}/explode", csrf).status == 404

    app.add_periodic_task(nightly, every=3600, name="nightly")
    assert act(client, "schedules/nightly/pause", csrf).json() == {"paused": True}
    assert app.list_periodic_tasks()[0].is_paused
    snap = client.get("/_catzilla/api/snapshot", headers=BEARER).json()
    assert [(s["name"], s["paused"]) for s in snap["schedules"]] == [("nightly", True)]
    assert act(client, "schedules/nightly/resume", csrf).json() == {"paused": False}
    assert not app.list_periodic_tasks()[0].is_paused
    assert act(client, "schedules/nope/pause", csrf).status == 404
    assert act(client, "schedules/nightly/explode", csrf).status == 404


# Snapshot content


def reporting(started: threading.Event, release: threading.Event) -> str:
    current_task().set_progress(40, "parsing")
    started.set()
    if not release.wait(DEADLINE):
        raise RuntimeError("never released")
    return "reported"


def broken_step() -> None:
    raise KeyError("missing-column")


def test_snapshot_shows_running_progress_failures_and_the_engines_stats(served):
    app, client = served
    started, release = threading.Event(), threading.Event()
    try:
        running = app.add_task(reporting, started, release)
        assert started.wait(DEADLINE)
        failed = app.add_task(broken_step, max_retries=0)
        with pytest.raises(KeyError):
            failed.wait(DEADLINE)
        snap = client.get("/_catzilla/api/snapshot", headers=BEARER).json()
        (row,) = [t for t in snap["running"] if t["task_id"] == running.task_id]
        assert row["progress"] == 40.0 and row["step"] == "parsing"
        assert row["name"].endswith(".reporting") and row["attempts"] == 1
        assert snap["workers"]["busy"] >= 1
    finally:
        release.set()
    assert running.wait(DEADLINE) == "reported"
    (failure,) = [f for f in snap["failures"] if f["task_id"] == failed.task_id]
    assert failure["error"] == "KeyError: 'missing-column'"
    assert "broken_step" in failure["traceback"] and "Traceback" in failure["traceback"]
    assert failure["name"].endswith(".broken_step") and failure["attempts"] == 1

    def quiet() -> dict[str, Any] | None:
        snap = client.get("/_catzilla/api/snapshot", headers=BEARER).json()
        return snap if snap["stats"]["running_tasks"] == 0 and not snap["running"] else None

    snap = wait_until(quiet, what="a quiet moment")
    stats = app.get_task_stats()
    for field in ("total_tasks_submitted", "total_tasks_processed", "failed_tasks",
                  "cancelled_tasks", "retry_count", "timeout_count", "total_queued"):  # fmt: skip
        assert snap["stats"][field] == getattr(stats, field), field
    assert (stats.total_tasks_submitted, stats.total_tasks_processed, stats.failed_tasks) == (
        2,
        1,
        1,
    )
    assert snap["lanes"] == {"critical": 0, "high": 0, "normal": 0, "low": 0, "scheduled": 0}
    assert snap["workers"]["busy"] == 0 and snap["workers"]["total"] == stats.total_workers
    assert snap["http"]["total"] >= 1 and snap["http"]["errors"] == 0


# Without a token


def test_without_a_token_only_loopback_hosts_are_served(serve_app):
    app = dashboard_app(token=None)
    client = serve_app(app)
    assert client.get("/_catzilla").status == 200
    assert client.get("/_catzilla/api/snapshot", headers={"Host": "localhost"}).status == 200
    hosts = (
        "evil.example",
        f"evil.example:{client.port}",
        "127.0.0.1.evil.example",
        "127.x",
        "[::1",
    )
    for host in hosts:
        assert is_json_401(client.get("/_catzilla/api/snapshot", headers={"Host": host})), host
        assert client.get("/_catzilla", headers={"Host": host}).status == 401
    # The login form has nothing to check without a token: loopback is let in.
    assert client.post("/_catzilla/login", "token=x", headers={"Host": "x.example"}).status == 401
    assert client.post("/_catzilla/login", "token=x").status == 303


def test_without_a_token_listening_beyond_loopback_is_refused():
    app = dashboard_app(token=None)
    port = free_port()
    outcome = Recorder()

    def run() -> None:
        try:
            app.listen(port=port, host="0.0.0.0")
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            outcome.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(DEADLINE)
    try:
        if t.is_alive():
            app.stop()
            t.join(DEADLINE)
            pytest.fail("listen served a token-less dashboard on 0.0.0.0")
    finally:
        app.tasks.shutdown(wait_for_completion=False, timeout=1)
    (error,) = outcome.snapshot()
    assert isinstance(error, RuntimeError), error
    assert "token" in str(error) and "0.0.0.0" in str(error)


# Bad input


def test_enable_dashboard_refuses_bad_arguments():
    app = Catzilla()
    with pytest.raises(ValueError, match="path"):
        app.enable_dashboard(path="nope")
    with pytest.raises(ValueError, match="path"):
        app.enable_dashboard(path="/dash/")
    with pytest.raises(ValueError, match="token"):
        app.enable_dashboard(token="short")
    app.enable_dashboard(path="/ops", token=TOKEN)
    with pytest.raises(RuntimeError, match="/ops"):
        app.enable_dashboard(token=TOKEN)


def test_the_history_sampler_runs_only_while_the_app_serves(serve_app):
    def samplers() -> int:
        return sum(t.name == "catzilla-dashboard" for t in threading.enumerate())

    before = samplers()
    app = Catzilla()
    app.enable_background_tasks(workers=1)
    app.enable_dashboard()
    assert samplers() == before  # enabling alone starts nothing
    client = serve_app(app)
    wait_until(lambda: samplers() == before + 1, what="the sampler to start")
    snap = wait_until(
        lambda: (s := client.get("/_catzilla/api/snapshot").json())["history"] and s,
        what="a second of history",
    )
    assert set(snap["history"][0]) == {"t", "completed", "failed", "requests", "errors"}
    app.stop()
    wait_until(lambda: samplers() == before, what="the sampler to stop")
