"""Prometheus metrics (``app.enable_metrics()``, ``catzilla.metrics.collector``):
apps served in this process, their ``/metrics`` scraped and parsed with
prometheus_client's own parser after a known workload."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from catzilla import Catzilla
from catzilla.background_tasks import TaskPriority, TaskResult, TaskStatus, TaskTimeoutError
from catzilla.metrics import TASK_BUCKETS, collector
from helpers import DEADLINE, Blocker, Client, wait_until
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

COUNTERS = {  # counter name -> the EngineStats field its series add up to
    "catzilla_tasks_submitted_total": "total_tasks_submitted",
    "catzilla_tasks_completed_total": "total_tasks_processed",
    "catzilla_tasks_failed_total": "failed_tasks",
    "catzilla_tasks_retried_total": "retry_count",
    "catzilla_tasks_timed_out_total": "timeout_count",
    "catzilla_tasks_cancelled_total": "cancelled_tasks",
}


def parse(text: str) -> Samples:
    """Every sample of an exposition, by name and labels."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def scrape(client: Client, path: str = "/metrics") -> tuple[str, Samples]:
    r = client.get(path)
    assert r.status == 200, r.body
    assert (r.header("content-type") or "").startswith("text/plain"), r.headers
    text = r.body.decode()
    return text, parse(text)


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def task_labels(func: Callable[..., Any], priority: str = "normal") -> dict[str, str]:
    return {
        "task": f"{func.__module__}.{func.__qualname__}",
        "priority": priority,
        "queue": "default",
    }


# Task bodies (module level, so that their names are stable)


def ok(n: int) -> int:
    return n * 2


def bad(n: int) -> None:
    raise ValueError(f"bad {n}")


def always_fails() -> None:
    raise ValueError("always")


def too_slow() -> None:
    for _ in range(1000):  # interruptible: the timeout lands between short sleeps
        time.sleep(0.01)


def nap() -> str:
    time.sleep(0.05)
    return "rested"


def never() -> None:
    raise AssertionError("a cancelled task ran")


def make_app(**engine: Any) -> Catzilla:
    app = Catzilla()
    engine = {"workers": 4, "max_workers": 4, "enable_auto_scaling": False} | engine
    app.enable_background_tasks(retry_backoff_ms=1, retry_backoff_cap_ms=5, **engine)
    app.enable_metrics()
    return app


def finish(handle: TaskResult, error: type[BaseException] | None = None) -> Any:
    if error is None:
        return handle.wait(DEADLINE)
    with pytest.raises(error):
        handle.wait(DEADLINE)
    return None


def test_task_counters_and_histograms_after_a_known_workload(serve_app):
    app = make_app()
    client = serve_app(app)
    N, H, M = 5, 3, 4
    handles = [(app.add_task(ok, i), None) for i in range(N)]
    handles += [(app.add_task(ok, i, priority=TaskPriority.HIGH), None) for i in range(H)]
    handles += [(app.add_task(bad, i, max_retries=0), ValueError) for i in range(M)]
    handles.append((app.add_task(always_fails, max_retries=2), ValueError))
    handles.append((app.add_task(too_slow, timeout_ms=50, max_retries=0), TaskTimeoutError))
    handles.append((app.add_task(nap), None))
    cancelled = app.add_task(never, delay_ms=600_000)
    assert cancelled.cancel() is True
    for handle, error in handles:
        finish(handle, error)
    assert cancelled.status is TaskStatus.CANCELLED
    assert handles[-2][0].attempts == 1 and handles[M + N + H][0].attempts == 3

    expected = {  # (function, priority) -> counts
        (ok, "normal"): dict(submitted=N, completed=N, started=N, attempts=N),
        (ok, "high"): dict(submitted=H, completed=H, started=H, attempts=H),
        (bad, "normal"): dict(submitted=M, failed=M, started=M, attempts=M),
        (always_fails, "normal"): dict(submitted=1, failed=1, retried=2, started=1, attempts=3),
        (too_slow, "normal"): dict(submitted=1, failed=1, timed_out=1, started=1, attempts=1),
        (nap, "normal"): dict(submitted=1, completed=1, started=1, attempts=1),
        (never, "normal"): dict(submitted=1, cancelled=1, started=0, attempts=0),
    }
    done = sum(e.get(k, 0) for e in expected.values() for k in ("completed", "failed", "cancelled"))

    def settled() -> Samples | None:
        s = app.get_task_stats()  # the engine first: quiet then stays quiet for the scrape
        engine_done = s.total_tasks_processed + s.failed_tasks + s.cancelled_tasks
        quiet = engine_done == done and s.running_tasks == s.active_workers == 0
        _, samples = scrape(client)
        counted = sum(
            sum(series(samples, f"catzilla_tasks_{k}_total").values())
            for k in ("completed", "failed", "cancelled")
        )
        return samples if quiet and counted == done else None

    samples = wait_until(settled, what="every finished task to be counted")
    stats = app.get_task_stats()

    for (func, lane), want in expected.items():
        labels = task_labels(func, lane)
        for kind in ("submitted", "completed", "failed", "retried", "timed_out", "cancelled"):
            got = value(samples, f"catzilla_tasks_{kind}_total", **labels)
            assert got == want.get(kind, 0), (func.__name__, lane, kind, got)
        count = value(samples, "catzilla_task_duration_seconds_count", **labels)
        assert count == want["attempts"], (func.__name__, lane)
        buckets = [
            value(samples, "catzilla_task_duration_seconds_bucket", le=repr(b), **labels)
            for b in TASK_BUCKETS
        ]
        inf = value(samples, "catzilla_task_duration_seconds_bucket", le="+Inf", **labels)
        assert inf == count
        assert None not in buckets and [*buckets, inf] == sorted([*buckets, inf]), buckets
        assert value(samples, "catzilla_task_wait_seconds_count", **labels) == want["started"]
        waits = value(samples, "catzilla_task_wait_seconds_bucket", le="+Inf", **labels)
        assert waits == want["started"]
    # No series for an unused (task, priority) pair.
    assert value(samples, "catzilla_tasks_submitted_total", **task_labels(bad, "high")) is None

    napped = task_labels(nap)
    assert value(samples, "catzilla_task_duration_seconds_bucket", le="0.025", **napped) == 0
    assert value(samples, "catzilla_task_duration_seconds_sum", **napped) >= 0.05
    assert 0.04 <= value(samples, "catzilla_task_duration_seconds_sum", **task_labels(too_slow)) < 5

    # Every counter's series add up to the engine's own statistic.
    for name, field in COUNTERS.items():
        assert sum(series(samples, name).values()) == getattr(stats, field), name
    assert stats.total_tasks_submitted == 16 and stats.total_tasks_processed == N + H + 1
    assert (stats.failed_tasks, stats.retry_count, stats.timeout_count) == (M + 2, 2, 1)
    assert stats.cancelled_tasks == 1

    # Quiet now: nothing queued or running, every worker idle.
    for lane in ("critical", "high", "normal", "low", "scheduled"):
        assert value(samples, "catzilla_queue_depth", lane=lane) == 0, lane
    assert value(samples, "catzilla_tasks_running") == 0
    assert value(samples, "catzilla_workers", state="busy") == 0
    idle = value(samples, "catzilla_workers", state="idle")
    assert idle == stats.idle_workers == stats.total_workers == 4

    # A registry of one's own, with collector(app), reads the same task counters.
    registry = CollectorRegistry()
    registry.register(collector(app))
    own = parse(generate_latest(registry).decode())
    for name in COUNTERS:
        assert series(own, name) == series(samples, name), name
    assert series(own, "catzilla_task_duration_seconds_count") == series(
        samples, "catzilla_task_duration_seconds_count"
    )


def test_gauges_follow_queue_depth_running_tasks_and_workers(serve_app, blocker: Blocker):
    app = make_app(workers=1, max_workers=1, min_workers=1)
    client = serve_app(app)
    held = app.add_task(blocker, "held")
    blocker.wait_started()
    queued = [app.add_task(ok, i) for i in range(2)]
    queued.append(app.add_task(ok, 9, priority=TaskPriority.HIGH))
    queued.append(app.add_task(ok, 8, priority=TaskPriority.LOW))
    delayed = app.add_task(never, delay_ms=600_000)
    _, samples = scrape(client)
    stats = app.get_task_stats()
    depths = {
        lane: value(samples, "catzilla_queue_depth", lane=lane)
        for lane in ("critical", "high", "normal", "low", "scheduled")
    }
    assert depths == {"critical": 0, "high": 1, "normal": 2, "low": 1, "scheduled": 1}
    assert (stats.high_queue_size, stats.normal_queue_size, stats.scheduled_tasks) == (1, 2, 1)
    assert value(samples, "catzilla_tasks_running") == stats.running_tasks == 1
    assert value(samples, "catzilla_workers", state="busy") == 1
    assert value(samples, "catzilla_workers", state="idle") == 0
    assert value(samples, "catzilla_queue_waiting", queue="default") == stats.total_queued

    blocker.release()
    assert held.wait(DEADLINE) == "held"
    assert [h.wait(DEADLINE) for h in queued] == [0, 2, 18, 16]
    assert delayed.cancel() is True

    def quiet() -> Samples | None:
        _, samples = scrape(client)
        return samples if value(samples, "catzilla_workers", state="idle") == 1 else None

    samples = wait_until(quiet, what="the worker to be idle")
    assert all(v == 0 for v in series(samples, "catzilla_queue_depth").values()), samples
    assert value(samples, "catzilla_tasks_running") == 0
    assert value(samples, "catzilla_workers", state="busy") == 0


def test_http_requests_are_counted_by_route_template_method_and_status(serve_app):
    app = Catzilla()
    app.enable_metrics()

    @app.get("/items/{item_id}")
    def item(item_id: str) -> dict:
        return {"id": item_id}

    @app.get("/boom")
    def boom() -> dict:
        raise RuntimeError("kaput")

    client = serve_app(app)
    ids = ["zq8731x", "zq4410x", "zq5002x", "zq7777x"]
    for i in ids:
        assert client.get(f"/items/{i}").json() == {"id": i}
    assert client.get("/no/such/place-zq5521x").status == 404
    assert client.get("/boom").status == 500
    assert client.get("/boom").status == 500

    text, samples = scrape(client)
    assert "process_cpu_seconds_total" in text  # the standard process metrics too
    for raw in [*ids, "zq5521x", "place"]:
        assert raw not in text, f"a raw path leaked into the labels: {raw}"
    requests = series(samples, "catzilla_http_requests_total")
    assert requests == {
        frozenset({"route": "/items/{item_id}", "method": "GET", "status": "200"}.items()): 4,
        frozenset({"route": "(unmatched)", "method": "GET", "status": "404"}.items()): 1,
        frozenset({"route": "/boom", "method": "GET", "status": "500"}.items()): 2,
    }, requests  # the scrape answering now is not counted yet
    for route, n in (("/items/{item_id}", 4), ("(unmatched)", 1), ("/boom", 2)):
        labels = {"route": route, "method": "GET"}
        assert value(samples, "catzilla_http_request_duration_seconds_count", **labels) == n
        inf = value(samples, "catzilla_http_request_duration_seconds_bucket", le="+Inf", **labels)
        assert inf == n
        assert value(samples, "catzilla_http_request_duration_seconds_sum", **labels) > 0

    # The first scrape is counted by the second.
    _, samples = scrape(client)
    scraped = {"route": "/metrics", "method": "GET"}
    assert value(samples, "catzilla_http_requests_total", status="200", **scraped) == 1
    assert value(samples, "catzilla_http_request_duration_seconds_count", **scraped) == 1
    assert (
        value(
            samples,
            "catzilla_http_requests_total",
            route="/items/{item_id}",
            method="GET",
            status="200",
        )
        == 4
    )


def test_metrics_path_is_configurable_and_works_without_an_engine(serve_app):
    app = Catzilla()
    app.enable_metrics("/internal/prom", process_metrics=False)
    client = serve_app(app)
    text, samples = scrape(client, "/internal/prom")
    assert "process_" not in text and "python_info" not in text
    assert not any(name.startswith("catzilla_task") for name, _ in samples)
    assert client.get("/metrics").status == 404


def test_without_enable_metrics_there_is_no_metrics_route(serve_app):
    app = Catzilla()
    app.enable_background_tasks(workers=1)
    app.get("/ping")(lambda: {"pong": True})
    client = serve_app(app)
    assert client.get("/ping").json() == {"pong": True}
    assert client.get("/metrics").status == 404
