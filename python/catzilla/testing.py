"""``TestClient``: calls an app in-process, through its real server, with no
socket and no port.

Each request goes over an in-memory connection to the same native server
``listen`` runs (routing, body limits, handlers on their threads, response
conversion, streaming), so a test sees what a client would::

    from catzilla.testing import TestClient

    def test_create_user() -> None:
        with TestClient(app) as client:  # starts and stops the app's engine
            r = client.post("/users", json={"name": "Ada"})
            assert r.status_code == 201
            app.tasks.drain(timeout=5)  # the tasks it queued have run
"""

from __future__ import annotations

import json as _json
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http.cookies import Morsel, SimpleCookie
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

if TYPE_CHECKING:
    from ._catzilla import Server
    from .app import Catzilla

__all__ = ["Headers", "TestClient", "TestResponse"]

Params = Mapping[str, Any] | Sequence[tuple[str, Any]]


class Headers(Mapping[str, str]):
    """Response headers, looked up by any case; a repeated header reads as
    its values joined with ", " (``get_list`` gives them apart)."""

    def __init__(self, items: Sequence[tuple[str, str]]) -> None:
        self._items = [(k.lower(), v) for k, v in items]

    def __getitem__(self, name: str) -> str:
        values = self.get_list(name)
        if not values:
            raise KeyError(name)
        return ", ".join(values)

    def get_list(self, name: str) -> list[str]:
        """Every value of header ``name``, in order."""
        wanted = name.lower()
        return [v for k, v in self._items if k == wanted]

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(k for k, _ in self._items))

    def __len__(self) -> int:
        return len(dict.fromkeys(k for k, _ in self._items))

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


class TestResponse:
    """A response as the test client received it."""

    __test__ = False  # not a test class, for pytest

    def __init__(
        self, method: str, url: str, status_code: int, headers: Headers, body: bytes
    ) -> None:
        self.method = method
        self.url = url
        self.status_code = status_code
        self.headers = headers
        self.content = body

    @property
    def text(self) -> str:
        """The body decoded with the charset of its content type (UTF-8 by default)."""
        charset = "utf-8"
        for part in self.headers.get("content-type", "").split(";")[1:]:
            key, _, value = part.strip().partition("=")
            if key.lower() == "charset" and value:
                charset = value.strip('"')
        return self.content.decode(charset, errors="replace")

    def json(self) -> Any:
        """The body parsed as JSON."""
        return _json.loads(self.content)

    @property
    def is_success(self) -> bool:
        """Whether the status is 2xx."""
        return 200 <= self.status_code < 300

    def __repr__(self) -> str:
        return f"<TestResponse {self.method} {self.url} [{self.status_code}]>"


class TestClient:
    """Sends requests to ``app`` in-process. Use it as a context manager to
    run the app's lifecycle as ``listen`` does: on entry an engine a previous
    ``with`` shut down is started again (same options, hooks and schedules),
    and the engine takes back
    tasks of dead processes (with a store) and the dashboard starts; on exit
    the server stops (in-flight requests finish) and the engine shuts down,
    waiting for its tasks. Without ``with``, requests are served all the same
    and the engine is left alone; ``close()`` stops the server.

    ``base_url`` gives the ``Host`` header; ``headers`` are sent with every
    request; cookies the app sets are kept and sent back, as a browser would.
    ``timeout`` bounds each response (``TimeoutError`` past it, e.g. for an
    endless stream). An exception a handler raises is raised again in the
    test, with its traceback, once the server answered 500 and logged it;
    with ``raise_server_exceptions=False`` the test gets the 500 response."""

    __test__ = False  # not a test class, for pytest

    def __init__(
        self,
        app: Catzilla,
        *,
        base_url: str = "http://testserver",
        headers: Mapping[str, str] | None = None,
        cookies: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        raise_server_exceptions: bool = True,
    ) -> None:
        parts = urlsplit(base_url)
        if (
            parts.scheme not in ("http", "https")
            or not parts.netloc
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
        ):
            # NOTE: a path prefix is refused rather than half-supported: the
            # requests' urls are the server's paths, and an absolute url is
            # checked against scheme://host only.
            raise ValueError(
                f"base_url must look like 'http://host[:port]', with no path, got {base_url!r}"
            )
        self.app = app
        self.base_url = base_url.rstrip("/")
        self._host = parts.netloc
        self.headers = dict(headers or {})
        self.cookies: dict[str, str] = dict(cookies or {})
        self.timeout = float(timeout)
        self.raise_server_exceptions = raise_server_exceptions
        self._server: Server | None = None
        self._lifecycle = False
        self._closed = False
        # One server however many threads send the first requests at once.
        self._server_lock = threading.Lock()

    # Lifecycle

    def __enter__(self) -> TestClient:
        self._start_server()
        self._lifecycle = True
        app = self.app
        try:
            if app.tasks is not None and app.tasks.is_shutdown and not app.tasks.is_forked:
                app._restart_engine()  # a previous ``with`` shut it down
            if app.tasks is not None and app._engine().config["storage"] is not None:
                app._engine().recover()
            if app._dashboard is not None:
                app._dashboard.start()
        except BaseException:
            # __exit__ does not run when __enter__ raises: stop what started,
            # as listen does when its start fails.
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stops the server; after ``with``, also shuts the engine down
        (waiting for its tasks up to its ``exit_timeout``) and the dashboard."""
        with self._server_lock:
            server, self._server = self._server, None
            self._closed = True
        app = self.app
        try:
            if server is not None:
                server.stop(app.shutdown_grace)
                if app._server is server:
                    app._server = None
            if self._lifecycle and app.tasks is not None and not app.tasks.is_shutdown:
                app.tasks.shutdown(wait_for_completion=True, timeout=app.tasks.exit_timeout)
        finally:
            if self._lifecycle and app._dashboard is not None:
                app._dashboard.stop()
            self._lifecycle = False

    def _start_server(self) -> Server:
        with self._server_lock:
            if self._closed:
                raise RuntimeError("this TestClient is closed; make a new one")
            if self._server is None:
                server = self.app._new_server()
                server.serve_in_memory()
                self._server = server
                if self.app._server is None:
                    self.app._server = server  # what metrics read the HTTP counts from
            return self._server

    # Requests

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Params | None = None,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        data: Mapping[str, Any] | str | bytes | None = None,
        content: str | bytes | None = None,
        cookies: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> TestResponse:
        """Sends one request and returns its whole response. Give at most one
        body: ``json`` (sent as JSON), ``data`` (a dict is sent as a form,
        str/bytes as they are) or ``content`` (raw)."""
        if sum(x is not None for x in (json, data, content)) > 1:
            raise ValueError("give at most one of json, data and content")
        target = self._target(url, params)
        sent: dict[str, str] = {"host": self._host}
        body = b""
        if json is not None:
            body = _json.dumps(json, separators=(",", ":")).encode()
            sent["content-type"] = "application/json"
        elif isinstance(data, Mapping):
            body = urlencode(_pairs(data)).encode()
            sent["content-type"] = "application/x-www-form-urlencoded"
        elif data is not None or content is not None:
            raw = data if data is not None else content
            body = raw.encode() if isinstance(raw, str) else bytes(raw)  # type: ignore[arg-type]
        for extra in (self.headers, headers or {}):
            sent.update({k.lower(): v for k, v in extra.items()})
        jar = {**self.cookies, **(cookies or {})}
        if jar and "cookie" not in sent:
            sent["cookie"] = "; ".join(f"{k}={v}" for k, v in jar.items())
        if body or method.upper() in ("POST", "PUT", "PATCH"):
            sent["content-length"] = str(len(body))
        server = self._start_server()
        status, got, answer, raised = server.exchange(
            method.upper(),
            target,
            list(sent.items()),
            body,
            self.timeout if timeout is None else float(timeout),
        )
        response = TestResponse(method.upper(), target, status, Headers(got), answer)
        self._keep_cookies(response.headers.get_list("set-cookie"))
        if raised is not None and self.raise_server_exceptions:
            raise raised
        return response

    def get(self, url: str, **kwargs: Any) -> TestResponse:
        """A GET request; see ``request``."""
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> TestResponse:
        """A POST request; see ``request``."""
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> TestResponse:
        """A PUT request; see ``request``."""
        return self.request("PUT", url, **kwargs)

    def patch(self, url: str, **kwargs: Any) -> TestResponse:
        """A PATCH request; see ``request``."""
        return self.request("PATCH", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> TestResponse:
        """A DELETE request; see ``request``."""
        return self.request("DELETE", url, **kwargs)

    def head(self, url: str, **kwargs: Any) -> TestResponse:
        """A HEAD request; see ``request``."""
        return self.request("HEAD", url, **kwargs)

    def options(self, url: str, **kwargs: Any) -> TestResponse:
        """An OPTIONS request; see ``request``."""
        return self.request("OPTIONS", url, **kwargs)

    def _target(self, url: str, params: Params | None) -> str:
        parts = urlsplit(url)
        if parts.scheme or parts.netloc:
            if f"{parts.scheme}://{parts.netloc}" != self.base_url:
                raise ValueError(f"url {url!r} is not under base_url {self.base_url!r}")
        path = parts.path or "/"
        if not path.startswith("/"):
            raise ValueError(f"url must be a path starting with '/', got {url!r}")
        query = parts.query
        if params:
            extra = urlencode(_pairs(params))
            query = f"{query}&{extra}" if query else extra
        return f"{path}?{query}" if query else path

    def _keep_cookies(self, lines: list[str]) -> None:
        for line in lines:
            jar: SimpleCookie = SimpleCookie()
            jar.load(line)
            for name, morsel in jar.items():
                if morsel.value == "" or _expired(morsel):
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value


def _expired(morsel: Morsel[str]) -> bool:
    """Whether a Set-Cookie line removes its cookie: a ``Max-Age`` of zero or
    less, or (without ``Max-Age``, which wins) an ``Expires`` in the past."""
    max_age = morsel["max-age"]
    if max_age:
        try:
            return int(max_age) <= 0
        except ValueError:
            pass  # unreadable: ignored, as a browser does
    expires = morsel["expires"]
    if not expires:
        return False
    try:
        when = parsedate_to_datetime(expires)
    except (TypeError, ValueError):
        return False
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when <= datetime.now(UTC)


def _pairs(values: Params) -> list[tuple[str, str]]:
    """Query or form fields as pairs; a list value repeats its key."""
    items = values.items() if isinstance(values, Mapping) else values
    pairs: list[tuple[str, str]] = []
    for key, value in items:
        for one in value if isinstance(value, (list, tuple)) else [value]:
            pairs.append((str(key), _text(one)))
    return pairs


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
