"""The app that tests/test_dashboard_browser.py serves in a subprocess: the
dashboard (token ``browser-test-token``) over a steady flow of tasks.

Run as ``python -c "import dashboard_app; dashboard_app.main(PORT)"`` from
tests/ (imported, so that the tasks are named ``dashboard_app.*``, not
``__main__.*``), or as ``python tests/dashboard_app.py [PORT]``. Every 0.2 s
a producer queues two short tasks, and every 5 s one that fails;
``build_report`` runs every 1.5 s for about 1.2 s, reporting progress.
``flaky("order-17")`` is queued once, without retries: it fails, and succeeds
when the dashboard's Retry queues it again. ``GET /test/state`` returns the
engine's stats and the keys ``flaky`` succeeded for; ``GET /test/task/{id}``
the state of one task.
"""

from __future__ import annotations

import itertools
import random
import sys
import threading
import time
from typing import Any

from catzilla import Catzilla, HTTPError, Request
from catzilla.background_tasks import current_task

TOKEN = "browser-test-token"
FLAKY_KEY = "order-17"

app = Catzilla()
app.enable_background_tasks(workers=3, max_workers=3, enable_auto_scaling=False)
app.enable_dashboard(token=TOKEN)

_lock = threading.Lock()
_seen: set[str] = set()
_succeeded: set[str] = set()
_ticks = itertools.count()


def flaky(key: str) -> str:
    """Fails the first time it runs for ``key``, succeeds every time after."""
    with _lock:
        first = key not in _seen
        _seen.add(key)
    if first:
        raise ValueError("first attempt fails")
    with _lock:
        _succeeded.add(key)
    return key


def resize_image(n: int) -> int:
    time.sleep(random.uniform(0.02, 0.05))
    return n


def send_email(n: int) -> None:
    time.sleep(0.01)
    raise ConnectionError(f"SMTP server refused message {n}")


@app.periodic(every=0.2)
def produce() -> None:
    n = next(_ticks)
    for i in range(2):
        app.add_task(resize_image, 2 * n + i)
    if n % 25 == 24:
        app.add_task(send_email, n, max_retries=0)


@app.periodic(every=1.5)
def build_report() -> None:
    task = current_task()
    steps = ["fetch", "aggregate", "render"]
    for i in range(12):
        time.sleep(0.1)
        task.set_progress((i + 1) * 100 / 12, steps[i * len(steps) // 12])


@app.get("/test/state")
def state(request: Request) -> dict[str, Any]:
    with _lock:
        succeeded = sorted(_succeeded)
    return {"stats": app.get_task_stats().to_dict(), "flaky_succeeded": succeeded}


@app.get("/test/task/{task_id}")
def task_state(request: Request, task_id: str) -> dict[str, Any]:
    info = app.get_task(task_id)
    if info is None:
        raise HTTPError(404, f"no task {task_id}")
    return info.to_dict()


def main(port: int) -> None:
    app.add_task(flaky, FLAKY_KEY, max_retries=0)
    app.listen(port=port)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
