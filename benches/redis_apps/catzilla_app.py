"""No-op tasks on catzilla with Redis storage, for benches/bench_redis.py.

``app`` enqueues only (``workers=0``); the worker process runs
``python -m catzilla worker catzilla_app:app --workers 4``, which gives the same
``app`` its workers. The task is a module-level function, importable by name
as shared mode needs.
"""

from __future__ import annotations

import os

from catzilla.background_tasks import BackgroundTasks
from tally import HOST, task_done

app = BackgroundTasks(
    storage=f"redis://{HOST}:{os.environ['BENCH_REDIS_PORT']}/0",
    workers=0,
    enable_auto_scaling=False,
    queue_size=1_000_000,  # the producer queues a whole batch before any completes
)


def noop() -> None:
    task_done()


class Producer:
    def enqueue(self, k: int) -> None:
        for _ in range(k):
            app.add_task(noop)

    def close(self) -> None:
        app.shutdown(timeout=10)
