"""Enqueues N no-op tasks on SqliteHuey and waits for every result; prints the seconds."""

from __future__ import annotations

import sys
import time

from huey_app import noop

n = int(sys.argv[1])
start = time.perf_counter()
results = [noop() for _ in range(n)]
for r in results:
    r.get(blocking=True, timeout=300)
print(f"SECONDS {time.perf_counter() - start}", flush=True)
