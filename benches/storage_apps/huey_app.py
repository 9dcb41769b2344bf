"""No-op tasks on Huey's SqliteHuey, for benches/bench_storage.py.

The consumer runs as ``huey_consumer huey_app.huey -w 4 -k thread``; the
producer enqueues and waits on the results. The database path comes from
the HUEY_DB environment variable.
"""

from __future__ import annotations

import os

from huey import SqliteHuey

# store_none: keep the None results too, as catzilla does, so the producer can wait on them.
huey = SqliteHuey(filename=os.environ["HUEY_DB"], store_none=True)


@huey.task()
def noop() -> None:
    return None
