"""No-op tasks on RQ, for benches/bench_redis.py.

Worker: ``rq worker-pool --num-workers 4 --worker-class rq.worker.SimpleWorker``.
Results are not kept (``result_ttl=0``).
"""

from __future__ import annotations

import os

from redis import Redis
from rq import Queue
from tally import HOST, task_done


def noop() -> None:
    task_done()


class Producer:
    def __init__(self) -> None:
        self.redis = Redis(host=HOST, port=int(os.environ["BENCH_REDIS_PORT"]))
        self.queue = Queue(connection=self.redis)

    def enqueue(self, k: int) -> None:
        for _ in range(k):
            self.queue.enqueue(noop, result_ttl=0)

    def close(self) -> None:
        self.redis.close()
