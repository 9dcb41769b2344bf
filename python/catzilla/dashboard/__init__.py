"""The built-in dashboard: one page, its files, a JSON snapshot, a live
stream of snapshots (Server-Sent Events, once a second) and a few actions.

Security: with a token, every request needs it, as ``Authorization: Bearer``
or as the cookie the login form sets; anything else gets 401. Without a
token the dashboard is served only on a loopback address, and only to
requests whose ``Host`` is a loopback name (so a web page cannot reach it
through DNS rebinding). Actions are POSTs that must carry the page's CSRF
token in ``X-CSRF-Token`` and, when the browser sends an ``Origin``, come
from the dashboard's own origin. The page builds its DOM from text, never
from HTML, and is served with a strict Content-Security-Policy.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import ipaddress
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from ..enums import TaskStatus
from ..errors import HTTPError
from ..streaming import EventSourceResponse, ServerSentEvent
from ..web import HTMLResponse, JSONResponse, Request, Response

if TYPE_CHECKING:
    from ..app import Catzilla

__all__ = ["Dashboard"]

COOKIE = "catzilla_dashboard"
#: Seconds of per-second throughput the page's charts show.
HISTORY_SECONDS = 300
#: How often a live page gets a snapshot (seconds).
INTERVAL = 1.0
#: Rows of each task table in a snapshot.
ROWS = 50

_FILES = {
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}
_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}


def _file(name: str) -> str:
    return resources.files(__package__).joinpath("static", name).read_text("utf-8")


def _security_headers(nonce: str | None = None) -> dict[str, str]:
    style = f"'self' 'nonce-{nonce}'" if nonce else "'self'"
    return {
        "content-security-policy": (
            f"default-src 'self'; script-src 'self'; style-src {style}; img-src 'self' data:; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
        ),
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
        "cache-control": "no-store",
    }


class Dashboard:
    """The dashboard of one app, served under ``path``."""

    def __init__(self, app: Catzilla, path: str, token: str | None) -> None:
        if not isinstance(path, str) or not path.startswith("/") or path.endswith("/"):
            raise ValueError(f"path must start with '/' and not end with one, got {path!r}")
        if token is not None and (not isinstance(token, str) or len(token) < 8):
            raise ValueError("token must be a str of at least 8 characters, or None")
        self.app = app
        self.path = path
        self.token = token
        key = (token or secrets.token_hex(32)).encode()
        self._session = hmac.new(key, b"catzilla-dashboard-session", hashlib.sha256).hexdigest()
        self.csrf = hmac.new(key, b"catzilla-dashboard-csrf", hashlib.sha256).hexdigest()
        self._page = _file("index.html")
        self._login = _file("login.html")
        self._files = {name: _file(name) for name in _FILES}
        self._history: deque[dict[str, float]] = deque(maxlen=HISTORY_SECONDS)
        self._last: tuple[float, int, int, int, int] | None = None
        self._lock = threading.Lock()
        self._sampling: threading.Event | None = None
        # Failed tasks already retried from the page, and their new ids.
        self._retried: dict[str, str] = {}

    # Setup

    def install(self) -> None:
        app, p = self.app, self.path
        app._observe()
        app.route(p)(self._guard(self.page))
        app.route(f"{p}/login", methods=["GET", "POST"])(self.login)
        app.route(f"{p}/static/{{name}}")(self._guard(self.static))
        app.route(f"{p}/api/snapshot")(self._guard(self.snapshot_json))
        app.route(f"{p}/api/stream")(self._guard(self.stream))
        app.route(f"{p}/api/tasks/{{task_id}}/{{action}}", methods=["POST"])(
            self._guard(self.task_action, post=True)
        )
        app.route(f"{p}/api/schedules/{{name}}/{{action}}", methods=["POST"])(
            self._guard(self.schedule_action, post=True)
        )

    def check_address(self, sock: socket.socket) -> None:
        """Refuses to serve a token-less dashboard on a non-loopback address."""
        if self.token is not None or sock.family == socket.AF_UNIX:
            return
        host = sock.getsockname()[0]
        if not ipaddress.ip_address(host).is_loopback:
            raise RuntimeError(
                f"the dashboard at {self.path} has no token, so it is served only on a "
                f"loopback address (127.0.0.1), not on {host}; pass "
                "enable_dashboard(token=...) to serve it on other addresses"
            )

    # Access

    def _authorized(self, request: Request) -> bool:
        headers = request.headers
        if self.token is None:
            try:
                host = urlsplit("//" + headers.get("host", "")).hostname or ""
            except ValueError:  # a malformed Host ("[::1") is no loopback name
                return False
            return _loopback_name(host)
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and hmac.compare_digest(
            auth[7:].strip().encode(), self.token.encode()
        ):
            return True
        cookie = _cookie(headers.get("cookie", ""), COOKIE)
        return cookie is not None and hmac.compare_digest(cookie.encode(), self._session.encode())

    def _csrf_ok(self, request: Request) -> bool:
        headers = request.headers
        sent = headers.get("x-csrf-token", "")
        if not hmac.compare_digest(sent.encode(), self.csrf.encode()):
            return False
        origin = headers.get("origin")
        if origin is None:
            return True
        try:
            return urlsplit(origin).netloc == headers.get("host", "")
        except ValueError:  # a malformed Origin ("http://[") is no same origin
            return False

    def _guard(self, handler: Any, *, post: bool = False) -> Any:
        def guarded(request: Request, **params: Any) -> Any:
            if not self._authorized(request):
                if request.method == "GET" and request.path == self.path:
                    return self._login_page(401, "")
                return JSONResponse({"error": "Unauthorized"}, 401, _security_headers())
            if post and not self._csrf_ok(request):
                return JSONResponse(
                    {"error": "Forbidden: missing or wrong CSRF token (reload the page)"},
                    403,
                    _security_headers(),
                )
            return handler(request, **params)

        guarded.__name__ = guarded.__qualname__ = getattr(handler, "__name__", "dashboard")
        return guarded

    def _login_page(self, status: int, message: str) -> Response:
        nonce = secrets.token_urlsafe(16)
        body = (
            self._login.replace("{{BASE}}", html.escape(self.path))
            .replace("{{NONCE}}", nonce)
            .replace("{{MESSAGE}}", html.escape(message))
        )
        headers = _security_headers(nonce)
        if status == 401:
            headers["www-authenticate"] = 'Bearer realm="catzilla dashboard"'
        return HTMLResponse(body, status, headers)

    def login(self, request: Request) -> Response:
        if self._authorized(request):
            return Response(status_code=303, headers={"location": self.path})
        if request.method == "GET" or self.token is None:
            return self._login_page(401, "")
        sent = parse_qs(request.body.decode("utf-8", "replace")).get("token", [""])[0]
        if not hmac.compare_digest(sent.encode(), self.token.encode()):
            return self._login_page(401, "Wrong token.")
        cookie = f"{COOKIE}={self._session}; Path={self.path}; HttpOnly; SameSite=Strict"
        return Response(status_code=303, headers={"location": self.path, "set-cookie": cookie})

    # Pages and data

    def page(self, request: Request) -> Response:
        body = self._page.replace("{{BASE}}", html.escape(self.path)).replace("{{CSRF}}", self.csrf)
        return HTMLResponse(body, 200, _security_headers())

    def static(self, request: Request, name: str) -> Response:
        if name not in _FILES:
            raise HTTPError(404, f"no dashboard file {name!r}")
        return Response(self._files[name], 200, _security_headers(), content_type=_FILES[name])

    def snapshot_json(self, request: Request) -> Response:
        return JSONResponse(self.snapshot(), 200, _security_headers())

    def stream(self, request: Request) -> Response:
        return EventSourceResponse(self._snapshots(), headers=_security_headers())

    async def _snapshots(self) -> AsyncIterator[ServerSentEvent]:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.run_in_executor(None, self.snapshot)
            yield ServerSentEvent(data, event="snapshot")
            await asyncio.sleep(INTERVAL)

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows, JSON-ready."""
        from .. import metrics

        app = self.app
        engine = app.tasks
        out: dict[str, Any] = {"time": time.time(), "http": None}
        http = metrics.http_totals(app)
        if http is not None:
            history = list(self._history)
            recent = history[-10:]
            span = max(len(recent), 1)
            requests = sum(h["requests"] for h in recent)
            errors = sum(h["errors"] for h in recent)
            http["requests_per_second"] = requests / span
            http["error_rate"] = errors / requests if requests else 0.0
            out["http"] = http
        out["history"] = list(self._history)
        if engine is None or engine.is_forked or engine.is_shutdown:
            return out | {
                "stats": {},
                "lanes": {},
                "queues": {},
                "workers": {},
                "running": [],
                "queued": [],
                "failures": [],
                "schedules": [],
                "latency_ms": {"p50": 0.0, "p95": 0.0, "p99": 0.0},
            }
        stats = engine.get_stats()
        out["stats"] = stats.to_dict()
        out["lanes"] = {
            "critical": stats.critical_queue_size,
            "high": stats.high_queue_size,
            "normal": stats.normal_queue_size,
            "low": stats.low_queue_size,
            "scheduled": stats.scheduled_tasks,
        }
        out["queues"] = metrics.queue_depths(engine, stats)
        out["workers"] = {
            "busy": stats.active_workers,
            "idle": stats.idle_workers,
            "total": stats.total_workers,
        }
        p50, p95, p99 = engine._latency()
        out["latency_ms"] = {"p50": p50, "p95": p95, "p99": p99}
        out["running"] = [
            {
                "task_id": t.task_id,
                "name": t.name,
                "priority": t.priority.name.lower(),
                "progress": t.progress,
                "step": t.current_step,
                "started_at": t.started_at.timestamp() if t.started_at else None,
                "attempts": t.attempts,
            }
            for t in engine.list_tasks(TaskStatus.RUNNING, ROWS)
        ]
        queued = []
        for status in (TaskStatus.PENDING, TaskStatus.SCHEDULED, TaskStatus.RETRYING):
            queued += engine.list_tasks(status, ROWS)
        queued.sort(key=lambda t: t.created_at, reverse=True)
        out["queued"] = [
            {
                "task_id": t.task_id,
                "name": t.name,
                "priority": t.priority.name.lower(),
                "status": t.status.value,
                "created_at": t.created_at.timestamp(),
            }
            for t in queued[:ROWS]
        ]
        out["failures"] = [
            {
                "task_id": t.task_id,
                "name": t.name,
                "finished_at": t.finished_at.timestamp() if t.finished_at else None,
                "attempts": t.attempts,
                "error": f"{t.error['type']}: {t.error['message']}" if t.error else "",
                "traceback": t.error.get("traceback", "") if t.error else "",
                "retried_as": self._retried.get(t.task_id),
            }
            for t in engine.list_tasks(TaskStatus.FAILED, ROWS)
        ]
        out["schedules"] = [
            {
                "name": p.name,
                "schedule": p.schedule,
                "next_run_at": p.next_run_at,
                "last_run_at": p.last_run_at,
                "runs": p.runs,
                "failures": p.failures,
                "paused": p.is_paused,
            }
            for p in engine.list_periodic_tasks()
        ]
        return out

    def _sample(self) -> None:
        """Adds one second of throughput to the history."""
        from .. import metrics

        engine = self.app.tasks
        now = time.time()
        completed = failed = 0
        if engine is not None and not engine.is_forked and not engine.is_shutdown:
            stats = engine.get_stats()
            completed, failed = stats.total_tasks_processed, stats.failed_tasks
        http = metrics.http_totals(self.app) or {"total": 0, "errors": 0}
        current = (now, completed, failed, http["total"], http["errors"])
        with self._lock:
            last, self._last = self._last, current
            if last is None:
                return
            self._history.append(
                {
                    "t": round(now, 3),
                    "completed": max(completed - last[1], 0),
                    "failed": max(failed - last[2], 0),
                    "requests": max(current[3] - last[3], 0),
                    "errors": max(current[4] - last[4], 0),
                }
            )

    def start(self) -> None:
        """Starts keeping the per-second history (while the app serves)."""
        stop = self._sampling = threading.Event()
        threading.Thread(
            target=self._sample_until, args=(stop,), name="catzilla-dashboard", daemon=True
        ).start()

    def stop(self) -> None:
        if self._sampling is not None:
            self._sampling.set()
            self._sampling = None

    def _sample_until(self, stop: threading.Event) -> None:
        while True:
            started = time.monotonic()
            try:
                self._sample()
            except Exception:  # noqa: BLE001 - a reading that failed is skipped
                pass
            if stop.wait(max(INTERVAL - (time.monotonic() - started), 0.05)):
                return

    # Actions

    def task_action(self, request: Request, task_id: str, action: str) -> Response:
        engine = self.app._engine()
        if action == "cancel":
            handle = engine.get_result(task_id)
            if handle is None:
                raise HTTPError(404, f"no task {task_id}")
            return JSONResponse({"cancelled": handle.cancel()})
        if action == "retry":
            if engine.get_task(task_id) is None:
                raise HTTPError(404, f"no task {task_id}")
            with self._lock:
                # One retry per failed task: a second click must not queue it twice.
                if (earlier := self._retried.get(task_id)) is not None:
                    raise HTTPError(409, f"task {task_id} was already retried as {earlier}")
                try:
                    retried = engine._retry(task_id)
                except ValueError as exc:
                    raise HTTPError(409, str(exc)) from None
                self._retried[task_id] = retried.task_id
            return JSONResponse({"task_id": retried.task_id})
        raise HTTPError(404, f"no task action {action!r} (cancel or retry)")

    def schedule_action(self, request: Request, name: str, action: str) -> Response:
        engine = self.app._engine()
        found = [p for p in engine.list_periodic_tasks() if p.name == name]
        if not found:
            raise HTTPError(404, f"no periodic task named {name!r}")
        if action == "pause":
            found[0].pause()
        elif action == "resume":
            found[0].resume()
        else:
            raise HTTPError(404, f"no schedule action {action!r} (pause or resume)")
        return JSONResponse({"paused": found[0].is_paused})


def _loopback_name(host: str) -> bool:
    """Whether a Host header's name is a loopback one: ``localhost`` or a
    loopback IP address, never a DNS name that merely starts with ``127.``
    (which an attacker's DNS can point anywhere)."""
    if host in _LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None
