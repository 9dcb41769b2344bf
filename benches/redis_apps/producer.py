"""The one producer process of a side of benches/bench_redis.py.

    python producer.py MODULE TASKS ROUNDS WARMUP TIMEOUT

Imports ``MODULE`` (a ``*_app`` module here) and uses its ``Producer``: first
WARMUP tasks, untimed, which also waits for the worker to be up; then ROUNDS
batches of TASKS tasks, each timed from the first enqueue to the last
completion (see ``tally``) and printed as ``SECONDS <end to end> <enqueueing>``.
A batch that does not finish within TIMEOUT seconds fails, and so does a task
that ran more than once.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

from tally import COUNT_KEY, DONE_KEY, TARGET, Redis


class BatchError(Exception):
    """A batch did not complete exactly once within its deadline."""


def check_count(redis: Redis) -> None:
    count = int(redis.call("GET", COUNT_KEY) or TARGET)
    if count != TARGET:
        raise BatchError(f"{count - TARGET} task(s) ran more than once")


def batch(redis: Redis, producer: object, k: int, timeout: float) -> tuple[float, float]:
    check_count(redis)
    redis.call("DEL", DONE_KEY)
    redis.call("SET", COUNT_KEY, TARGET - k)
    start = time.perf_counter()
    producer.enqueue(k)  # type: ignore[attr-defined]
    enqueued = time.perf_counter()
    deadline = start + timeout
    while True:
        wait = min(1.0, deadline - time.perf_counter())
        if wait > 0.001 and redis.call("BLPOP", DONE_KEY, f"{wait:.3f}"):  # 0 would block for ever
            break
        if time.perf_counter() >= deadline:
            left = TARGET - int(redis.call("GET", COUNT_KEY))
            raise BatchError(f"{left} of {k} tasks not done {timeout:g} s after the first enqueue")
    return time.perf_counter() - start, enqueued - start


def main() -> int:
    module_name, tasks, rounds, warmup, timeout = sys.argv[1:6]
    redis = Redis(int(os.environ["BENCH_REDIS_PORT"]))
    producer = importlib.import_module(module_name).Producer()
    try:
        batch(redis, producer, int(warmup), float(timeout))
        for _ in range(int(rounds)):
            took, enqueueing = batch(redis, producer, int(tasks), float(timeout))
            print(f"SECONDS {took} {enqueueing}", flush=True)
        time.sleep(0.2)  # a task run twice would count itself late
        check_count(redis)
    except BatchError as exc:
        print(f"FAILED {exc}", flush=True)
        return 1
    finally:
        producer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
