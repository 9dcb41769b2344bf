"""The project's own examples, served in a subprocess and called over HTTP."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from conftest import DEADLINE, ServerProcess, wait_until

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def call(base: str, path: str, method: str = "GET") -> tuple[int, Any]:
    req = urllib.request.Request(base + path, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=DEADLINE) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_health_monitor_runs_its_periodic_check(spawn):
    p: ServerProcess = spawn([str(EXAMPLES / "health_monitor_app.py"), "0"])
    host, port = p.wait_serving()
    base = f"http://{host}:{port}"
    status, body = call(base, "/monitoring")
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
            (r := call(base, "/health/latest"))[0] == 200
            and r[1]["status"] in ("completed", "failed", "cancelled")
            and r
        ),
        timeout=30,
        what="the first health reading",
    )
    assert latest["status"] == "completed", latest
    assert 0 <= latest["result"]["memory_percent"] <= 100
    p.wait_for("System health - CPU:")
    status, paused = call(base, "/monitoring/pause", "POST")
    assert status == 200 and paused["paused"] is True
    status, resumed = call(base, "/monitoring/resume", "POST")
    assert status == 200 and resumed["paused"] is False and resumed["runs"] >= 1
    assert p.stop() == 0
