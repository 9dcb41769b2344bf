"""No-op tasks on Dramatiq's RedisBroker, for benches/bench_redis.py.

Worker: ``dramatiq dramatiq_app --processes 1 --threads 4``. No Results middleware.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from tally import HOST, task_done

broker = RedisBroker(host=HOST, port=int(os.environ["BENCH_REDIS_PORT"]))
dramatiq.set_broker(broker)


@dramatiq.actor
def noop() -> None:
    task_done()


class Producer:
    def enqueue(self, k: int) -> None:
        for _ in range(k):
            noop.send()

    def close(self) -> None:
        broker.close()
