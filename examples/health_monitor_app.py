"""The doc's system-health monitor, done with periodic tasks instead of
"schedule multiple instances or use external schedulers".

python examples/health_monitor_app.py          # or: ... health_monitor_app.py PORT
curl localhost:8000/monitoring                 # the schedules and their runs
curl localhost:8000/health/latest              # the newest health reading
curl -X POST localhost:8000/monitoring/pause   # and /monitoring/resume
"""

from __future__ import annotations

import os
import sys
from datetime import datetime
from typing import Any

from catzilla import Catzilla, HTTPError, PeriodicTask, Request

app = Catzilla()
app.enable_background_tasks(workers=4)

HEALTH_EVERY_SECONDS = 5.0


def _memory_percent() -> float:
    """Share of memory in use, from /proc/meminfo (Linux)."""
    fields: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            fields[key] = int(value.split()[0])
    total, available = fields["MemTotal"], fields["MemAvailable"]
    return round(100.0 * (total - available) / total, 1)


@app.periodic(every=HEALTH_EVERY_SECONDS, name="system-health", max_retries=0)
def check_system_health() -> dict[str, Any]:
    """Reads the load and memory use of this machine."""
    load_1m = os.getloadavg()[0]
    cpu_percent = round(100.0 * load_1m / (os.cpu_count() or 1), 1)
    memory_percent = _memory_percent()
    print(f"System health - CPU: {cpu_percent}%, Memory: {memory_percent}%", flush=True)
    return {
        "cpu_percent": cpu_percent,
        "memory_percent": memory_percent,
        "timestamp": datetime.now().isoformat(),
    }


@app.periodic(cron="0 3 * * *", name="nightly-report")
def nightly_report() -> str:
    """Once a day at 03:00 UTC."""
    return "report sent"


def _describe(p: PeriodicTask) -> dict[str, Any]:
    return {
        "name": p.name,
        "schedule": p.schedule,
        "next_run_at": p.next_run_at,
        "last_run_at": p.last_run_at,
        "last_result_id": p.last_result_id,
        "runs": p.runs,
        "failures": p.failures,
        "skipped": p.skipped,
        "paused": p.is_paused,
    }


def _health_task() -> PeriodicTask:
    for p in app.list_periodic_tasks():
        if p.name == "system-health":
            return p
    raise HTTPError(404, "the health check is not scheduled")


@app.get("/monitoring")
def monitoring(request: Request) -> dict[str, Any]:
    return {"periodic_tasks": [_describe(p) for p in app.list_periodic_tasks()]}


@app.post("/monitoring/pause")
def pause(request: Request) -> dict[str, Any]:
    task = _health_task()
    task.pause()
    return _describe(task)


@app.post("/monitoring/resume")
def resume(request: Request) -> dict[str, Any]:
    task = _health_task()
    task.resume()
    return _describe(task)


@app.get("/health/latest")
def latest(request: Request) -> dict[str, Any]:
    task_id = _health_task().last_result_id
    info = app.get_task(task_id) if task_id else None
    if info is None:
        raise HTTPError(
            404, f"no reading yet; the first comes {HEALTH_EVERY_SECONDS} s after start"
        )
    return info.to_dict()


if __name__ == "__main__":
    print("Starting the system health monitor...")
    app.listen(port=int(sys.argv[1]) if len(sys.argv) > 1 else 8000)
