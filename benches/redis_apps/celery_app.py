"""No-op tasks on Celery with its Redis broker, for benches/bench_redis.py.

Worker: ``celery -A celery_app worker --pool prefork --concurrency 4`` (see the
bench's docstring for the other options). No result backend; ignore_result.
"""

from __future__ import annotations

import os

from celery import Celery
from tally import HOST, task_done

app = Celery("bench", broker=f"redis://{HOST}:{os.environ['BENCH_REDIS_PORT']}/0")
app.conf.update(
    task_ignore_result=True,
    result_backend=None,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(ignore_result=True)
def noop() -> None:
    task_done()


class Producer:
    def enqueue(self, k: int) -> None:
        for _ in range(k):
            noop.delay()

    def close(self) -> None:
        app.close()
