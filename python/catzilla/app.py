"""The ``Catzilla`` application object."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from . import _sockets, compat
from ._catzilla import Routes, Server
from ._signals import StopSignals
from ._sockets import DEFAULT_BACKLOG
from .background_tasks import (
    BackgroundTasks,
    EngineStats,
    PeriodicTask,
    TaskFunction,
    TaskInfo,
    TaskPriority,
    TaskResult,
    TaskStatus,
    task,
)
from .dashboard import Dashboard
from .errors import EngineShutdownError
from .events import EventHooks, Hook, check_kinds
from .periodic import PeriodicOptions
from .task_function import TaskOptions
from .web import Response, make_adapter

if TYPE_CHECKING:
    from typing_extensions import Unpack

P = ParamSpec("P")
R = TypeVar("R")
H = TypeVar("H", bound=Callable[..., Any])
F = TypeVar("F", bound=Callable[..., Any])

_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


class Catzilla:
    """A catzilla application: routes served by a Rust HTTP server, and a
    background task engine once enabled.

    ``max_body_size`` bounds request bodies (larger ones get 413),
    ``handler_threads`` is how many Python threads run sync handlers,
    ``io_threads`` how many threads do network I/O, ``header_read_timeout``
    how long a client may take to send its headers, and ``shutdown_grace``
    how long in-flight requests may take to finish at shutdown, and
    ``body_read_timeout`` how long a request body may take to arrive (then
    408), and ``max_pending_requests`` how many requests may wait for a handler thread
    before new ones are answered 503 with ``Retry-After``, and ``max_connections``
    how many connections are served at once (one more gets 503 and is closed).
    ``title``, ``description`` and ``version`` describe the app and are kept as
    attributes of the same names.

    Catzilla 0.2's options that have no effect here (``production``,
    ``use_jemalloc``, ``show_banner``, ...; see ``catzilla.compat.APP_OPTIONS``)
    are accepted with one ``DeprecationWarning`` each, so 0.2 programs keep
    working; any other unknown keyword argument raises ``TypeError``.
    """

    def __init__(
        self,
        *,
        max_body_size: int = 10 * 1024 * 1024,
        handler_threads: int = 4,
        io_threads: int = 1,
        header_read_timeout: float = 10.0,
        shutdown_grace: float = 10.0,
        max_pending_requests: int = 4096,
        body_read_timeout: float = 30.0,
        max_connections: int = 10_000,
        title: str | None = None,
        description: str | None = None,
        version: str | None = None,
        **legacy: Any,
    ) -> None:
        if legacy:
            compat.accept_legacy("Catzilla", legacy, compat.APP_OPTIONS, Catzilla)
        for name, value in (
            ("max_body_size", max_body_size),
            ("handler_threads", handler_threads),
            ("io_threads", io_threads),
            ("max_pending_requests", max_pending_requests),
            ("max_connections", max_connections),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name, text in (("title", title), ("description", description), ("version", version)):
            if text is not None and not isinstance(text, str):
                raise TypeError(f"{name} must be a str or None, got {text!r}")
        self.title = title
        self.description = description
        self.version = version
        self.tasks: BackgroundTasks | None = None
        self._task_options: dict[str, Any] = {}
        # Each schedule added through the app, to add again to a restarted engine.
        self._schedules: list[
            tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], PeriodicTask]
        ] = []
        self.max_body_size = max_body_size
        self.handler_threads = handler_threads
        self.io_threads = io_threads
        self.header_read_timeout = float(header_read_timeout)
        self.shutdown_grace = float(shutdown_grace)
        self.max_pending_requests = max_pending_requests
        self.max_connections = max_connections
        self.body_read_timeout = float(body_read_timeout)
        self.routes: list[tuple[str, str, Callable[..., Any]]] = []
        self._routes = Routes()
        self._server: Server | None = None
        self._observing = False
        self._http_metrics = False
        self._event_hooks = EventHooks()
        self._dashboard: Dashboard | None = None

    # Routing

    def route(self, path: str, methods: list[str] | None = None) -> Callable[[H], H]:
        """Registers the decorated handler for ``path`` and ``methods`` (default GET).

        ``{name}`` in the path is a parameter, given to the handler as
        ``request.path_params["name"]`` and as the keyword argument ``name``
        when the handler declares it (e.g. ``name: str = Path(...)``)."""
        if not isinstance(path, str):
            raise ValueError(f"path must be a str starting with '/', got {path!r}")
        wanted = [m.upper() for m in (methods or ["GET"])]
        for m in wanted:
            if m not in _METHODS:
                raise ValueError(f"unsupported HTTP method {m!r}; use one of {_METHODS}")
        params = Routes.params(path)  # the router's own reading of the template

        def register(handler: H) -> H:
            adapter = make_adapter(handler, path, params)
            for m in wanted:
                self._routes.add(m, path, adapter)  # a duplicate or conflict raises here
                self.routes.append((m, path, handler))
            return handler

        return register

    def get(self, path: str) -> Callable[[H], H]:
        """``@app.get(path)``: a GET route."""
        return self.route(path, ["GET"])

    def post(self, path: str) -> Callable[[H], H]:
        """``@app.post(path)``: a POST route."""
        return self.route(path, ["POST"])

    def put(self, path: str) -> Callable[[H], H]:
        """``@app.put(path)``: a PUT route."""
        return self.route(path, ["PUT"])

    def patch(self, path: str) -> Callable[[H], H]:
        """``@app.patch(path)``: a PATCH route."""
        return self.route(path, ["PATCH"])

    def delete(self, path: str) -> Callable[[H], H]:
        """``@app.delete(path)``: a DELETE route."""
        return self.route(path, ["DELETE"])

    # Serving

    def listen(
        self,
        port: int = 8000,
        host: str = "127.0.0.1",
        *,
        uds: str | None = None,
        fd: int | None = None,
        backlog: int = DEFAULT_BACKLOG,
        access_log: bool = False,
        forwarded_allow_ips: str | Sequence[str] | None = None,
    ) -> None:
        """Serves the app until SIGINT or SIGTERM, with the GIL released.

        Listens on ``host:port``, or on the Unix socket ``uds``, or on the
        already listening socket ``fd`` (inherited, e.g. from systemd; it is
        closed once the server stops accepting), with
        ``backlog`` connections queued by the kernel. ``access_log`` logs one
        line per request to the ``catzilla.access`` logger (to stderr when
        logging is not configured). ``forwarded_allow_ips`` (addresses,
        networks, or ``"*"``; a list or a comma-separated string) are the
        proxies whose ``X-Forwarded-For`` gives ``request.client``.

        Prints one line saying where it serves. SIGINT and SIGTERM stop the
        server gracefully, every time: no new connections, in-flight requests
        finish (up to ``shutdown_grace`` seconds), then the task engine shuts
        down and ``listen`` returns. A handler the program installed for them
        runs first; if it raises ``SystemExit`` (``sys.exit``) or
        ``KeyboardInterrupt``, that exception propagates once the stop is done,
        and any other exception it raises is logged. A signal set to
        ``SIG_IGN`` stays ignored. A second signal while tasks drain stops
        waiting: unfinished tasks are cancelled and reported. A port in use
        raises ``OSError`` naming it."""
        if sum(x is not None for x in (uds, fd)) > 1:
            raise ValueError("give at most one of uds and fd")
        if isinstance(backlog, bool) or not isinstance(backlog, int) or backlog < 1:
            raise ValueError(f"backlog must be an int >= 1, got {backlog!r}")
        if fd is not None:
            sock = _sockets.adopt(fd)
        elif uds is not None:
            sock = _sockets.listen_unix(uds, backlog)
        else:
            sock = _sockets.listen_tcp(host, port, backlog)
        try:
            self._serve(
                sock,
                access_log=access_log,
                forwarded_allow_ips=forwarded_allow_ips,
                announce=True,
            )
        finally:
            sock.close()
            if uds is not None:
                with contextlib.suppress(OSError):
                    os.unlink(uds)

    def _serve(
        self,
        sock: socket.socket,
        *,
        access_log: bool = False,
        forwarded_allow_ips: str | Sequence[str] | None = None,
        announce: bool = True,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        """Serves on the listening ``sock`` until stopped; ``on_ready`` is
        called once the server is about to accept. ``sock`` is closed once the
        server has its own copy, so that the server stopping closes the socket
        (new connections are refused) unless another process shares it."""
        if access_log:
            _default_access_handler()
        server = self._new_server(access_log=access_log, forwarded_allow_ips=forwarded_allow_ips)
        if self._dashboard is not None:
            self._dashboard.check_address(sock)
        server.adopt(sock.fileno())
        where = _sockets.describe(sock)
        sock.close()
        self._server = server
        if announce:
            print(f"catzilla serving on {where}", flush=True)
        signals = StopSignals(server.request_shutdown)
        signals.install()
        if self._dashboard is not None:
            self._dashboard.start()
        try:
            if self.tasks is not None and self._engine().config["storage"] is not None:
                self._engine().recover()
            if on_ready is not None:
                on_ready()
            server.serve()
        finally:
            try:
                server.stop(self.shutdown_grace)
                self._server = None
                if self.tasks is not None and not self.tasks.is_shutdown:
                    signals.draining = True
                    self.tasks.shutdown(
                        wait_for_completion=signals.received < 2, timeout=self.tasks.exit_timeout
                    )
            except KeyboardInterrupt:
                # A second signal while tasks drain: the engine has already
                # cancelled and reported what had not finished.
                pass
            finally:
                signals.restore()
                if self._dashboard is not None:
                    self._dashboard.stop()

    def _new_server(
        self,
        *,
        access_log: bool = False,
        forwarded_allow_ips: str | Sequence[str] | None = None,
    ) -> Server:
        """The native server for this app's routes and settings, not yet serving."""
        return Server(
            routes=self._routes,
            max_body_size=self.max_body_size,
            handler_threads=self.handler_threads,
            io_threads=self.io_threads,
            header_read_timeout=self.header_read_timeout,
            body_read_timeout=self.body_read_timeout,
            max_pending_requests=self.max_pending_requests,
            max_connections=self.max_connections,
            access_log=bool(access_log),
            forwarded_allow_ips=_proxy_list(forwarded_allow_ips),
            metrics=self._http_metrics,
        )

    def stop(self) -> None:
        """Asks a running ``listen`` to stop gracefully; callable from any thread."""
        if self._server is not None:
            self._server.request_shutdown()

    # Background tasks

    def enable_background_tasks(self, **options: Any) -> BackgroundTasks:
        """Starts the background task engine with ``BackgroundTasks``' parameters
        and stores it as ``app.tasks``. Enabling twice raises ``RuntimeError``.
        Catzilla 0.2's ``enable_c_compilation`` is accepted with a
        ``DeprecationWarning`` and has no effect."""
        if self.tasks is not None and not self.tasks.is_forked:
            raise RuntimeError("background tasks are already enabled for this app")
        self.tasks = BackgroundTasks(**options)
        # Kept to start a fresh engine in a child of os.fork(), which warns no more.
        self._task_options = {k: v for k, v in options.items() if k != "enable_c_compilation"}
        self._apply_observation(self.tasks)
        return self.tasks

    def _apply_observation(self, engine: BackgroundTasks) -> None:
        if self._observing:
            engine._observe()
        if self._event_hooks:
            engine._set_event_sink(self._event_hooks.dispatch, self._event_hooks.kinds())

    def _observe(self) -> None:
        """Turns on per-task-name counts and timings, and the server's request
        counts (what metrics and the dashboard read)."""
        self._observing = True
        self._http_metrics = True
        if self.tasks is not None and not self.tasks.is_forked:
            self.tasks._observe()

    # Monitoring

    @overload
    def on_task_event(self, func: Hook, /) -> Hook: ...
    @overload
    def on_task_event(self, *kinds: str) -> Callable[[Hook], Hook]: ...
    def on_task_event(self, *kinds: Any) -> Any:
        """Registers a hook called with a ``TaskEvent`` for each task event of
        ``kinds`` (``"submitted"``, ``"started"``, ``"succeeded"``,
        ``"failed"``, ``"retrying"``, ``"timed_out"``, ``"cancelled"``; all
        when none are named). Hooks run on a thread of their own, in order;
        one that raises is logged and never fails the task::

            @app.on_task_event("failed")
            def report(event: TaskEvent) -> None:
                sentry_sdk.capture_exception(event.error)
        """
        if len(kinds) == 1 and callable(kinds[0]):
            self._add_hook(check_kinds(()), kinds[0])
            return kinds[0]
        wanted = check_kinds(tuple(kinds))

        def register(hook: Hook) -> Hook:
            self._add_hook(wanted, hook)
            return hook

        return register

    def _add_hook(self, kinds: frozenset[str], hook: Hook) -> None:
        before = self._event_hooks.kinds()
        self._event_hooks.add(kinds, hook)
        wanted = self._event_hooks.kinds()
        if wanted != before and self.tasks is not None and not self.tasks.is_forked:
            self.tasks._set_event_sink(self._event_hooks.dispatch, wanted)

    def enable_metrics(self, path: str = "/metrics", *, process_metrics: bool = True) -> None:
        """Serves Prometheus metrics at ``path``: task counters, durations and
        waits by task name, priority and queue; queue depths; workers; HTTP
        requests and latency by route template. Call before ``listen``."""
        from . import metrics

        reg = metrics.registry(self, process=process_metrics)

        def serve_metrics() -> Response:
            return Response(metrics.render(reg), content_type=metrics.CONTENT_TYPE_LATEST)

        self.route(path)(serve_metrics)

    def enable_dashboard(self, path: str = "/_catzilla", token: str | None = None) -> Dashboard:
        """Serves the live dashboard at ``path``. With ``token``, every
        request needs it (``Authorization: Bearer <token>``, or the login
        form's cookie); without one, the dashboard is served only on a
        loopback address (``listen`` refuses any other). Call before ``listen``."""
        if self._dashboard is not None:
            raise RuntimeError(f"the dashboard is already enabled at {self._dashboard.path}")
        self._dashboard = Dashboard(self, path, token)
        self._dashboard.install()
        return self._dashboard

    def _engine(self) -> BackgroundTasks:
        tasks = self.tasks
        if tasks is None:
            raise EngineShutdownError(
                "background tasks are not enabled; call app.enable_background_tasks() first"
            )
        if tasks.is_forked:
            # A child of os.fork(): the parent's engine threads did not follow.
            tasks = self._new_engine()
        return tasks

    def add_task(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> TaskResult:
        """Queues ``func(*args, **kwargs)`` on the engine; see ``BackgroundTasks.add_task``.
        Catzilla 0.2's ``compile_to_c`` is accepted with a ``DeprecationWarning``."""
        return self._engine().add_task(func, *args, **kwargs)

    @overload
    def task(self, func: Callable[P, R], /) -> TaskFunction[P, R]: ...
    @overload
    def task(
        self, priority: TaskPriority | None = None, /, **options: Unpack[TaskOptions]
    ) -> Callable[[Callable[P, R]], TaskFunction[P, R]]: ...
    def task(
        self,
        func: Callable[..., Any] | TaskPriority | None = None,
        /,
        **options: Unpack[TaskOptions],
    ) -> Any:
        """The ``@task`` decorator (see ``catzilla.background_tasks.task``),
        available once the engine is enabled."""
        self._engine()
        if isinstance(func, TaskPriority):  # Catzilla 0.2's @app.task(TaskPriority.HIGH)
            return task(func, **options)
        decorate = task(**options)
        return decorate(func) if func is not None else decorate

    def add_periodic_task(
        self, func: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> PeriodicTask:
        """Runs ``func(*args, **kwargs)`` on a schedule (``every=`` or ``cron=``,
        and the other options of ``BackgroundTasks.add_periodic_task``)."""
        schedule = self._engine().add_periodic_task(func, *args, **kwargs)
        self._schedules.append((func, args, kwargs, schedule))
        return schedule

    def periodic(self, **options: Unpack[PeriodicOptions]) -> Callable[[F], F]:
        """``@app.periodic(every=60)`` / ``@app.periodic(cron="0 3 * * *")``: runs
        the decorated function (no arguments) on a schedule."""
        self._engine()

        def register(func: F) -> F:
            self.add_periodic_task(func, **options)
            return func

        return register

    def _new_engine(self) -> BackgroundTasks:
        """A new engine as ``app.tasks``, with the options the app enabled
        its first one with, and the app's observation and event hooks."""
        tasks = self.tasks = BackgroundTasks(**self._task_options)
        self._apply_observation(tasks)
        return tasks

    def _restart_engine(self) -> BackgroundTasks:
        """Replaces a shut-down engine with a new one made with the same
        options, observation and event hooks, and the schedules added through
        the app that were not cancelled (paused ones stay paused). What a new
        ``with TestClient(app)`` does, so that each test gets a running engine."""
        tasks = self._new_engine()
        kept = []
        for func, args, kwargs, old in self._schedules:
            if old.is_cancelled:
                continue
            schedule = tasks.add_periodic_task(func, *args, **kwargs)
            if old.is_paused:
                schedule.pause()
            kept.append((func, args, kwargs, schedule))
        self._schedules = kept
        return tasks

    def list_periodic_tasks(self) -> list[PeriodicTask]:
        """The app's periodic tasks not cancelled, in the order they were added."""
        return self._engine().list_periodic_tasks()

    def get_task_stats(self) -> EngineStats:
        """The engine's statistics; see ``EngineStats``."""
        return self._engine().get_stats()

    def get_task_result(self, task_id: str) -> TaskResult | None:
        """The handle of a retained task by id, or None."""
        return self._engine().get_result(task_id)

    def get_task(self, task_id: str) -> TaskInfo | None:
        """The state of a task by id (``TaskInfo``), or None for an unknown id."""
        return self._engine().get_task(task_id)

    def list_tasks(self, status: TaskStatus | None = None, limit: int = 100) -> list[TaskInfo]:
        """Retained tasks, newest first, optionally only those with ``status``."""
        return self._engine().list_tasks(status=status, limit=limit)


def _proxy_list(value: str | Sequence[str] | None) -> list[str]:
    """``forwarded_allow_ips`` as a list: a comma-separated string is split."""
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    items = list(value)
    for item in items:
        if not isinstance(item, str):
            raise TypeError(
                f"forwarded_allow_ips must hold str addresses or networks, got {item!r}"
            )
    return items


def _default_access_handler() -> None:
    """Access lines go to stderr when the program has not configured logging."""
    access = logging.getLogger("catzilla.access")
    if not access.hasHandlers():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        access.addHandler(handler)
    if access.getEffectiveLevel() > logging.INFO:
        access.setLevel(logging.INFO)
