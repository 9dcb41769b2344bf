"""``catzilla.testing.TestClient``: requests sent in-process, over an
in-memory connection, to the app's real server. What a test sees must be
what a client would: routing, parameters, bodies, headers, status codes,
response conversion, cookies, streaming, metrics; and ``with`` runs the
app's lifecycle (the engine shut down on exit, after its tasks ran)."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from catzilla import (
    Catzilla,
    Form,
    HTMLResponse,
    HTTPError,
    JSONResponse,
    Query,
    Request,
    Response,
    StreamingResponse,
)
from catzilla.background_tasks import EngineShutdownError, TaskStatus
from catzilla.testing import Headers, TestClient, TestResponse
from helpers import DEADLINE, Recorder, run_python, wait_until

MakeApp = Callable[..., Catzilla]


@pytest.fixture
def make_app() -> Iterator[MakeApp]:
    """Builds apps (``Catzilla(**options)``, background tasks with two
    workers unless ``tasks=False``); at teardown every engine still running
    is shut down, so a failing test leaves no worker behind."""
    apps: list[Catzilla] = []

    def make(tasks: bool = True, **options: Any) -> Catzilla:
        app = Catzilla(**options)
        if tasks:
            app.enable_background_tasks(workers=2, retry_backoff_ms=10)
        apps.append(app)
        return app

    yield make
    for app in apps:
        if app.tasks is not None and not app.tasks.is_shutdown:
            app.tasks.shutdown(wait_for_completion=False, timeout=1)


def add_routes(app: Catzilla) -> None:
    """The routes most tests call."""

    @app.get("/items/{item_id}")
    def get_item(
        request: Request,
        item_id: int,
        q: str = Query(""),
        tag: list[int] = Query([]),  # noqa: B008
    ) -> dict[str, Any]:
        return {"item_id": item_id, "q": q, "tag": tag, "query": request.query_string}

    @app.get("/async/{name}")
    async def async_hello(request: Request, name: str) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"hello": name, "method": request.method}

    @app.route("/echo", methods=["POST", "PUT", "PATCH", "DELETE"])
    def echo(request: Request) -> dict[str, Any]:
        return {
            "method": request.method,
            "body": request.body.decode("latin-1"),
            "content_type": request.headers.get("content-type"),
            "content_length": request.headers.get("content-length"),
        }

    @app.post("/json")
    def take_json(request: Request) -> dict[str, Any]:
        return {"got": request.json()}

    @app.post("/form")
    def take_form(name: str = Form(...), colors: list[str] = Form([])) -> dict[str, Any]:  # noqa: B008
        return {"name": name, "colors": colors}

    @app.get("/headers")
    def headers(request: Request) -> dict[str, Any]:
        return dict(request.headers)

    @app.get("/text")
    def text(request: Request) -> str:
        return "plain text ✓"

    @app.get("/bytes")
    def raw(request: Request) -> bytes:
        return b"\x00\x01\xff"

    @app.get("/nothing")
    def nothing(request: Request) -> None:
        return None

    @app.get("/html")
    def html(request: Request) -> Response:
        return HTMLResponse("<h1>hi</h1>")

    @app.post("/created")
    def created(request: Request) -> Response:
        return JSONResponse(
            {"id": 7}, status_code=201, headers={"Location": "/things/7", "X-Request-Kind": "new"}
        )

    @app.get("/teapot")
    def teapot(request: Request) -> Response:
        raise HTTPError(418, "I'm a teapot")

    @app.get("/boom")
    def boom(request: Request) -> Response:
        raise RuntimeError("the handler blew up")


# Handlers, parameters and bodies


def test_sync_and_async_handlers_with_path_and_query_params(make_app: MakeApp):
    app = make_app(tasks=False)
    add_routes(app)
    with TestClient(app) as client:
        r = client.get("/items/42", params={"q": "cats & dogs", "tag": [1, 2, 3]})
        assert r.status_code == 200 and r.is_success
        assert r.json() == {
            "item_id": 42,
            "q": "cats & dogs",
            "tag": [1, 2, 3],
            "query": "q=cats+%26+dogs&tag=1&tag=2&tag=3",
        }
        assert r.url == "/items/42?q=cats+%26+dogs&tag=1&tag=2&tag=3"
        assert r.method == "GET"
        # params as pairs, added to a query already in the url
        r = client.get("/items/1?q=first", params=[("tag", 5), ("tag", 6)])
        assert r.json()["q"] == "first" and r.json()["tag"] == [5, 5 + 1]
        # a path parameter that does not convert is the server's 422
        r = client.get("/items/abc")
        assert r.status_code == 422 and not r.is_success
        assert r.json()["detail"][0]["loc"][0] == "path"

        r = client.get("/async/Ada")
        assert r.status_code == 200
        assert r.json() == {"hello": "Ada", "method": "GET"}


def test_bodies_json_form_and_raw_content(make_app: MakeApp):
    app = make_app(tasks=False)
    add_routes(app)
    with TestClient(app) as client:
        r = client.post("/json", json={"name": "Ada", "langs": ["en", "fr"], "n": None})
        assert r.json() == {"got": {"name": "Ada", "langs": ["en", "fr"], "n": None}}
        r = client.post("/echo", json=[1, 2])
        assert r.json()["content_type"] == "application/json"
        assert r.json()["body"] == "[1,2]" and r.json()["content_length"] == "5"

        r = client.post("/form", data={"name": "Ann", "colors": ["red", "blue"]})
        assert r.json() == {"name": "Ann", "colors": ["red", "blue"]}
        r = client.post("/echo", data={"a": "1 2", "b": True})
        assert r.json()["content_type"] == "application/x-www-form-urlencoded"
        assert r.json()["body"] == "a=1+2&b=true"

        r = client.put("/echo", content=b"\x00raw\xff", headers={"Content-Type": "x/raw"})
        assert r.json() == {
            "method": "PUT",
            "body": "\x00raw\xff",
            "content_type": "x/raw",
            "content_length": "5",
        }
        assert client.patch("/echo", content="text ✓").json()["body"] == "text ✓".encode().decode(
            "latin-1"
        )
        assert client.patch("/echo", data="as is").json()["body"] == "as is"
        # A POST without a body says so (Content-Length: 0), as curl -X POST does.
        r = client.post("/echo")
        assert r.json()["body"] == "" and r.json()["content_length"] == "0"
        assert client.delete("/echo").json()["method"] == "DELETE"

        with pytest.raises(ValueError, match="at most one of json, data and content"):
            client.post("/echo", json={}, content=b"x")
        # invalid JSON is the server's 400
        assert (
            client.post(
                "/json", content=b"{nope", headers={"content-type": "application/json"}
            ).status_code
            == 400
        )


def test_headers_are_sent_and_read_in_any_case(make_app: MakeApp):
    app = make_app(tasks=False)
    add_routes(app)
    with TestClient(app, headers={"X-Default": "always", "User-Agent": "tests"}) as client:
        got = client.get("/headers", headers={"X-Trace-ID": "abc", "x-default": "once"}).json()
        assert got["host"] == "testserver"
        assert got["x-trace-id"] == "abc"
        assert got["x-default"] == "once"  # the request's own wins over the client's
        assert got["user-agent"] == "tests"
        assert client.get("/headers").json()["x-default"] == "always"

        r = client.post("/created")
        assert r.status_code == 201
        for name in ("Location", "location", "LOCATION"):
            assert r.headers[name] == "/things/7"
            assert name in r.headers
        assert r.headers.get("x-request-kind") == "new"
        assert r.headers.get_list("X-Request-Kind") == ["new"]
        assert r.headers.get("x-missing") is None and r.headers.get_list("x-missing") == []
        with pytest.raises(KeyError):
            r.headers["x-missing"]
        assert "content-type" in list(r.headers) and len(r.headers) == len(set(r.headers))
    # a repeated header reads joined, and apart with get_list
    h = Headers([("Set-Cookie", "a=1"), ("set-cookie", "b=2"), ("X-One", "1")])
    assert h["SET-COOKIE"] == "a=1, b=2" and h.get_list("Set-Cookie") == ["a=1", "b=2"]
    assert list(h) == ["set-cookie", "x-one"] and len(h) == 2


def test_status_codes(make_app: MakeApp, caplog: pytest.LogCaptureFixture):
    app = make_app(tasks=False, max_body_size=64)
    add_routes(app)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/no/such/page").status_code == 404
        r = client.delete("/items/1")
        assert r.status_code == 405
        assert "GET" in r.headers["allow"]
        assert client.post("/echo", content=b"x" * 64).status_code == 200
        r = client.post("/echo", content=b"x" * 65)
        assert r.status_code == 413 and not r.is_success
        r = client.get("/teapot")
        assert r.status_code == 418 and "teapot" in r.text

        with caplog.at_level(logging.ERROR, logger="catzilla.http"):
            r = client.get("/boom")
            assert r.status_code == 500
            assert "the handler blew up" not in r.text  # no traceback for the client
            wait_until(
                lambda: any(
                    rec.exc_info and "the handler blew up" in str(rec.exc_info[1])
                    for rec in caplog.records
                ),
                what="the handler's exception in the log",
            )
        # the server goes on serving after a handler raised
        assert client.get("/text").status_code == 200


def test_what_handlers_return_becomes_the_response(make_app: MakeApp):
    app = make_app(tasks=False)
    add_routes(app)
    with TestClient(app) as client:
        r = client.get("/text")
        assert r.status_code == 200 and r.text == "plain text ✓"
        assert r.headers["content-type"].startswith("text/plain")
        assert r.content == "plain text ✓".encode()

        r = client.get("/bytes")
        assert r.content == b"\x00\x01\xff"
        assert r.headers["content-type"] == "application/octet-stream"

        r = client.get("/nothing")
        assert r.status_code == 204 and r.content == b"" and r.is_success

        r = client.get("/html")
        assert r.text == "<h1>hi</h1>" and r.headers["content-type"].startswith("text/html")

        r = client.post("/created")
        assert (r.status_code, r.json()) == (201, {"id": 7})

        r = client.head("/text")
        assert r.status_code == 200 and r.content == b""
        assert r.headers["content-length"] == str(len("plain text ✓".encode()))
        assert repr(r) == "<TestResponse HEAD /text [200]>"


def test_text_uses_the_charset_of_the_content_type(make_app: MakeApp):
    app = make_app(tasks=False)

    @app.get("/latin")
    def latin(request: Request) -> Response:
        return Response("café".encode("latin-1"), content_type="text/plain; charset=latin-1")

    with TestClient(app) as client:
        r = client.get("/latin")
        assert r.content == b"caf\xe9" and r.text == "café"


def test_options_requests_reach_options_routes(make_app: MakeApp):
    app = make_app(tasks=False)

    @app.route("/cors", methods=["OPTIONS"])
    def preflight(request: Request) -> Response:
        return Response(status_code=204, headers={"Access-Control-Allow-Methods": "GET, POST"})

    with TestClient(app) as client:
        r = client.options("/cors")
        assert r.status_code == 204
        assert r.headers["access-control-allow-methods"] == "GET, POST"
        assert client.request("options", "/cors").status_code == 204


# Cookies


def test_cookies_set_by_the_app_are_sent_back(make_app: MakeApp):
    app = make_app(tasks=False)

    @app.post("/login")
    def login(request: Request) -> Response:
        return Response("in", headers={"Set-Cookie": "session=s3cr3t; Path=/; HttpOnly"})

    @app.post("/logout")
    def logout(request: Request) -> Response:
        return Response("out", headers={"Set-Cookie": "session=; Max-Age=0; Path=/"})

    @app.get("/me")
    def me(request: Request) -> dict[str, Any]:
        return {"cookie": request.headers.get("cookie")}

    with TestClient(app, cookies={"theme": "dark"}) as client:
        assert client.get("/me").json() == {"cookie": "theme=dark"}
        client.post("/login")
        assert client.cookies == {"theme": "dark", "session": "s3cr3t"}
        assert client.get("/me").json() == {"cookie": "theme=dark; session=s3cr3t"}
        # per-request cookies add to (and override) the kept ones, for that request
        got = client.get("/me", cookies={"theme": "light", "extra": "1"}).json()
        assert got == {"cookie": "theme=light; session=s3cr3t; extra=1"}
        assert client.cookies == {"theme": "dark", "session": "s3cr3t"}
        # a Cookie header given by the test wins over the jar
        assert client.get("/me", headers={"Cookie": "only=me"}).json() == {"cookie": "only=me"}
        client.post("/logout")
        assert client.cookies == {"theme": "dark"}
        assert client.get("/me").json() == {"cookie": "theme=dark"}


def test_a_cookie_expired_by_the_app_is_dropped(make_app: MakeApp):
    app = make_app(tasks=False)

    @app.get("/set/{value}")
    def set_cookie(request: Request, value: str) -> Response:
        return Response("", headers={"Set-Cookie": f"sid={value}; Path=/; Max-Age=60"})

    @app.get("/expire/{how}")
    def expire(request: Request, how: str) -> Response:
        line = {
            "past": "sid=deleted; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Path=/",
            "negative": "sid=x; Max-Age=-5",
            # Max-Age wins over Expires
            "max-age-wins": "sid=kept; Max-Age=60; Expires=Thu, 01 Jan 1970 00:00:00 GMT",
        }[how]
        return Response("", headers={"Set-Cookie": line})

    with TestClient(app) as client:
        for how in ("past", "negative"):
            client.get("/set/1")
            assert client.cookies == {"sid": "1"}
            client.get(f"/expire/{how}")
            assert client.cookies == {}, how
        client.get("/expire/max-age-wins")
        assert client.cookies == {"sid": "kept"}


def test_dashboard_login_works_through_the_cookie_jar(make_app: MakeApp):
    app = make_app()
    app.enable_dashboard(token="a-test-token")
    with TestClient(app) as client:
        r = client.get("/_catzilla")
        assert r.status_code == 401 and "www-authenticate" in r.headers
        assert client.post("/_catzilla/login", data={"token": "wrong"}).status_code == 401
        r = client.post("/_catzilla/login", data={"token": "a-test-token"})
        assert r.status_code == 303 and r.headers["location"] == "/_catzilla"
        assert client.cookies  # the session cookie is kept...
        r = client.get("/_catzilla")  # ... and opens the page
        assert r.status_code == 200 and 'name="csrf-token"' in r.text
        assert client.get("/_catzilla/api/snapshot").status_code == 200
    assert app.tasks is not None and app.tasks.is_shutdown


def test_a_tokenless_dashboard_answers_a_loopback_host_only(make_app: MakeApp):
    app = make_app()
    app.enable_dashboard()
    with TestClient(app) as client:
        assert client.get("/_catzilla").status_code == 401  # Host: testserver
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        assert client.get("/_catzilla").status_code == 200


# Streaming


def test_a_stream_that_ends_is_collected(make_app: MakeApp):
    app = make_app(tasks=False)

    @app.get("/lines")
    def lines(request: Request) -> Response:
        return StreamingResponse((f"line {n}\n" for n in range(100)), media_type="text/csv")

    @app.get("/async-lines")
    def async_lines(request: Request) -> Response:
        async def produce() -> AsyncIterator[bytes]:
            for n in range(5):
                await asyncio.sleep(0)
                yield f"chunk {n};".encode()

        return StreamingResponse(produce(), headers={"X-Stream": "yes"})

    with TestClient(app) as client:
        r = client.get("/lines")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        assert r.text == "".join(f"line {n}\n" for n in range(100))
        r = client.get("/async-lines")
        assert r.content == b"chunk 0;chunk 1;chunk 2;chunk 3;chunk 4;"
        assert r.headers["x-stream"] == "yes"


def test_an_endless_stream_raises_timeout_error_and_is_cut_off(make_app: MakeApp):
    app = make_app(tasks=False)
    stopped = threading.Event()
    chunks = Recorder()

    @app.get("/forever")
    def forever(request: Request) -> Response:
        async def produce() -> AsyncIterator[str]:
            try:
                while True:
                    chunks.append(1)
                    yield "tick\n"
                    await asyncio.sleep(0.01)
            finally:
                stopped.set()

        return StreamingResponse(produce())

    with TestClient(app, timeout=DEADLINE) as client:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="GET /forever"):
            client.get("/forever", timeout=0.3)
        assert 0.3 <= time.monotonic() - started < DEADLINE
        assert len(chunks) > 0
        # the client went away: the stream's producer is stopped
        assert stopped.wait(DEADLINE), "the endless stream went on after the timeout"
        # and the client goes on working
        with pytest.raises(TimeoutError):
            client.get("/forever", timeout=0.05)


# URLs


def test_base_url_validation_and_absolute_urls(make_app: MakeApp):
    app = make_app(tasks=False)
    add_routes(app)
    for bad in ("testserver", "ftp://testserver", "http://", "/relative"):
        with pytest.raises(ValueError, match="base_url"):
            TestClient(app, base_url=bad)
    with pytest.raises(ValueError, match="base_url"):
        TestClient(app, base_url="http://testserver/api")  # a path prefix is not supported

    with TestClient(app, base_url="https://api.example.com:8443/") as client:
        assert client.base_url == "https://api.example.com:8443"
        r = client.get("https://api.example.com:8443/headers")
        assert r.status_code == 200 and r.json()["host"] == "api.example.com:8443"
        r = client.get("https://api.example.com:8443/items/3?q=x", params={"tag": 1})
        assert r.json()["item_id"] == 3 and r.json()["tag"] == [1]
        assert r.url == "/items/3?q=x&tag=1"
        for elsewhere in ("http://api.example.com:8443/headers", "https://other.example/headers"):
            with pytest.raises(ValueError, match="not under base_url"):
                client.get(elsewhere)
        with pytest.raises(ValueError, match="starting with '/'"):
            client.get("headers")


# Lifecycle


def test_without_with_requests_are_served_and_the_engine_is_left_alone(make_app: MakeApp):
    app = make_app()
    ran = Recorder()

    @app.post("/work/{n}")
    def work(request: Request, n: int) -> dict[str, Any]:
        return {"task_id": app.add_task(ran.append, n).task_id}

    client = TestClient(app)
    r = client.post("/work/1")
    assert r.status_code == 200
    handle = app.get_task_result(r.json()["task_id"])
    assert handle is not None and handle.wait(DEADLINE) == 1
    assert app._server is not None  # metrics read the server that serves
    client.close()
    assert app._server is None
    assert app.tasks is not None and not app.tasks.is_shutdown
    assert app.add_task(ran.append, 2).wait(DEADLINE) == 2
    assert ran.snapshot() == [1, 2]
    client.close()  # closing twice is harmless
    with pytest.raises(RuntimeError, match="closed"):
        client.post("/work/3")  # nothing would stop a server started now


def test_with_runs_the_lifecycle_and_exit_waits_for_tasks(make_app: MakeApp):
    app = make_app()
    ran = Recorder()
    started = threading.Event()

    def slow(n: int) -> int:
        started.set()
        time.sleep(0.3)  # still running when the client exits
        ran.append(n)
        return n

    @app.post("/jobs")
    def queue(request: Request, n: int = Query(...), slow_job: bool = Query(False)) -> Response:
        handle = app.add_task(slow if slow_job else ran.append, n)
        return JSONResponse({"task_id": handle.task_id}, status_code=202)

    assert app.tasks is not None
    with TestClient(app) as client:
        ids = [client.post("/jobs", params={"n": n}).json()["task_id"] for n in range(5)]
        done = app.tasks.drain(timeout=DEADLINE)
        assert sorted(t.task_id for t in done) == sorted(ids)
        assert all(t.status is TaskStatus.COMPLETED for t in done)
        assert sorted(ran.snapshot()) == [0, 1, 2, 3, 4]

        last = client.post("/jobs", params={"n": 99, "slow_job": True}).json()["task_id"]
        assert started.wait(DEADLINE)
        handle = app.get_task_result(last)
        assert handle is not None and handle.status is TaskStatus.RUNNING
    assert app.tasks.is_shutdown
    assert handle.status is TaskStatus.COMPLETED and handle.result() == 99
    assert ran.snapshot()[-1] == 99
    with pytest.raises(EngineShutdownError):
        app.add_task(ran.append, 100)


def test_with_an_app_without_tasks(make_app: MakeApp):
    app = make_app(tasks=False)
    add_routes(app)
    with TestClient(app) as client:
        assert client.get("/text").status_code == 200
    assert app.tasks is None and app._server is None


def test_a_handler_s_exception_is_raised_in_the_test(make_app: MakeApp):
    app = make_app(tasks=False)
    add_routes(app)

    @app.get("/async-boom/{n}")
    async def async_boom(request: Request, n: int) -> dict[str, int]:
        raise KeyError(f"missing {n}")

    with TestClient(app) as client:
        with pytest.raises(RuntimeError, match="the handler blew up") as raised:
            client.get("/boom")
        # with the handler's own frames in its traceback
        assert any(f.name == "boom" for f in traceback.extract_tb(raised.value.__traceback__))
        with pytest.raises(KeyError, match="missing 7"):
            client.get("/async-boom/7", params={"q": "x"})
        assert client.get("/items/3").status_code == 200  # the server carries on
        # HTTPError is an answer, not a failure
        assert client.get("/teapot").status_code == 418


def test_metrics_count_the_requests_made_through_the_client(make_app: MakeApp):
    app = make_app()
    app.enable_metrics()
    add_routes(app)
    with TestClient(app, raise_server_exceptions=False) as client:
        for n in range(3):
            assert client.get(f"/items/{n}").status_code == 200
        assert client.get("/boom").status_code == 500
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        metrics = r.text
    assert (
        'catzilla_http_requests_total{method="GET",route="/items/{item_id}",status="200"} 3.0'
        in metrics
    )
    assert 'catzilla_http_requests_total{method="GET",route="/boom",status="500"} 1.0' in metrics


def test_two_clients_of_two_apps_at_once(make_app: MakeApp):
    first, second = make_app(), make_app()

    @first.get("/who")
    def who_first(request: Request) -> str:
        return "first"

    @second.get("/who")
    def who_second(request: Request) -> str:
        return "second"

    @second.get("/only-second")
    def only_second(request: Request) -> str:
        return "yes"

    with TestClient(first) as a, TestClient(second) as b:
        for _ in range(3):
            assert a.get("/who").text == "first"
            assert b.get("/who").text == "second"
        assert a.get("/only-second").status_code == 404
        assert b.get("/only-second").text == "yes"
        assert first.tasks is not None and second.tasks is not None
        one = first.add_task(lambda: "one")
        two = second.add_task(lambda: "two")
        assert [t.result() for t in first.tasks.drain(DEADLINE)] == ["one"]
        assert [t.result() for t in second.tasks.drain(DEADLINE)] == ["two"]
        assert one.result() == "one" and two.result() == "two"
    assert first.tasks.is_shutdown and second.tasks.is_shutdown


def test_requests_from_threads_are_served_concurrently(make_app: MakeApp):
    app = make_app(tasks=False, handler_threads=4)
    barrier = threading.Barrier(4, timeout=DEADLINE)

    @app.get("/together/{n}")
    def together(request: Request, n: int) -> dict[str, int]:
        barrier.wait()  # returns only once four requests are in handlers at once
        return {"n": n}

    answers: list[TestResponse] = []
    with TestClient(app) as client:
        threads = [
            threading.Thread(target=lambda n=n: answers.append(client.get(f"/together/{n}")))
            for n in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE)
    assert sorted(r.json()["n"] for r in answers) == [0, 1, 2, 3]


def test_first_requests_from_threads_at_once_start_one_server(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch
):
    app = make_app(tasks=False)

    @app.get("/")
    def root(request: Request) -> dict[str, int]:
        return {"ok": 1}

    made: list[Any] = []
    new_server = app._new_server

    def slow_new_server(**options: Any) -> Any:
        server = new_server(**options)
        made.append(server)
        time.sleep(0.05)  # widens the window between the check and the start
        return server

    monkeypatch.setattr(app, "_new_server", slow_new_server)
    client = TestClient(app)  # no with: the first request starts the server
    barrier = threading.Barrier(4, timeout=DEADLINE)

    def first_request() -> None:
        barrier.wait()
        assert client.get("/").status_code == 200

    threads = [threading.Thread(target=first_request) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    client.close()
    assert len(made) == 1  # none started and left running


def test_the_client_from_async_code(make_app: MakeApp):
    app = make_app(tasks=False, handler_threads=4)
    add_routes(app)
    barrier = threading.Barrier(3, timeout=DEADLINE)

    @app.get("/meet")
    def meet(request: Request) -> str:
        barrier.wait()
        return "met"

    async def main(client: TestClient) -> list[Any]:
        # A call straight from a coroutine blocks the loop, not the server.
        direct = client.get("/async/loop").json()
        # Calls on threads run at once: all three meet in their handlers.
        met = await asyncio.gather(*(asyncio.to_thread(client.get, "/meet") for _ in range(3)))
        return [direct, [r.text for r in met]]

    with TestClient(app) as client:
        direct, met = asyncio.run(main(client))
    assert direct == {"hello": "loop", "method": "GET"}
    assert met == ["met"] * 3


def test_tasks_queued_by_async_handlers_run(make_app: MakeApp):
    app = make_app()

    async def double(n: int) -> int:
        await asyncio.sleep(0)
        return n * 2

    @app.post("/double/{n}")
    async def queue(request: Request, n: int) -> dict[str, str]:
        return {"task_id": app.add_task(double, n).task_id}

    assert app.tasks is not None
    with TestClient(app) as client:
        ids = [client.post(f"/double/{n}").json()["task_id"] for n in range(3)]
        done = {t.task_id: t.result() for t in app.tasks.drain(DEADLINE)}
        assert done == {ids[0]: 0, ids[1]: 2, ids[2]: 4}


RECOVERY_JOBS = """
import os


def die_in_child(tag):
    if os.environ.get("DIE_HERE") == "1":
        os._exit(3)  # the process dies holding the task's lease
    return f"recovered {tag}"
"""


def test_with_takes_back_the_tasks_of_a_dead_process_with_a_store(
    make_app: MakeApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    (tmp_path / "tc_recovery_jobs.py").write_text(RECOVERY_JOBS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tc_recovery_jobs", raising=False)
    store = f"sqlite:///{tmp_path / 'tasks.db'}"
    child = run_python(
        f"""
        import os, sys
        sys.path.insert(0, {str(tmp_path)!r})
        os.environ["DIE_HERE"] = "1"
        import tc_recovery_jobs
        from catzilla.background_tasks import BackgroundTasks

        engine = BackgroundTasks(workers=1, storage={store!r})
        print(engine.add_task(tc_recovery_jobs.die_in_child, "a").task_id, flush=True)
        engine.drain(30)  # never returns: the task kills the process
        """,
        what="a process that dies running its task",
    )
    assert child.returncode == 3, child.stderr
    task_id = child.stdout.strip()

    app = make_app(tasks=False)
    app.enable_background_tasks(workers=1, storage=store)
    assert app.tasks is not None
    # Without the lifecycle the task stays leased by the dead process.
    client = TestClient(app)
    assert app.tasks.drain(DEADLINE) == []
    client.close()
    with TestClient(app):  # takes it back on entry, as listen does
        [done] = app.tasks.drain(DEADLINE)
    assert done.task_id == task_id and done.result() == "recovered a"
    info = app.get_task(task_id)
    assert info is not None and info.status is TaskStatus.COMPLETED
    assert info.result == "recovered a"


def test_a_failed_start_stops_the_server_and_the_engine(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch
):
    app = make_app()
    dashboard = app.enable_dashboard()

    def broken() -> None:
        raise OSError("no sampler today")

    monkeypatch.setattr(dashboard, "start", broken)
    client = TestClient(app)
    with pytest.raises(OSError, match="no sampler today"), client:
        pytest.fail("the body ran although the start failed")
    assert client._server is None and app._server is None
    assert app.tasks is not None and app.tasks.is_shutdown


def test_each_with_block_gets_a_running_engine_with_the_app_s_schedules_and_hooks(
    make_app: MakeApp,
):
    app = make_app()
    ticks = Recorder()
    events = Recorder()

    @app.periodic(every=0.05, name="tick")
    def tick() -> None:
        ticks.append(1)

    @app.periodic(every=3600, name="paused")
    def hourly() -> None:
        ticks.append("hourly")

    app.list_periodic_tasks()[1].pause()

    @app.on_task_event("succeeded")
    def seen(event: Any) -> None:
        events.append(event.name)

    @app.post("/double/{n}")
    def double(request: Request, n: int) -> dict[str, str]:
        return {"task_id": app.add_task(pow, n, 2).task_id}

    first = app.tasks
    for round_ in range(2):
        with TestClient(app) as client:
            assert app.tasks is not None and not app.tasks.is_shutdown
            task_id = client.post(f"/double/{round_ + 3}").json()["task_id"]
            done = {t.task_id: t for t in app.tasks.drain(DEADLINE)}
            assert done[task_id].result() == (round_ + 3) ** 2
            assert "builtins.pow" in events.snapshot()  # hooks seen before drain returned
            schedules = {p.name: p for p in app.list_periodic_tasks()}
            assert set(schedules) == {"tick", "paused"}
            assert schedules["paused"].is_paused and not schedules["tick"].is_paused
            before = len(ticks.snapshot())
            wait_until(lambda b=before: len(ticks.snapshot()) > b, what="a tick in this block")
        assert app.tasks.is_shutdown
    assert app.tasks is not first  # the second block started a new engine
    assert "hourly" not in ticks.snapshot()


def test_each_request_gets_its_own_handler_s_exception(make_app: MakeApp):
    # Two requests to the same route at once: one's handler raises, the
    # other's answers 500 on purpose. Neither sees the other's outcome.
    app = make_app(tasks=False, handler_threads=2)
    both_in = threading.Barrier(2, timeout=DEADLINE)

    class Boom(Exception):
        pass

    @app.get("/x")
    def x(request: Request) -> Response:
        both_in.wait()
        if request.query_params.get("mode") == "raise":
            raise Boom("the raising request's")
        return Response("on purpose", status_code=500)

    outcomes: dict[str, object] = {}
    with TestClient(app) as client:

        def run(mode: str) -> None:
            try:
                outcomes[mode] = client.get("/x", params={"mode": mode}).status_code
            except Boom as exc:
                outcomes[mode] = str(exc)

        threads = [threading.Thread(target=run, args=(m,)) for m in ("plain", "raise")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE)
    assert outcomes == {"plain": 500, "raise": "the raising request's"}
