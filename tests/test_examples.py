"""The project's own examples, served in a subprocess and called over HTTP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def test_monitoring_app_streams_progress_and_serves_metrics_and_dashboard(spawn):
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

    # The failure hook saw the task if it failed (it fails one time in five).
    def hook_agrees() -> bool:
        seen = [f["task_id"] for f in call(client, "/failures")[1]]
        return (task_id in seen) == (done["status"] == "failed")

    wait_until(hook_agrees)
    metrics = client.request("GET", "/metrics").body.decode()
    series = 'priority="normal",queue="default",task="__main__.build_report"'
    assert f"catzilla_tasks_submitted_total{{{series}}} 1.0" in metrics
    page = client.request("GET", "/_catzilla")
    assert page.status == 200 and b'name="csrf-token"' in page.body
