"""A tour of catzilla's background task engine, without a web server.

    python examples/task_engine_tour.py

It queues e-mails, reports and flaky calls with priorities, delays, retries,
timeouts and coroutines, waits for them, and prints the engine's statistics.
"""

from __future__ import annotations

import asyncio
import random
import time

from catzilla import Catzilla, TaskPriority
from catzilla.background_tasks import NonRetryableError, TaskTimeoutError

app = Catzilla()
app.enable_background_tasks(workers=4, enable_profiling=True, retry_backoff_ms=20)


def send_email(to: str, subject: str) -> str:
    time.sleep(0.05)  # the SMTP round trip
    return f"sent {subject!r} to {to}"


@app.task(priority=TaskPriority.LOW, max_retries=5)
def build_report(rows: int) -> dict[str, int]:
    return {"rows": rows, "total": sum(range(rows))}


attempts = 0


def flaky_service() -> str:
    global attempts
    attempts += 1
    if attempts < 3:
        raise ConnectionError(f"service unavailable (attempt {attempts})")
    return f"answered on attempt {attempts}"


def validate(payload: str) -> str:
    raise NonRetryableError(f"cannot process {payload!r}: malformed")


def stuck() -> None:
    while True:
        time.sleep(0.01)


async def fetch(page: int) -> str:
    await asyncio.sleep(random.uniform(0.05, 0.2))
    return f"page {page}"


def main() -> None:
    emails = [
        app.add_task(send_email, f"user{i}@example.com", "Welcome", priority=TaskPriority.HIGH)
        for i in range(5)
    ]
    report = app.add_task(build_report, 100_000)
    reminder = app.add_task(send_email, "boss@example.com", "Reminder", delay_ms=300)
    flaky = app.add_task(flaky_service, max_retries=3)
    invalid = app.add_task(validate, "{oops")
    timed = app.add_task(stuck, timeout_ms=200, max_retries=0)
    pages = [app.add_task(fetch, n) for n in range(20)]

    for handle in emails:
        print("email:", handle.wait(10))
    print("report:", report.wait(10))
    print("reminder:", reminder.wait(10))
    print("flaky:", flaky.wait(10), f"(errors before success: {len(flaky.errors)})")
    try:
        invalid.wait(10)
    except NonRetryableError as exc:
        print("invalid:", exc, f"(attempts: {invalid.attempts})")
    try:
        timed.wait(10)
    except TaskTimeoutError as exc:
        print("timed out:", exc)
    print("pages:", [p.wait(10) for p in pages][:3], "...")

    stats = app.get_task_stats()
    print(
        f"stats: processed={stats.total_tasks_processed} failed={stats.failed_tasks} "
        f"retries={stats.retry_count} timeouts={stats.timeout_count} "
        f"p95={stats.p95_execution_time_ms:.1f} ms workers={stats.total_workers}"
    )
    assert app.tasks is not None
    print("shutdown:", app.tasks.shutdown(timeout=5))


if __name__ == "__main__":
    main()
