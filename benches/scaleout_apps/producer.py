"""The producer of benches/bench_scaleout.py.

    python producer.py TASKS ITERATIONS PROCESSES ROUNDS TIMEOUT

Waits until each of the PROCESSES worker processes has run a task (untimed),
then, ROUNDS times, enqueues TASKS ``spin(ITERATIONS)`` tasks and waits for
every result, timed from the first enqueue to the last completion. Prints
``SECONDS <s> <split>`` for each round (split: tasks run by each process, as
``120/80``), then its own CPU time as ``CPU <s>``. Exits 1 if something is not
done within TIMEOUT seconds.
"""

from __future__ import annotations

import resource
import sys
import time

from cpu_work import spin, whoami
from scaleout_app import app


def main() -> int:
    tasks, iterations, processes, rounds = (int(arg) for arg in sys.argv[1:5])
    timeout = float(sys.argv[5])
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + timeout
        while len(seen) < processes:  # every worker process is up and taking tasks
            if time.monotonic() >= deadline:
                raise TimeoutError
            handles = [app.add_task(whoami, 0.05) for _ in range(2 * processes)]
            seen.update(h.wait(max(0.0, deadline - time.monotonic())) for h in handles)
        for _ in range(rounds):
            start = time.perf_counter()
            handles = [app.add_task(spin, iterations) for _ in range(tasks)]
            pids = [h.wait(max(0.0, timeout - (time.perf_counter() - start))) for h in handles]
            split = "/".join(str(pids.count(pid)) for pid in sorted(set(pids)))
            print(f"SECONDS {time.perf_counter() - start} {split}", flush=True)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        print(f"CPU {usage.ru_utime + usage.ru_stime}", flush=True)
    except TimeoutError:
        if len(seen) < processes:
            print(
                f"FAILED {len(seen)} of {processes} worker processes took a task in {timeout:g} s"
            )
        else:
            print(f"FAILED the tasks were not done within {timeout:g} s")
        return 1
    finally:
        app.shutdown(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
