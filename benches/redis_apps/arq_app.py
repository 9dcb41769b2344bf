"""No-op tasks on arq, for benches/bench_redis.py.

Worker: ``arq arq_app.WorkerSettings``. The task is a coroutine, as arq's must
be, and counts itself with arq's own async Redis client (``ctx["redis"]``)
rather than block the event loop on a sync socket. Results are not kept
(``keep_result=0``).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings
from tally import COUNT_KEY, DONE_KEY, HOST, TARGET

REDIS = RedisSettings(host=HOST, port=int(os.environ["BENCH_REDIS_PORT"]))


async def noop(ctx: dict[str, Any]) -> None:
    redis = ctx["redis"]
    if await redis.incr(COUNT_KEY) == TARGET:
        await redis.rpush(DONE_KEY, 1)


class WorkerSettings:
    functions = [noop]
    redis_settings = REDIS
    keep_result = 0
    max_jobs = 10  # its default; 4 and 50 were no faster here
    # Its default of 0.5 s held a worker to about 200 no-op jobs/s here: the
    # worker sleeps out the rest of each poll interval.
    poll_delay = 0.01


class Producer:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool = self.loop.run_until_complete(create_pool(REDIS))

    async def _enqueue(self, k: int) -> None:
        for _ in range(k):
            await self.pool.enqueue_job("noop")

    def enqueue(self, k: int) -> None:
        self.loop.run_until_complete(self._enqueue(k))

    def close(self) -> None:
        self.loop.run_until_complete(self.pool.aclose())
        self.loop.close()
