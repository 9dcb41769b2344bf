"""Type stubs for catzilla's native module, ``catzilla._catzilla``."""

from collections.abc import AsyncIterable, Callable, Generator, Iterable
from typing import Any, Self, final

from typing_extensions import disjoint_base

from catzilla.background_tasks import TaskPriority, TaskStatus
from catzilla.task_info import TaskStats

def _init_runtime(spec: dict[str, Any]) -> None:
    """Hands the enums, exception classes and helpers to the native layer (once)."""

#: How a coroutine ended, as ``catzilla._aio`` reports it to native callbacks.
ASYNC_OK: int
ASYNC_ERROR: int
ASYNC_TIMEOUT: int
ASYNC_CANCELLED: int

def _current_task() -> TaskResult | None:
    """The handle of the sync task running on this thread, if any."""

def _after_fork_in_child() -> None:
    """Marks every engine of the parent unusable; run in the child after ``os.fork()``."""

@final
class TaskResult:
    """The handle of one background task."""

    def __class_getitem__(cls, item: Any) -> Any:
        """``TaskResult[T]`` in annotations."""
    def __new__(cls, task_id: str, engine: Engine) -> Self:
        """The handle of a task ``engine`` knows (``engine.get_result(task_id)``);
        ``ValueError`` for an unknown id."""

    @property
    def task_id(self) -> str:
        """The task's unique id (20 hex digits)."""
    @property
    def status(self) -> TaskStatus:
        """Where the task stands now."""
    @property
    def priority(self) -> TaskPriority:
        """The lane the task was queued in."""
    @property
    def attempts(self) -> int:
        """Attempts started so far (1 + retries)."""
    @property
    def errors(self) -> list[BaseException]:
        """The exception of every failed attempt, oldest first."""
    @property
    def name(self) -> str:
        """The task function's import name, ``module.qualname``."""
    @property
    def progress(self) -> float:
        """Progress in percent as the task last reported it; 100 once completed."""
    @property
    def current_step(self) -> str | None:
        """The step the task last reported."""
    @property
    def created_at(self) -> float:
        """When the task was added (seconds since the Unix epoch)."""
    @property
    def started_at(self) -> float | None:
        """When its first attempt started."""
    @property
    def finished_at(self) -> float | None:
        """When it reached a final state."""
    def set_progress(self, percent: float, step: str | None = None) -> None:
        """Reports progress (0-100) and optionally the current step. Raises
        ``TypeError`` for a non-number and ``ValueError`` outside 0-100."""
    def is_ready(self) -> bool:
        """True once the task completed, failed or was cancelled."""
    def wait(self, timeout: float | None = None) -> Any:
        """Blocks (without holding the GIL) until the task finishes; returns its
        value or raises its final exception. Raises ``TimeoutError`` after
        ``timeout`` seconds, ``ValueError`` for a negative timeout."""
    def result(self) -> Any:
        """The value of a completed task, without blocking. Raises the final
        exception of a failed or cancelled task, and ``TaskNotReadyError``
        while the task has not finished."""
    def exception(self) -> BaseException | None:
        """The final exception of a failed or cancelled task, else None."""
    def cancel(self) -> bool:
        """Cancels the task while it waits in the queue (pending, scheduled, or
        waiting to retry); returns whether it did. A running attempt is not stopped."""
    def add_callback(self, func: Callable[[Any], object]) -> None:
        """Calls ``func(value)`` once the task succeeds (at once if it has), as
        catzilla 0.2 did; never for a task that fails or is cancelled (see
        ``add_done_callback``). A callback that raises is logged to ``catzilla.tasks``."""
    def add_done_callback(self, func: Callable[[TaskResult], object]) -> None:
        """Calls ``func(handle)`` once the task is final, whatever the outcome (at
        once if it is), as ``concurrent.futures`` does; ``handle`` is a
        ``TaskResult`` for this task. A callback that raises is logged."""
    def get_stats(self) -> TaskStats:
        """The task's timings and attempts in catzilla 0.2's ``TaskStats`` shape."""
    def __await__(self) -> Generator[Any, None, Any]:
        """``await result`` suspends until the task finishes and returns its value."""

@final
class PeriodicTask:
    """A recurring task made by ``add_periodic_task`` or ``@periodic``. Each run
    is an ordinary task (see ``last_result_id``)."""

    @property
    def name(self) -> str:
        """Unique per engine; with storage, runs are recorded under it."""
    @property
    def schedule(self) -> str:
        """The schedule as text, e.g. ``every 60.0 s`` or ``cron "0 3 * * *" (UTC)``."""
    @property
    def next_run_at(self) -> float | None:
        """When the next run fires (seconds since the epoch); None once cancelled."""
    @property
    def last_run_at(self) -> float | None:
        """When the last run was queued (seconds since the epoch), if any."""
    @property
    def last_result_id(self) -> str | None:
        """The task id of the last run, for ``get_task`` / ``get_task_result``."""
    @property
    def runs(self) -> int:
        """Runs queued so far; with storage, counting earlier processes' runs."""
    @property
    def failures(self) -> int:
        """Runs of this process that ended failed or could not be queued."""
    @property
    def skipped(self) -> int:
        """Firings skipped because the previous run was still going (``overlap=False``)."""
    @property
    def overlap(self) -> bool:
        """Whether a run may start while the previous one is still going."""
    @property
    def is_paused(self) -> bool: ...
    @property
    def is_cancelled(self) -> bool: ...
    def pause(self) -> None:
        """Stops queuing runs until ``resume()``; firings keep their times and
        pass without a run. Raises ``ValueError`` once cancelled."""
    def resume(self) -> None:
        """Queues runs again from the next due time. Raises ``ValueError`` once cancelled."""
    def cancel(self) -> bool:
        """Stops the schedule for good (a run already queued still runs);
        returns whether it was active."""

@final
class TaskDefaults:
    """The defaults a ``@task(...)`` declaration gives its function, each checked
    as ``add_task`` checks it (``TypeError``/``ValueError`` naming it)."""

    def __new__(
        cls,
        *,
        priority: TaskPriority | None = None,
        delay_ms: float | None = None,
        max_retries: int | None = None,
        timeout_ms: float | None = None,
        no_retry_for: tuple[type[BaseException], ...] | None = None,
        queue: str | None = None,
    ) -> Self: ...

@final
class EngineStats:
    """One reading of the engine's statistics; docs/background-tasks.md defines each."""

    def __new__(cls, **fields: Any) -> Self:
        """A reading made by hand: the fields given, zero (or None) for the rest;
        ``TypeError`` for an unknown field or a value of the wrong type."""

    critical_queue_size: int
    high_queue_size: int
    normal_queue_size: int
    low_queue_size: int
    scheduled_tasks: int
    total_queued: int
    queue_pressure: float
    running_tasks: int
    async_tasks_running: int
    active_workers: int
    idle_workers: int
    total_workers: int
    avg_worker_utilization: float
    tasks_per_second: float
    avg_execution_time_ms: float
    p95_execution_time_ms: float
    p99_execution_time_ms: float
    memory_usage_mb: float
    memory_efficiency: float
    worker_cpu_usage: float
    worker_memory_usage: float
    engine_cpu_usage: float
    engine_memory_usage: float
    total_tasks_submitted: int
    total_tasks_processed: int
    failed_tasks: int
    cancelled_tasks: int
    retry_count: int
    timeout_count: int
    rejected_tasks: int
    error_rate: float
    retained_results: int
    evicted_results: int
    starvation_promotions: int
    workers_started: int
    workers_stopped: int
    panics_contained: int
    storage_degraded: bool
    """True once the store stopped (its file deleted, say): no task can be queued there."""
    storage_error: str | None
    """Why durable storage stopped, once it has."""
    uptime_seconds: float
    def to_dict(self) -> dict[str, int | float | bool | str | None]:
        """Every field, JSON-ready."""

@disjoint_base
class Engine:
    """The native engine; use ``catzilla.background_tasks.BackgroundTasks``."""

    def __new__(
        cls,
        *,
        workers: int,
        min_workers: int,
        max_workers: int,
        queue_size: int,
        enable_auto_scaling: bool,
        memory_pool_mb: float,
        enable_profiling: bool,
        result_ttl: float,
        retry_backoff_ms: float,
        retry_backoff_cap_ms: float,
        starvation_ms: float,
        idle_timeout: float,
        default_priority: TaskPriority,
        default_delay_ms: float,
        default_max_retries: int,
        default_timeout_ms: float,
        storage: str | None,
        storage_prefix: str,
        queues: list[str],
        lease_timeout: float,
        flush_timeout: float,
    ) -> Self: ...
    @property
    def owner_id(self) -> str | None:
        """This process's id on the shared store (``host:pid:random``), the
        owner of its leases; None without a store."""
    @property
    def queues(self) -> list[str]:
        """The named queues this process's workers serve (with a store)."""
    def add_task(
        self,
        func: Callable[..., Any],
        *args: Any,
        priority: TaskPriority | None = None,
        delay_ms: float | None = None,
        max_retries: int | None = None,
        timeout_ms: float | None = None,
        queue: str | None = None,
        compile_to_c: bool | None = None,
        **kwargs: Any,
    ) -> TaskResult:
        """Queues ``func(*args, **kwargs)`` and returns at once. ``compile_to_c``
        (catzilla 0.2's) is accepted with a ``DeprecationWarning`` and does nothing.
        An option left as None takes the engine's default (NORMAL, 0, 3, 30000 unless configured);
        ``timeout_ms=0`` means no timeout; ``queue`` names the queue (``"default"``),
        which only a shared store tells apart. Raises ``TypeError`` (func, priority,
        numbers; with a shared store, a function not importable by name or arguments
        that are not JSON), ``ValueError`` (negative numbers), ``TaskQueueFullError``,
        ``StorageError`` (the store cannot take it) and ``EngineShutdownError``
        (a ``RuntimeError``)."""
    def get_result(self, task_id: str) -> TaskResult | None:
        """The handle of a task the engine still retains, else None."""
    def get_stats(self) -> EngineStats:
        """A snapshot of every statistic."""
    def _list(self, status: TaskStatus | None, limit: int) -> list[TaskResult]:
        """Handles of retained tasks, newest first, filtered by status."""
    def _add_periodic(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        *,
        every: float | None,
        cron: str | None,
        timezone: str,
        priority: Any,
        max_retries: Any,
        timeout_ms: Any,
        start_at: float | None,
        jitter_ms: float,
        overlap: bool,
        missed: str,
        name: str,
    ) -> PeriodicTask:
        """Registers a periodic task (arguments already checked by ``catzilla.periodic``)."""
    def _periodic_tasks(self) -> list[PeriodicTask]:
        """The periodic tasks not cancelled, in the order they were added."""
    def _recover(self) -> tuple[list[str], list[str]]:
        """Takes back the tasks of processes that are gone (expired leases, and
        those of exited processes of this host); returns the ids put back in
        their queue and the ids failed for good (their retries spent)."""
    def _stored(self, task_id: str) -> dict[str, Any] | None:
        """One stored row by id."""
    def _stored_list(self, status: str | None, limit: int) -> list[dict[str, Any]]:
        """The newest stored rows."""
    def _flush(self, timeout: float) -> bool:
        """Waits until everything handed to the store is committed (True
        without storage); returns whether it was within ``timeout`` seconds."""
    @property
    def storage_error(self) -> str | None:
        """Why durable storage stopped taking writes (the file was deleted, replaced
        or made read-only, or a write failed), once it has; None otherwise."""
    def get_profile(self) -> dict[str, dict[str, float]]:
        """Per-function count, failures and run times (with ``enable_profiling``)."""
    @property
    def is_shutdown(self) -> bool:
        """True once ``shutdown`` has run, and in a child process made by ``os.fork()``."""
    @property
    def is_forked(self) -> bool:
        """True in a child process made by ``os.fork()`` after this engine started; the
        engine's threads stayed in the parent and every call raises
        ``EngineShutdownError``."""
    def _shutdown(self, wait_for_completion: bool, timeout: float) -> dict[str, Any]:
        """Stops intake, lets work finish up to ``timeout`` seconds (when
        ``wait_for_completion``), cancels and reports what never ran, and
        stops the workers. Returns ``{"drained", "cancelled", "still_running"}``."""
    def _retry(self, task_id: str) -> TaskResult:
        """Queues a failed task's call again as a new task (same priority,
        retries, timeout and queue); ``ValueError`` for a task that is unknown,
        not failed, or whose call this process does not hold."""
    def _settle(self, timeout: float) -> bool:
        """Waits until nothing is queued, scheduled, running, awaiting a retry or
        running its callbacks, up to ``timeout`` seconds; returns whether it was."""
    def _finished_since(self, after: int) -> tuple[list[TaskResult], int]:
        """Handles of retained tasks final after the mark ``after`` (0: all), in
        the order they finished, and the new mark."""
    def _queue_depths(self, queues: list[str]) -> list[int] | None:
        """Tasks waiting (ready or delayed) in each named queue of the store;
        None without a store."""
    def _observe(self) -> None:
        """Turns on per-series counts and timings (by task name, priority, queue)."""
    def _set_event_sink(
        self,
        sink: Callable[[list[tuple[Any, ...]], int], object] | None,
        kinds: list[str] = ...,
    ) -> None:
        """Hands task events of ``kinds`` to ``sink(batch, dropped)`` on a thread
        of its own; None stops, after the events already queued."""
    def _series(
        self,
    ) -> list[
        tuple[
            str,
            int,
            str,
            dict[str, int],
            tuple[list[int], int, float],
            tuple[list[int], int, float],
        ]
    ]:
        """Every series: name, lane, queue, counts by event, and the run time and
        wait as (cumulative buckets at ``TASK_BUCKETS``, count, sum in seconds)."""
    def _latency(self) -> tuple[float, float, float]:
        """Run-time p50, p95 and p99 in ms over every attempt."""

# Web layer

@final
class Routes:
    """An app's routes, compiled as they are declared."""

    def __new__(cls) -> Self: ...
    @staticmethod
    def params(path: str) -> list[str]:
        """The parameter names of a route template; ``ValueError`` for a bad one."""
    def add(self, method: str, path: str, handler: Callable[..., Any]) -> None:
        """Adds a route; ``ValueError`` for a duplicate or a conflicting template."""

def _init_http(spec: dict[str, Any]) -> None:
    """Hands the web layer its helpers and exception classes (once)."""

@final
class Request:
    """An HTTP request, as a handler receives it."""

    @property
    def method(self) -> str:
        """The HTTP method, upper case."""
    @property
    def path(self) -> str:
        """The path, without the query string."""
    @property
    def query_string(self) -> str:
        """The raw query string ("" when there is none)."""
    @property
    def headers(self) -> dict[str, str]:
        """Headers by lower-case name; repeated headers joined with ", "."""
    @property
    def query_params(self) -> dict[str, str]:
        """Decoded query parameters; the first value wins for a repeated name."""
    @property
    def path_params(self) -> dict[str, str]:
        """Values of the route's ``{name}`` parameters."""
    @property
    def body(self) -> bytes:
        """The raw body."""
    @property
    def client(self) -> tuple[str, int] | None:
        """The client's (host, port)."""
    def text(self) -> str:
        """The body decoded as UTF-8."""
    def json(self) -> Any:
        """The body parsed as JSON; raises ``BadRequestError`` (400) when invalid."""

@disjoint_base
class Response:
    """An HTTP response. ``body`` is str or bytes; ``content_type`` defaults to
    text/plain. A ``status_code`` outside 100-599 raises ``ValueError``."""

    def __new__(
        cls,
        body: str | bytes | None = None,
        status_code: int = 200,
        headers: dict[str, str] | None = None,
        content_type: str | None = None,
    ) -> Self: ...
    @property
    def status_code(self) -> int: ...
    @property
    def body(self) -> bytes: ...
    @property
    def content_type(self) -> str: ...
    @property
    def headers(self) -> dict[str, str]:
        """Extra headers; a mutable dict."""

class JSONResponse(Response):
    """A response whose body is ``data`` as JSON (dicts, lists, str, numbers,
    bools, None, enums, and date/time objects as ISO 8601 text)."""

    def __new__(
        cls, data: Any = None, status_code: int = 200, headers: dict[str, str] | None = None
    ) -> Self: ...

class HTMLResponse(Response):
    """A response with an HTML body."""

    def __new__(
        cls,
        body: str | bytes | None = None,
        status_code: int = 200,
        headers: dict[str, str] | None = None,
    ) -> Self: ...

@disjoint_base
class StreamingResponse(Response):
    """A response sent with chunked encoding as ``content`` produces it: an
    iterator (run on a thread of its own) or async iterator (run on the
    server's event loop) of str or bytes chunks."""

    def __new__(
        cls,
        content: Iterable[str | bytes] | AsyncIterable[str | bytes],
        status_code: int = 200,
        headers: dict[str, str] | None = None,
        media_type: str | None = None,
    ) -> Self: ...
    @property
    def content(self) -> Any:
        """What produces the body."""

TASK_BUCKETS: list[float]
HTTP_BUCKETS: list[float]
STREAM_SENT: int
STREAM_FULL: int
STREAM_GONE: int

@final
class StreamSink:
    """The producer's end of a streaming response (internal)."""

    def send(self, data: str | bytes) -> int:
        """Queues a chunk without waiting: ``STREAM_SENT``, ``STREAM_FULL`` or ``STREAM_GONE``."""
    def send_blocking(self, data: str | bytes) -> bool:
        """Queues a chunk, waiting while the buffer is full; False once the client is gone."""
    def wait_writable(self, callback: Callable[[], object]) -> bool:
        """Leaves ``callback`` to be called once there is room; False if there is already."""
    def on_disconnect(self, callback: Callable[[], object]) -> bool:
        """Leaves ``callback`` to be called if the client leaves; False if it has."""
    def finish(self) -> None:
        """Ends the stream after the chunks queued."""
    def abort(self) -> None:
        """Ends the stream as failed: the connection is cut."""
    @property
    def disconnected(self) -> bool: ...

class PlainTextResponse(Response):
    """A response with a plain-text body."""

    def __new__(
        cls,
        body: str | bytes | None = None,
        status_code: int = 200,
        headers: dict[str, str] | None = None,
    ) -> Self: ...

@final
class Server:
    """The native HTTP server behind ``Catzilla.listen`` (internal)."""

    def __new__(
        cls,
        *,
        routes: Routes,
        max_body_size: int,
        handler_threads: int,
        io_threads: int,
        header_read_timeout: float,
        body_read_timeout: float,
        max_pending_requests: int,
        max_connections: int,
        access_log: bool = False,
        forwarded_allow_ips: list[str] = ...,
        metrics: bool = False,
    ) -> Self: ...
    def serve_in_memory(self) -> None:
        """Serves connections made in this process only (``exchange``); returns at once."""
    def exchange(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes, timeout: float
    ) -> tuple[int, list[tuple[str, str]], bytes, BaseException | None]:
        """One request over a new in-memory connection: (status, headers, body,
        the exception of a handler the server answered 500 for, or None).
        ``TimeoutError`` when the response does not end within ``timeout`` seconds."""
    def http_metrics(
        self,
    ) -> list[tuple[str, str, list[tuple[int, int]], list[int], int, float]]:
        """Requests by route template and method: counts by status, and latency
        as (cumulative buckets at ``HTTP_BUCKETS``, count, sum in seconds)."""
    def adopt(self, fd: int) -> None:
        """Serves on the listening socket ``fd`` (TCP or Unix), which the caller keeps."""
    def serve(self) -> None:
        """Serves until ``request_shutdown``; runs Python signal handlers meanwhile."""
    def request_shutdown(self) -> None:
        """Makes ``serve`` return; safe from signal handlers and other threads."""
    def stop(self, grace: float) -> bool:
        """Stops accepting and lets in-flight requests finish for ``grace`` seconds."""
