"""How every side of benches/bench_redis.py reports that its tasks are done, and
a minimal Redis client (the RESP protocol on a socket, standard library only)
for that and for the bench itself.

The same for every side, so that it costs each the same: a task INCRs the
counter ``COUNT_KEY``; the task that brings it to ``TARGET`` RPUSHes to
``DONE_KEY``. Before a batch of ``k`` tasks the producer SETs the counter to
``TARGET - k`` and then waits in BLPOP on ``DONE_KEY``: no polling, and the
wait ends one round trip after the last task finished. A sync task calls
``task_done()``, which keeps one connection per thread (and per process, so a
forked child never shares its parent's socket). The Redis port comes from the
environment variable ``BENCH_REDIS_PORT``.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

HOST = "127.0.0.1"
COUNT_KEY = "bench:count"
DONE_KEY = "bench:done"
TARGET = 1_000_000_000


class RedisError(Exception):
    """Redis answered with an error, or something that is not RESP."""


class Redis:
    """One connection; ``call`` sends a command and reads its reply."""

    def __init__(self, port: int, host: str = HOST, timeout: float | None = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")

    def call(self, *args: Any) -> Any:
        out = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self.sock.sendall(b"".join(out))
        return self._reply()

    def _reply(self) -> Any:
        line = self.reader.readline()
        if not line.endswith(b"\r\n"):
            raise RedisError(f"connection closed or bad reply: {line!r}")
        kind, body = line[:1], line[1:-2]
        if kind == b"+":
            return body.decode()
        if kind == b"-":
            raise RedisError(body.decode())
        if kind == b":":
            return int(body)
        if kind == b"$":
            size = int(body)
            return None if size < 0 else self.reader.read(size + 2)[:-2]
        if kind == b"*":
            size = int(body)
            return None if size < 0 else [self._reply() for _ in range(size)]
        raise RedisError(f"bad reply: {line!r}")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


_local = threading.local()


def _connection() -> Redis:
    pid = os.getpid()
    if getattr(_local, "pid", None) != pid:
        _local.redis = Redis(int(os.environ["BENCH_REDIS_PORT"]))
        _local.pid = pid
    redis: Redis = _local.redis
    return redis


def task_done() -> None:
    """What every no-op task does: count itself; the last one says so."""
    redis = _connection()
    if redis.call("INCR", COUNT_KEY) == TARGET:
        redis.call("RPUSH", DONE_KEY, 1)
