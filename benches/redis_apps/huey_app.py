"""No-op tasks on Huey's RedisHuey, for benches/bench_redis.py.

Consumer: ``huey_consumer huey_app.huey -w 4 -k thread``. A task that returns
None stores no result (Huey's default, store_none=False).
"""

from __future__ import annotations

import os

from huey import RedisHuey
from tally import HOST, task_done

huey = RedisHuey("bench", host=HOST, port=int(os.environ["BENCH_REDIS_PORT"]))


@huey.task()
def noop() -> None:
    task_done()


class Producer:
    def enqueue(self, k: int) -> None:
        for _ in range(k):
            noop()

    def close(self) -> None:
        pass
