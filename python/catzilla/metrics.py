"""Prometheus metrics of an app: its tasks (by name, priority and queue), its
queue depths and workers, and its HTTP requests (by route template, method
and status).

``app.enable_metrics()`` serves them at ``/metrics``; ``collector(app)`` is
the same data as a ``prometheus_client`` collector, for apps that already
keep a registry of their own::

    from prometheus_client import REGISTRY
    REGISTRY.register(catzilla.metrics.collector(app))

Values are read from the engine and server at scrape time: collecting costs
the app nothing between scrapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import _catzilla as _native
from .enums import TaskPriority

if TYPE_CHECKING:
    from .app import Catzilla
    from .background_tasks import BackgroundTasks, EngineStats

__all__ = ["CONTENT_TYPE_LATEST", "TASK_BUCKETS", "HTTP_BUCKETS", "collector", "render"]

#: Bucket bounds (seconds) of the task duration and wait histograms, and of
#: the HTTP latency histogram (fixed in the native core, which counts them).
TASK_BUCKETS: tuple[float, ...] = tuple(_native.TASK_BUCKETS)
HTTP_BUCKETS: tuple[float, ...] = tuple(_native.HTTP_BUCKETS)

_LANES = tuple(p.name.lower() for p in TaskPriority)

#: Counter name suffix and help text for each counted task event.
_TASK_COUNTERS = (
    ("submitted", "submitted", "Tasks queued"),
    ("succeeded", "completed", "Tasks that finished with a result"),
    ("failed", "failed", "Tasks that failed after their last attempt"),
    ("retrying", "retried", "Failed attempts that were retried"),
    ("timed_out", "timed_out", "Attempts stopped by their timeout"),
    ("cancelled", "cancelled", "Tasks cancelled before they finished"),
)
_TASK_LABELS = ("task", "priority", "queue")


def _buckets(bounds: tuple[float, ...], counts: list[int], total: int) -> list[tuple[str, float]]:
    out = [(repr(float(b)), float(c)) for b, c in zip(bounds, counts, strict=True)]
    out.append(("+Inf", float(total)))
    return out


class CatzillaCollector(Collector):
    """Reads an app's engine and server each time it is collected."""

    def __init__(self, app: Catzilla) -> None:
        self._app = app
        app._observe()

    def collect(self) -> Iterator[Metric]:
        yield from self._tasks()
        yield from self._http()

    def _tasks(self) -> Iterator[Metric]:
        engine = self._app.tasks
        if engine is None or engine.is_forked:
            return
        counters = {
            event: CounterMetricFamily(f"catzilla_tasks_{name}", doc, labels=_TASK_LABELS)
            for event, name, doc in _TASK_COUNTERS
        }
        duration = HistogramMetricFamily(
            "catzilla_task_duration_seconds", "How long task attempts ran", labels=_TASK_LABELS
        )
        wait = HistogramMetricFamily(
            "catzilla_task_wait_seconds",
            "How long tasks waited from being queued to their first start",
            labels=_TASK_LABELS,
        )
        for name, lane, queue, counts, ran, waited in engine._series():
            labels = [name, _LANES[lane], queue]
            for event, family in counters.items():
                family.add_metric(labels, counts[event])
            duration.add_metric(labels, _buckets(TASK_BUCKETS, ran[0], ran[1]), ran[2])
            wait.add_metric(labels, _buckets(TASK_BUCKETS, waited[0], waited[1]), waited[2])
        yield from counters.values()
        yield duration
        yield wait
        stats = engine.get_stats()
        depth = GaugeMetricFamily(
            "catzilla_queue_depth", "Tasks waiting, by priority lane", labels=["lane"]
        )
        for lane_name in _LANES:
            depth.add_metric([lane_name], getattr(stats, f"{lane_name}_queue_size"))
        depth.add_metric(["scheduled"], stats.scheduled_tasks)
        yield depth
        waiting = GaugeMetricFamily(
            "catzilla_queue_waiting",
            "Tasks waiting (ready or delayed), by named queue",
            labels=["queue"],
        )
        for queue, n in queue_depths(engine, stats).items():
            waiting.add_metric([queue], n)
        yield waiting
        yield GaugeMetricFamily(
            "catzilla_tasks_running", "Tasks running now", value=stats.running_tasks
        )
        workers = GaugeMetricFamily("catzilla_workers", "Worker threads", labels=["state"])
        workers.add_metric(["busy"], stats.active_workers)
        workers.add_metric(["idle"], stats.idle_workers)
        yield workers

    def _http(self) -> Iterator[Metric]:
        server = self._app._server
        if server is None:
            return
        requests = CounterMetricFamily(
            "catzilla_http_requests",
            "HTTP requests answered, by route template, method and status",
            labels=["route", "method", "status"],
        )
        latency = HistogramMetricFamily(
            "catzilla_http_request_duration_seconds",
            "Time from a request's arrival to its response's headers",
            labels=["route", "method"],
        )
        for route, method, statuses, counts, total, seconds in server.http_metrics():
            for status, n in statuses:
                requests.add_metric([route, method, str(status)], n)
            latency.add_metric([route, method], _buckets(HTTP_BUCKETS, counts, total), seconds)
        yield requests
        yield latency


def collector(app: Catzilla) -> CatzillaCollector:
    """A ``prometheus_client`` collector of ``app``'s metrics (turns their
    collection on), to register in a registry of your own."""
    return CatzillaCollector(app)


def registry(app: Catzilla, *, process: bool = True) -> CollectorRegistry:
    """A registry with ``app``'s metrics and, with ``process``, the standard
    process and platform ones."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector(app))
    if process:
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
    return reg


def render(reg: CollectorRegistry) -> bytes:
    """The text exposition of a registry."""
    return generate_latest(reg)


def queue_depths(engine: BackgroundTasks, stats: EngineStats) -> dict[str, int]:
    """Tasks waiting per named queue: in memory everything is ``default``;
    with a store, the queues this process serves, counted in the store."""
    names = list(engine.queues) or ["default"]
    counted = engine._queue_depths(names)
    if counted is None:
        return {"default": stats.total_queued}
    return dict(zip(names, counted, strict=True))


def http_totals(app: Catzilla) -> dict[str, Any] | None:
    """Requests answered and those answered 5xx, over every route; None
    without a running server."""
    server = app._server
    if server is None:
        return None
    total = errors = 0
    for _, _, statuses, _, _, _ in server.http_metrics():
        for status, n in statuses:
            total += n
            if status >= 500:
                errors += n
    return {"total": total, "errors": errors}
