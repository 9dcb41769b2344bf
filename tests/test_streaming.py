"""Streaming responses and Server-Sent Events, end to end: apps served in this
process on a free port (as test_http.py's in-process tests do), read over
real sockets as the chunks arrive."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from catzilla import Catzilla, EventSourceResponse, ServerSentEvent, StreamingResponse
from helpers import DEADLINE, Client, Recorder, free_port, wait_until


class Serve:
    """Serves apps in this process on free ports (as test_http.py's in-process
    tests do); ``stop_all`` stops every one."""

    def __init__(self) -> None:
        self.threads: dict[int, threading.Thread] = {}
        self.apps: list[Catzilla] = []

    def __call__(self, app: Catzilla) -> Client:
        port = free_port()
        t = threading.Thread(target=app.listen, kwargs={"port": port}, daemon=True)
        t.start()
        self.threads[id(app)] = t
        self.apps.append(app)

        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=DEADLINE).close()
            except OSError:
                assert t.is_alive(), "listen ended"
                return False
            return True

        wait_until(up, what="the in-process server")
        return Client("127.0.0.1", port, timeout=DEADLINE)

    def stop_all(self) -> None:
        for app in self.apps:
            app.stop()
            t = self.threads[id(app)]
            t.join(DEADLINE)
            assert not t.is_alive(), "listen did not return after app.stop()"


@pytest.fixture
def serve() -> Iterator[Serve]:
    servers = Serve()
    yield servers
    servers.stop_all()


def app_with(make: Callable[[], StreamingResponse], **options) -> Catzilla:
    """An app whose GET /s answers ``make()``, and GET /ping."""
    app = Catzilla(**options)
    app.get("/s")(lambda: make())
    app.get("/ping")(lambda: {"pong": True})
    return app


@contextlib.contextmanager
def opened(client: Client, path: str = "/s") -> Iterator[http.client.HTTPResponse]:
    """A GET whose response body is read as the test goes; closed at the end."""
    conn = client.connection()
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        try:
            yield r
        finally:
            r.close()
    finally:
        conn.close()


def read_until(r: http.client.HTTPResponse, want: bytes, count: int = 1) -> bytes:
    """Reads the body as it arrives until it holds ``want`` (``count`` times);
    returns all read. A chunk that does not come in time fails on the socket
    timeout."""
    got = b""
    while got.count(want) < count:
        data = r.read1(1 << 16)
        if not data:
            pytest.fail(f"the stream ended before {want!r} came; got {got!r}")
        got += data
    return got


def sgen(items: list) -> Iterator:
    yield from items


async def agen(items: list) -> AsyncIterator:
    for item in items:
        yield item


def gated(kind: str, before: list, gate: threading.Event, after: list) -> Callable[[], object]:
    """A sync or async generator function: it yields ``before``, waits until
    ``gate`` is set, then yields ``after`` (raising an exception found there)."""

    def emit(item: object) -> object:
        if isinstance(item, BaseException):
            raise item
        return item

    def sync_gen() -> Iterator[object]:
        yield from before
        assert gate.wait(DEADLINE), "the gate was never set"
        yield from map(emit, after)

    async def async_gen() -> AsyncIterator[object]:
        for item in before:
            yield item
        assert await asyncio.to_thread(gate.wait, DEADLINE), "the gate was never set"
        for item in map(emit, after):
            yield item

    return sync_gen if kind == "sync" else async_gen


# The body


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_chunks_arrive_in_order_chunked_with_status_type_and_headers(serve: Serve, kind: str):
    items = ["one,", b"two,", "thr\u00e9e,", b"\x00\xff"]
    content = sgen if kind == "sync" else agen
    client = serve(
        app_with(
            lambda: StreamingResponse(
                content(items), status_code=201, headers={"x-extra": "yes"}, media_type="text/csv"
            )
        )
    )
    r = client.get("/s")
    assert r.status == 201
    assert r.header("transfer-encoding") == "chunked"
    assert r.header("content-length") is None
    assert r.header("content-type") == "text/csv"
    assert r.header("x-extra") == "yes"
    assert r.body == "one,two,thr\u00e9e,".encode() + b"\x00\xff"
    default = serve(app_with(lambda: StreamingResponse(sgen([b"x"]))))
    assert default.get("/s").header("content-type") == "application/octet-stream"


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_chunks_are_sent_as_produced_not_at_the_end(serve: Serve, kind: str):
    gate = threading.Event()
    gen = gated(kind, ["a"], gate, ["b"])
    client = serve(app_with(lambda: StreamingResponse(gen())))
    with opened(client) as r:
        assert read_until(r, b"a") == b"a"  # while the producer waits for the test
        gate.set()
        assert r.read() == b"b"


# The producer stops when the client leaves

RESPONSES = pytest.mark.parametrize(
    "response", [StreamingResponse, EventSourceResponse], ids=["stream", "sse"]
)


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def ticking(kind: str, rec: Recorder) -> Callable[[], object]:
    """An endless sync or async generator function, "tick" every 10 ms; when
    it is stopped it records how (the exception at its yield or await), then
    "closed" from its ``finally``."""

    def sync_gen() -> Iterator[str]:
        try:
            while True:
                yield "tick"
                time.sleep(0.01)
        except GeneratorExit:
            rec.append("GeneratorExit")
            raise
        finally:
            rec.append("closed")

    async def async_gen() -> AsyncIterator[str]:
        try:
            while True:
                yield "tick"
                await asyncio.sleep(0.01)
        except (GeneratorExit, asyncio.CancelledError) as exc:
            rec.append(type(exc).__name__)
            raise
        finally:
            rec.append("closed")

    return sync_gen if kind == "sync" else async_gen


def wait_stopped(rec: Recorder, kind: str) -> None:
    how = wait_until(lambda: "closed" in rec.snapshot() and rec.snapshot(), what="the finally")
    assert how[-2:] in (
        [["GeneratorExit", "closed"]]  # closed at its next yield
        if kind == "sync"
        else [["GeneratorExit", "closed"], ["CancelledError", "closed"]]
    ), how


@RESPONSES
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_endless_generator_is_stopped_when_the_client_leaves(
    serve: Serve, caplog: pytest.LogCaptureFixture, kind: str, response: type
):
    rec = Recorder()
    client = serve(app_with(lambda: response(ticking(kind, rec)())))
    with opened(client) as r:
        read_until(r, b"tick", count=3)
    wait_stopped(rec, kind)
    assert errors(caplog) == []


@RESPONSES
def test_async_generator_waiting_at_an_await_is_cancelled_when_the_client_leaves(
    serve: Serve, caplog: pytest.LogCaptureFixture, response: type
):
    rec = Recorder()

    async def stuck() -> AsyncIterator[str]:
        try:
            yield "only"
            await asyncio.Event().wait()  # never set: only a cancellation ends this
        except asyncio.CancelledError:
            rec.append("cancelled")
            raise
        finally:
            rec.append("closed")

    client = serve(app_with(lambda: response(stuck())))
    with opened(client) as r:
        read_until(r, b"only")
    wait_until(lambda: rec.snapshot() == ["cancelled", "closed"], what="the cancellation")
    assert errors(caplog) == []


def test_a_slow_client_holds_the_producer_back(serve: Serve):
    total, size = 1000, 1 << 20  # 1 GiB, if it were all produced at once
    chunk = b"x" * size
    produced = [0]
    finished = threading.Event()

    def big() -> Iterator[bytes]:
        for _ in range(total):
            produced[0] += 1
            yield chunk
        finished.set()

    client = serve(app_with(lambda: StreamingResponse(big())))
    with opened(client) as r:
        seen: list[int] = []

        def settled() -> bool:  # the same count three times, 100 ms apart
            seen.append(produced[0])
            return len(seen) >= 3 and len(set(seen[-3:])) == 1 and seen[-1] > 0

        wait_until(settled, interval=0.1, what="the producer to wait for the client")
        assert produced[0] < 200, f"{produced[0]} MiB produced for a client reading nothing"
        assert not finished.is_set()
        received = 0
        while data := r.read1(size):
            received += len(data)
    assert received == total * size
    assert finished.wait(DEADLINE), "the producer did not finish"
    assert produced[0] == total


# A failing producer


def logged(caplog: pytest.LogCaptureFixture, text: str) -> logging.LogRecord:
    """Waits for the record on ``catzilla.http`` whose exception names ``text``."""

    def find() -> logging.LogRecord | None:
        return next(
            (
                rec
                for rec in list(caplog.records)
                if rec.name == "catzilla.http" and rec.exc_info and text in str(rec.exc_info[1])
            ),
            None,
        )

    return wait_until(find, what=f"a log record with {text!r}")


FAILURES = pytest.mark.parametrize(
    ("bad", "error"),
    [(RuntimeError("kaboom-in-stream"), "kaboom-in-stream"), (42, "must be str or bytes")],
    ids=["raises", "int-chunk"],
)


@pytest.mark.parametrize("kind", ["sync", "async"])
@FAILURES
def test_a_failing_producer_cuts_the_stream_is_logged_and_the_server_carries_on(
    serve: Serve, caplog: pytest.LogCaptureFixture, kind: str, bad: object, error: str
):
    gate = threading.Event()
    gen = gated(kind, ["first,", "second,"], gate, [bad])
    client = serve(app_with(lambda: StreamingResponse(gen())))
    with caplog.at_level(logging.ERROR, logger="catzilla.http"):
        with opened(client) as r:
            assert read_until(r, b"second,") == b"first,second,"
            gate.set()
            with pytest.raises(http.client.IncompleteRead):
                r.read()  # no terminating chunk: the client sees a cut stream
        rec = logged(caplog, error)
    assert rec.levelno == logging.ERROR
    assert "cut short" in rec.getMessage()
    assert client.get("/ping").json() == {"pong": True}


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_chunks_queued_just_before_a_failure_still_reach_the_client(serve: Serve, kind: str):
    gate = threading.Event()
    gate.set()  # fail as soon as the two chunks are queued
    gen = gated(kind, ["first,", "second,"], gate, [RuntimeError("kaboom-in-stream")])
    client = serve(app_with(lambda: StreamingResponse(gen())))
    outcomes = []
    for _ in range(20):
        got = b""
        try:
            with opened(client) as r:
                with contextlib.suppress(http.client.IncompleteRead):
                    while data := r.read1(1 << 16):
                        got += data
        except http.client.RemoteDisconnected:
            got = b"<no response>"
        outcomes.append(got)
    assert outcomes == [b"first,second,"] * 20


# Server-Sent Events


def test_event_stream_wire_format_and_headers(serve: Serve):
    events = [
        {"a": 1},
        "l1\nl2",
        ServerSentEvent("d", event="x", id="7", retry=1000),
        ServerSentEvent(comment="c"),
    ]
    client = serve(app_with(lambda: EventSourceResponse(agen(events))))
    r = client.get("/s")
    assert r.status == 200
    assert r.header("content-type") == "text/event-stream; charset=utf-8"
    assert r.header("cache-control") == "no-cache"
    assert r.header("transfer-encoding") == "chunked"
    assert r.body == (
        b'data: {"a": 1}\n\ndata: l1\ndata: l2\n\nevent: x\nid: 7\nretry: 1000\ndata: d\n\n: c\n\n'
    )


def test_event_stream_from_a_plain_generator(serve: Serve):
    def events() -> Iterator[object]:
        yield ServerSentEvent("b", event="e", id="2")
        yield {"data": "b", "event": "e"}
        yield [1, "two"]
        yield ServerSentEvent("z")

    client = serve(app_with(lambda: EventSourceResponse(events())))
    r = client.get("/s")
    assert r.status == 200
    assert r.body == (
        b'event: e\nid: 2\ndata: b\n\ndata: {"data": "b", "event": "e"}\n\n'
        b'data: [1, "two"]\n\ndata: z\n\n'
    )


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_quiet_event_stream_sends_pings(serve: Serve, kind: str):
    gate = threading.Event()
    gen = gated(kind, ["first"], gate, ["second"])
    client = serve(app_with(lambda: EventSourceResponse(gen(), ping=0.05)))
    with opened(client) as r:
        got = read_until(r, b"data: first\n\n: ping\n\n")
        gate.set()
        got += r.read()
    assert re.fullmatch(rb"data: first\n\n(: ping\n\n)+data: second\n\n", got), got


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_stopping_the_server_ends_an_open_event_stream(
    serve: Serve, caplog: pytest.LogCaptureFixture, kind: str
):
    rec = Recorder()
    forever = ticking(kind, rec)
    grace = 10.0
    app = app_with(lambda: EventSourceResponse(forever()), shutdown_grace=grace)
    client = serve(app)
    with opened(client) as r:
        got = read_until(r, b"data: tick\n\n")
        began = time.monotonic()
        app.stop()
        # The stream ends cleanly (a complete chunked body, no IncompleteRead),
        # so an EventSource reconnects, to a server that is up.
        got += r.read()
        assert got.endswith(b"\n\n"), got
    listener = serve.threads[id(app)]
    listener.join(grace)
    assert not listener.is_alive(), "listen did not return"
    assert time.monotonic() - began < grace / 2, "the stop waited for the stream"
    wait_stopped(rec, kind)
    assert errors(caplog) == []


# Bad input


@pytest.mark.parametrize("content", ["text", b"bytes", 42, None])
def test_streaming_content_must_be_an_iterator(content: object):
    with pytest.raises(TypeError, match="content must be an iterator"):
        StreamingResponse(content)


@pytest.mark.parametrize(
    "kwargs",
    [{"event": "a\nb"}, {"id": "1\r"}, {"event": "x\0"}, {"retry": -1}, {"retry": 1.5}],
)
def test_invalid_event_fields_raise_value_error(kwargs: dict):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ServerSentEvent("d", **kwargs)


@pytest.mark.parametrize("ping", [0, -1, True, "5"])
def test_event_stream_ping_must_be_positive(ping: object):
    with pytest.raises(ValueError, match="ping must be"):
        EventSourceResponse([], ping=ping)


def test_event_stream_content_must_be_an_iterator():
    with pytest.raises(TypeError, match="content must be an iterator"):
        EventSourceResponse("text")
