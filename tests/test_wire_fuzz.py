"""Bad input on the wire: tests/wire_app.py served in a subprocess (one for the
whole module) and fed random bytes, mutated and truncated requests, broken
framing, oversized heads and bodies, invalid JSON, and slow or idle clients
over raw sockets.

Whatever arrives, the server must answer a 4xx (or close the connection)
within a deadline, never crash, and keep serving normal clients. These tests
complement the raw-socket ones of test_http.py.
"""

from __future__ import annotations

import json
import os
import re
import resource
import selectors
import socket
import string
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import DEADLINE, Client, ServerProcess, wait_until
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

APP = str(Path(__file__).with_name("wire_app.py"))
MAX_BODY = 256 * 1024  # wire_app.MAX_BODY
HEADER_READ_TIMEOUT = 2.0  # wire_app.HEADER_READ_TIMEOUT
BODY_READ_TIMEOUT = 1.0  # wire_app.BODY_READ_TIMEOUT
MAX_HEADERS = 100  # hyper's limit on the number of request headers
ATTACKERS = 500  # slow or idle connections in the slowloris tests
NORMAL_LATENCY = 5.0  # bound on a normal request while the server is under attack
# Long enough for any bad input to be answered, or cut off by a read timeout.
WIRE_DEADLINE = HEADER_READ_TIMEOUT + BODY_READ_TIMEOUT + DEADLINE

STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")
# 501 is the one 5xx a bad request may get: RFC 9112's answer to a transfer
# coding the server does not implement (anything but a single chunked).
CLIENT_ERROR = frozenset(range(400, 500)) | {501}
NOT_SERVER_ERROR = frozenset(range(100, 500)) | {501}


# The server


class Wire:
    """The served app: its address, and how to talk to it normally."""

    def __init__(self, proc: ServerProcess, host: str, port: int) -> None:
        self.proc = proc
        self.host = host
        self.port = port
        self.idle_sockets = self.sockets()

    def sockets(self) -> int | None:
        """How many sockets the server process holds (the listener and one
        per client connection); None where /proc is not available."""
        fd_dir = f"/proc/{self.proc.pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            return None
        count = 0
        for name in names:
            try:
                count += os.readlink(os.path.join(fd_dir, name)).startswith("socket:")
            except OSError:  # closed while listing
                pass
        return count

    def assert_alive(self) -> None:
        assert self.proc.proc.poll() is None, f"the server died:\n{self.proc.output()}"

    def wait_sockets(self, cond: Callable[[int], bool], what: str) -> None:
        """Waits until ``cond(number of client connections the server holds)``."""
        if self.idle_sockets is None:
            return
        wait_until(
            lambda: cond((self.sockets() or 0) - (self.idle_sockets or 0)),
            timeout=WIRE_DEADLINE,
            interval=0.01,
            what=what,
        )

    def wait_quiet(self) -> None:
        """Waits until the server has closed every client connection."""
        self.wait_sockets(lambda n: n <= 0, "the server to close every client connection")

    def connect(self, timeout: float = DEADLINE) -> socket.socket:
        # Not socket.create_connection: its name lookup costs milliseconds,
        # which adds up over hundreds of connections.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect((self.host, self.port))
        except BaseException:
            s.close()
            raise
        return s

    def get_ok(self, timeout: float = NORMAL_LATENCY) -> float:
        """A normal client: GET / on a fresh connection must answer 200 within
        ``timeout``. Returns the seconds it took."""
        start = time.monotonic()
        try:
            r = Client(self.host, self.port, timeout=timeout).get("/")
        except OSError as exc:
            self.assert_alive()
            pytest.fail(f"a normal GET failed after {time.monotonic() - start:.2f} s: {exc!r}")
        assert (r.status, r.body) == (200, b'{"ok":true}'), (r.status, r.body)
        return time.monotonic() - start


def ensure_fd_limit(needed: int) -> None:
    """Raises the soft limit on open files to ``needed`` if the hard one allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def fd_limit() -> float:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return float("inf") if soft == resource.RLIM_INFINITY else soft


FDS_NEEDED = 2 * ATTACKERS + 256


@pytest.fixture(scope="module")
def wire() -> Iterator[Wire]:
    # The server inherits the limit, and holds a socket per attacker too.
    ensure_fd_limit(FDS_NEEDED)
    p = ServerProcess([APP])
    try:
        host, port = p.wait_serving()
        yield Wire(p, host, port)
    finally:
        p.close()


@pytest.fixture(autouse=True)
def healthy(wire: Wire) -> Iterator[None]:
    """Each test starts on a server with no client connection left over from
    the one before, and ends with it alive, serving, and having logged no
    panic or traceback."""
    wire.assert_alive()
    wire.wait_quiet()
    yield
    wire.assert_alive()
    wire.get_ok()
    err = "\n".join(wire.proc.stderr)
    assert "panic" not in err and "Traceback" not in err, wire.proc.output()


# Raw exchanges


@dataclass
class Outcome:
    """What came back: the status of the response, or None when the server
    closed the connection (EOF or reset) without answering."""

    status: int | None
    head: bytes
    elapsed: float


def receive(sock: socket.socket, end: float, enough: Callable[[bytes], bool], stuck: str) -> bytes:
    """Reads until ``enough(got)`` or the server closes the connection; fails
    the test with ``stuck`` if neither happens by ``end`` (monotonic)."""
    got = b""
    while not enough(got):
        left = end - time.monotonic()
        if left <= 0:
            pytest.fail(f"{stuck}; got {got[:300]!r}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        got += chunk
    return got


def read_reply(sock: socket.socket, started: float, deadline: float = WIRE_DEADLINE) -> Outcome:
    """Reads until a whole response head arrived or the server closed the
    connection; fails the test if neither happens within ``deadline``."""
    got = receive(
        sock,
        started + deadline,
        lambda g: b"\r\n\r\n" in g,
        f"no answer and no close within {deadline} s",
    )
    elapsed = time.monotonic() - started
    if not got:
        return Outcome(None, b"", elapsed)
    m = STATUS_LINE.match(got)
    assert m is not None and b"\r\n\r\n" in got, f"not an HTTP response: {got[:300]!r}"
    return Outcome(int(m.group(1)), got.partition(b"\r\n\r\n")[0], elapsed)


@dataclass
class Response:
    status: int
    head: bytes
    body: bytes


def read_to_close(sock: socket.socket, deadline: float = WIRE_DEADLINE) -> list[Response]:
    """Reads until the server closes the connection; returns the responses
    in what it sent (a last one may be cut short by a reset)."""
    got = receive(
        sock, time.monotonic() + deadline, lambda g: False, "the server kept the connection open"
    )
    responses = []
    while got:
        m = STATUS_LINE.match(got)
        assert m is not None, f"not an HTTP response: {got[:300]!r}"
        head, sep, rest = got.partition(b"\r\n\r\n")
        if not sep:
            break
        length = re.search(rb"(?im)^content-length: *(\d+)\r?$", head)
        size = int(length.group(1)) if length else 0
        responses.append(Response(int(m.group(1)), head, rest[:size]))
        got = rest[size:]
    return responses


def send(sock: socket.socket, data: bytes, half_close: bool = False) -> None:
    """Sends ``data``; the server may close before it has read it all."""
    try:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass


def exchange(wire: Wire, data: bytes, *, half_close: bool = False) -> Outcome:
    """Sends ``data`` on a fresh connection (then, with ``half_close``, shuts
    the sending side so the server sees the end of the stream), and reads
    what comes back."""
    with wire.connect() as s:
        started = time.monotonic()
        send(s, data, half_close)
        return read_reply(s, started)


def reset_close(sock: socket.socket) -> None:
    """Closes with a TCP reset instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def assert_answer(out: Outcome, data: bytes, allowed: frozenset[int] | set[int]) -> None:
    assert out.status is None or out.status in allowed, (
        f"{data[:300]!r}{'...' if len(data) > 300 else ''} was answered {out.head[:300]!r}"
    )


def request(
    method: bytes = b"GET",
    target: bytes = b"/echo",
    version: bytes = b"HTTP/1.1",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
) -> bytes:
    head = b"%s %s %s\r\nHost: localhost\r\n" % (method, target, version)
    head += b"".join(b"%s: %s\r\n" % h for h in headers or [])
    return head + b"\r\n" + body


def chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


GET = request(headers=[(b"User-Agent", b"fuzz"), (b"Accept", b"*/*")], target=b"/echo?a=1&b=2")
POST = request(
    b"POST",
    headers=[(b"Content-Type", b"text/plain"), (b"Content-Length", b"11")],
    body=b"hello world",
)
CHUNKED = request(
    b"PUT", headers=[(b"Transfer-Encoding", b"chunked")], body=chunked(b"hello", b" world")
)
JSON_POST = request(
    b"POST",
    b"/json",
    headers=[(b"Content-Type", b"application/json"), (b"Content-Length", b"13")],
    body=b'{"a": [1, 2]}',
)
VALID_REQUESTS = [GET, POST, CHUNKED, JSON_POST]


def test_the_valid_requests_the_fuzzers_start_from_are_answered_200(wire: Wire):
    for data in VALID_REQUESTS:
        assert exchange(wire, data).status == 200, data


# 1. Random bytes

# No shrinking: a failing case that waits for a read timeout would make
# shrinking take many minutes; the first failing example is reported as is.
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)
FUZZ = settings(max_examples=200, deadline=None, phases=NO_SHRINK)


@FUZZ
@given(blob=st.binary(min_size=1, max_size=4096))
def test_random_bytes_get_4xx_or_close(wire: Wire, blob: bytes):
    out = exchange(wire, blob, half_close=True)
    assert_answer(out, blob, CLIENT_ERROR)
    wire.get_ok()


PREFIXES = [b"G", b"GET ", b"GET / HTTP/1.1\r\n", b"POST /echo HTTP/1.1\r\nHost: x\r\n", POST[:-3]]


@FUZZ
@given(prefix=st.sampled_from(PREFIXES), blob=st.binary(min_size=1, max_size=2048))
def test_valid_prefix_then_random_bytes_is_not_a_server_error(
    wire: Wire, prefix: bytes, blob: bytes
):
    data = prefix + blob
    out = exchange(wire, data, half_close=True)
    assert_answer(out, data, NOT_SERVER_ERROR)
    wire.get_ok()


SPECIAL = [b"\r", b"\n", b"\0", b"\r\n", b"\r\n\r\n", b" ", b":", b"\t", b"\xff", b"0"]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid request with a few random edits: bit flips, bytes replaced,
    CR / LF / NUL or random bytes inserted, bytes deleted, slices repeated."""
    data = bytearray(draw(st.sampled_from(VALID_REQUESTS)))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "replace", "insert", "delete", "repeat"]))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "replace":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.sampled_from(SPECIAL) | st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 8))]
        else:
            j = draw(st.integers(i, min(len(data), i + 40)))
            data[i:i] = data[i:j] * draw(st.integers(1, 5))
    return bytes(data)


@settings(max_examples=400, deadline=None, phases=NO_SHRINK)
@given(data=mutated())
def test_mutated_requests_are_answered_without_server_error(wire: Wire, data: bytes):
    # The edit may leave a valid request (200), an incomplete one (the server
    # sees the end of the stream and closes), or a malformed one (400).
    out = exchange(wire, data, half_close=True)
    assert_answer(out, data, NOT_SERVER_ERROR)
    wire.get_ok()


@pytest.mark.slow
@settings(
    max_examples=5,
    deadline=None,
    phases=NO_SHRINK,
    suppress_health_check=[HealthCheck.data_too_large, HealthCheck.too_slow],
)
@given(batch=st.lists(mutated(), min_size=60, max_size=60))
def test_mutated_requests_held_open_are_answered_or_cut_off_in_time(wire: Wire, batch: list[bytes]):
    # Held open, an incomplete request must be cut off by the read timeouts
    # (408 for a body, a close for a head). The batch is sent at once.
    socks = [wire.connect() for _ in batch]
    try:
        started = time.monotonic()
        for s, data in zip(socks, batch, strict=True):
            send(s, data)
        for s, data in zip(socks, batch, strict=True):
            assert_answer(read_reply(s, started), data, NOT_SERVER_ERROR)
    finally:
        for s in socks:
            s.close()
    wire.get_ok()


@FUZZ
@given(data=mutated())
def test_a_bad_request_pipelined_after_a_good_one_does_not_spoil_it(wire: Wire, data: bytes):
    with wire.connect() as s:
        send(s, POST + data, half_close=True)
        responses = read_to_close(s)
    assert responses, "the good request was not answered"
    first = responses[0]
    assert (first.status, first.body) == (200, b'{"method":"POST","size":11}'), first
    for r in responses[1:]:
        assert r.status in NOT_SERVER_ERROR, r
    wire.get_ok()


def percent_encoded(raw: bytes) -> bytes:
    return b"".join(b"%%%02X" % b for b in raw)


SAFE = st.text(string.ascii_letters + string.digits + "-._~", min_size=1, max_size=8)
QUERY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)


@FUZZ
@given(
    name=st.binary(min_size=1, max_size=24) | SAFE.map(str.encode),
    query=st.lists(st.tuples(QUERY_TEXT, QUERY_TEXT), max_size=4),
)
def test_percent_encoded_targets_are_decoded_without_error(
    wire: Wire, name: bytes, query: list[tuple[str, str]]
):
    target = b"/items/" + percent_encoded(name)
    if query:
        target += b"?" + urllib.parse.urlencode(query).encode()
    data = request(target=target, headers=[(b"Connection", b"close")])
    with wire.connect() as s:
        send(s, data)
        responses = read_to_close(s)
    assert [r.status for r in responses] == [200], (data, responses)
    got = json.loads(responses[0].body)
    try:
        assert got["name"] == name.decode(), got
    except UnicodeDecodeError:
        assert "\ufffd" in got["name"], got  # invalid UTF-8 is replaced
    expected_query: dict[str, str] = {}
    for key, value in query:
        expected_query.setdefault(key, value)
    assert got["query"] == expected_query


@FUZZ
@given(junk=st.binary(min_size=1, max_size=8).filter(lambda b: any(c <= 32 or c == 127 for c in b)))
def test_control_bytes_or_spaces_in_the_target_are_400(wire: Wire, junk: bytes):
    # (Raw non-ASCII bytes that are valid UTF-8 are let through.)
    data = request(target=b"/items/" + junk)
    out = exchange(wire, data)
    assert out.status == 400, f"{data!r} was answered {out.head!r}"
    wire.get_ok()


# Broken framing and syntax: each must get exactly the expected 4xx.

TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
TOKEN = st.text(TCHAR, min_size=1, max_size=10).map(str.encode)
NON_TCHAR = st.sampled_from([bytes([b]) for b in range(256) if chr(b) not in TCHAR + ":"])
CTL = st.sampled_from([bytes([b]) for b in [*range(0, 9), *range(10, 32), 127]])
SMALL = st.integers(0, 20)
KNOWN_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}


def with_length(value: bytes, body: bytes = b"ab") -> bytes:
    return request(b"POST", headers=[(b"Content-Length", value)], body=body)


def with_te(value: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    return request(
        b"POST", version=version, headers=[(b"Transfer-Encoding", value)], body=chunked(b"ab")
    )


def with_chunk_size(size: bytes) -> bytes:
    return request(b"POST", headers=[(b"Transfer-Encoding", b"chunked")], body=size + b"\r\nab\r\n")


def _junk(draw: st.DrawFn, bad: st.SearchStrategy[bytes]) -> bytes:
    return draw(TOKEN) + draw(bad) + draw(TOKEN)


@st.composite
def broken(draw: st.DrawFn) -> tuple[str, bytes, int]:
    """(what, request, expected status)."""
    kind = draw(
        st.sampled_from(
            [
                "negative Content-Length",
                "Content-Length not a number",
                "Content-Length beyond 64 bits",
                "Content-Length over the body limit",
                "conflicting Content-Lengths",
                "unknown Transfer-Encoding",
                "chunked not the last Transfer-Encoding",
                "Transfer-Encoding on HTTP/1.0",
                "chunk size not hex",
                "chunk size overflows",
                "invalid method",
                "unknown method",
                "invalid version",
                "invalid header name",
                "control character in a header value",
                "folded header line",
            ]
        )
    )
    if kind == "negative Content-Length":
        return kind, with_length(b"-%d" % draw(SMALL)), 400
    if kind == "Content-Length not a number":
        junk = st.sampled_from([bytes([c]) for c in b"+-,;.xXeE_/ \t"]) | TOKEN.filter(
            lambda t: not t.isdigit()
        )
        return kind, with_length(b"%d%s%d" % (draw(SMALL), draw(junk), draw(SMALL))), 400
    if kind == "Content-Length beyond 64 bits":
        return kind, with_length(b"%d" % draw(st.integers(2**64, 10**40))), 400
    if kind == "Content-Length over the body limit":
        # Answered at once, without waiting for the body. (The two largest
        # 64-bit values get 431: see test_largest_content_lengths_get_413.)
        return kind, with_length(b"%d" % draw(st.integers(MAX_BODY + 1, 2**64 - 3))), 413
    if kind == "conflicting Content-Lengths":
        a, b = draw(st.lists(SMALL, min_size=2, max_size=2, unique=True))
        data = request(
            b"POST", headers=[(b"Content-Length", b"%d" % a), (b"Content-Length", b"%d" % b)]
        )
        return kind, data + b"x" * 40, 400
    if kind == "unknown Transfer-Encoding":
        coding = draw(TOKEN.filter(lambda t: t.lower() != b"chunked"))
        return kind, with_te(coding), 400
    if kind == "chunked not the last Transfer-Encoding":
        coding = draw(TOKEN.filter(lambda t: t.lower() != b"chunked"))
        return kind, with_te(b"chunked, " + coding), 400
    if kind == "Transfer-Encoding on HTTP/1.0":
        return kind, with_te(b"chunked", version=b"HTTP/1.0"), 400
    if kind == "chunk size not hex":
        hexdigits = st.text("0123456789abcdefABCDEF", max_size=4).map(str.encode)
        bad = st.sampled_from([bytes([c]) for c in b"gGxXzZ-+.,!@/"])
        return kind, with_chunk_size(draw(hexdigits) + draw(bad) + draw(hexdigits)), 400
    if kind == "chunk size overflows":
        return kind, with_chunk_size(b"%x" % draw(st.integers(2**64, 2**128))), 400
    if kind == "invalid method":
        return kind, request(method=_junk(draw, NON_TCHAR)), 400
    if kind == "unknown method":
        method = draw(TOKEN.filter(lambda t: t.decode() not in KNOWN_METHODS))
        return kind, request(method=method), 405
    if kind == "invalid version":
        text = st.text(string.printable.replace("\r", "").replace("\n", ""), max_size=12)
        version = draw(text.map(str.encode).filter(lambda v: v not in (b"HTTP/1.0", b"HTTP/1.1")))
        return kind, request(version=version), 400
    if kind == "invalid header name":
        return kind, request(headers=[(_junk(draw, NON_TCHAR), b"v")]), 400
    if kind == "control character in a header value":
        return kind, request(headers=[(b"X-Value", _junk(draw, CTL))]), 400
    assert kind == "folded header line"
    return (
        kind,
        request(headers=[(b"X-Folded", b"a\r\n" + draw(st.sampled_from([b" ", b"\t"])))]),
        400,
    )


@settings(max_examples=300, deadline=None, phases=NO_SHRINK)
@given(case=broken())
def test_broken_framing_and_syntax_get_the_right_4xx(wire: Wire, case: tuple[str, bytes, int]):
    what, data, expected = case
    out = exchange(wire, data)
    assert out.status == expected, f"{what}: {data!r} was answered {out.head!r}"
    wire.get_ok()


@pytest.mark.parametrize("coding", [b"bogus, chunked", b"gzip, chunked", b"chunked, chunked"])
def test_unknown_or_repeated_transfer_codings_are_rejected(wire: Wire, coding: bytes):
    # RFC 9112 6.1: 501 for a coding the server does not know; chunked at most once.
    out = exchange(wire, with_te(coding))
    assert out.status == 501, out.head
    assert b"connection: close" in out.head.lower()


@pytest.mark.parametrize(
    "length",
    [
        MAX_BODY + 1,
        2**63,
        2**64 - 3,
        pytest.param(
            2**64 - 2,
            marks=pytest.mark.xfail(
                strict=True, reason="hyper answers 431 for the two largest 64-bit lengths"
            ),
        ),
        pytest.param(
            2**64 - 1,
            marks=pytest.mark.xfail(
                strict=True, reason="hyper answers 431 for the two largest 64-bit lengths"
            ),
        ),
    ],
)
def test_largest_content_lengths_get_413(wire: Wire, length: int):
    # docs/web.md: a body over max_body_size answers 413, before reading it.
    out = exchange(wire, with_length(b"%d" % length))
    assert out.status == 413, out.head


# 2. Truncated requests


def truncations() -> list[bytes]:
    """Every proper prefix of the valid requests (none is a whole request)."""
    return [data[:cut] for data in (GET, POST, CHUNKED) for cut in range(len(data))]


def test_truncated_requests_then_half_close_are_closed_at_once(wire: Wire):
    # The server sees the end of the stream: it must give up on the request
    # at once (a truncated body is a 400), not wait for a read timeout.
    for data in truncations():
        out = exchange(wire, data, half_close=True)
        assert_answer(out, data, {400})
        assert out.elapsed < HEADER_READ_TIMEOUT, f"{data!r} took {out.elapsed:.2f} s"
    wire.get_ok()


@pytest.mark.parametrize("close", [socket.socket.close, reset_close], ids=["fin", "reset"])
def test_truncated_requests_then_abrupt_close_leave_nothing_behind(wire: Wire, close: Any):
    for i, data in enumerate(truncations()):
        s = wire.connect()
        send(s, data)
        close(s)
        if i % 50 == 0:
            wire.get_ok()
    wire.get_ok()
    closed = time.monotonic()
    wire.wait_quiet()  # every one of those connections is released...
    # ... on the close, not by the header-read timeout.
    assert time.monotonic() - closed < HEADER_READ_TIMEOUT


@pytest.mark.parametrize(
    "data",
    [
        request(b"POST", headers=[(b"Content-Length", b"10")]),
        request(b"POST", headers=[(b"Transfer-Encoding", b"chunked")], body=b"10\r\nabc"),
        request(b"POST", headers=[(b"Transfer-Encoding", b"chunked")], body=b"2\r\nab\r\n0\r\n"),
    ],
    ids=["no body bytes", "mid chunk", "no end of trailers"],
)
def test_truncated_body_held_open_gets_408_after_the_body_timeout(wire: Wire, data: bytes):
    with wire.connect() as s:
        started = time.monotonic()
        send(s, data)
        out = read_reply(s, started)
        assert out.status == 408, out.head
        assert b"connection: close" in out.head.lower()
        assert out.elapsed >= BODY_READ_TIMEOUT * 0.9, "408 before the body timeout"
        assert read_reply(s, time.monotonic()).status is None, "the connection stayed open"


def test_requests_sent_a_byte_at_a_time_are_answered(wire: Wire):
    for data in VALID_REQUESTS:
        with wire.connect() as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(len(data)):
                send(s, data[i : i + 1])
            assert read_reply(s, time.monotonic()).status == 200, data


def test_a_pipelined_flood_is_answered_in_order(wire: Wire):
    n = 1000
    data = b"".join(request(target=b"/items/%d" % i) for i in range(n))
    with wire.connect() as s:
        send(s, data + request(b"GET", b"/", headers=[(b"Connection", b"close")]))
        responses = read_to_close(s)
    assert [r.status for r in responses] == [200] * (n + 1)
    names = [json.loads(r.body)["name"] for r in responses[:n]]
    assert names == [str(i) for i in range(n)]


def test_a_malformed_request_in_a_pipeline_ends_it_with_400(wire: Wire):
    with wire.connect() as s:
        send(s, GET * 3 + b"NOT HTTP\r\n\r\n" + SMUGGLED)
        responses = read_to_close(s)
    assert [r.status for r in responses] == [200, 200, 200, 400]


# 3. Oversized heads and bodies


def many_headers(count: int, size: int = 1) -> bytes:
    # Host is one of the ``count`` headers.
    return request(b"GET", b"/", headers=[(b"X-%d" % i, b"v" * size) for i in range(count - 1)])


def test_header_count_limit_is_431(wire: Wire):
    assert exchange(wire, many_headers(MAX_HEADERS)).status == 200
    for count in (MAX_HEADERS + 1, 1000):
        assert exchange(wire, many_headers(count)).status == 431, count


def test_head_size_limit_over_many_headers_is_431(wire: Wire):
    # docs/web.md: headers beyond about 100 KiB answer 431.
    assert exchange(wire, many_headers(45, 2000)).status == 200  # 90 kB
    assert exchange(wire, many_headers(65, 2000)).status == 431  # 130 kB


def test_request_target_too_long_is_414(wire: Wire):
    assert exchange(wire, request(target=b"/items/" + b"a" * 60_000)).status == 200
    assert exchange(wire, request(target=b"/items/" + b"a" * 70_000)).status == 414


def test_expect_100_continue_over_the_limit_is_413_without_continue(wire: Wire):
    expect = (b"Expect", b"100-continue")
    with wire.connect() as s:
        send(s, request(b"POST", headers=[expect, (b"Content-Length", b"%d" % (MAX_BODY + 1))]))
        assert read_reply(s, time.monotonic()).status == 413
    with wire.connect() as s:
        send(s, request(b"POST", headers=[expect, (b"Content-Length", b"5")]))
        assert read_reply(s, time.monotonic()).status == 100
        send(s, b"hello")
        assert read_reply(s, time.monotonic()).status == 200


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n"


def assert_nothing_more(s: socket.socket) -> None:
    """Nothing but a close (or the header-read timeout) may follow."""
    out = read_reply(s, time.monotonic())
    assert out.status is None, f"body bytes were answered as a request: {out.head!r}"


def test_declared_length_over_the_limit_is_413_before_the_body_and_never_reused(wire: Wire):
    body = SMUGGLED * (MAX_BODY // len(SMUGGLED) + 1)
    with wire.connect() as s:
        started = time.monotonic()
        send(s, request(b"POST", headers=[(b"Content-Length", b"%d" % len(body))]))
        out = read_reply(s, started)
        assert out.status == 413, out.head
        assert out.elapsed < BODY_READ_TIMEOUT, "the 413 waited for the body"
        send(s, body)
        assert_nothing_more(s)


def test_chunked_body_over_the_limit_is_413_and_the_rest_never_reused(wire: Wire):
    head = request(b"POST", headers=[(b"Transfer-Encoding", b"chunked")])
    with wire.connect() as s:
        started = time.monotonic()
        send(s, head + b"%x\r\n" % (MAX_BODY + 1) + b"x" * (MAX_BODY + 1) + b"\r\n")
        out = read_reply(s, started)
        assert out.status == 413, out.head
        send(s, chunked(SMUGGLED) + SMUGGLED)
        assert_nothing_more(s)


def test_body_error_answers_400_and_closes(wire: Wire):
    # A chunk without its CRLF: the body cannot be read.
    data = request(b"POST", headers=[(b"Transfer-Encoding", b"chunked")], body=b"2\r\nabXY")
    with wire.connect() as s:
        started = time.monotonic()
        send(s, data + b"0\r\n\r\n" + SMUGGLED)
        out = read_reply(s, started)
        assert out.status == 400, out.head
        assert_nothing_more(s)


# 4. Invalid JSON


def post_json(wire: Wire, body: bytes) -> tuple[int, Any]:
    r = Client(wire.host, wire.port, timeout=DEADLINE).post(
        "/json", body, headers={"Content-Type": "application/json"}
    )
    assert r.header("content-type") == "application/json", (r.status, r.body[:200])
    return r.status, json.loads(r.body)


def assert_json_answer(wire: Wire, body: bytes) -> None:
    try:
        expected: Any = type(json.loads(body)).__name__
    except Exception:  # noqa: BLE001 - whatever json.loads rejects
        expected = None
    status, reply = post_json(wire, body)
    if expected is not None:
        assert (status, reply) == (200, {"type": expected}), body[:200]
        return
    assert status == 400, (body[:200], reply)
    assert set(reply) == {"error"}, reply
    prefix = "request body is not valid JSON: "
    assert reply["error"].startswith(prefix) and len(reply["error"]) > len(prefix), reply


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=12,
)


@st.composite
def broken_json(draw: st.DrawFn) -> bytes:
    """Valid JSON cut short or with a byte changed."""
    data = bytearray(json.dumps(draw(JSON_VALUES)).encode())
    i = draw(st.integers(0, len(data)))
    if draw(st.booleans()):
        return bytes(data[:i])
    data[i:i] = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b",", b"]", b"}", b'"']))
    return bytes(data)


@settings(max_examples=200, deadline=None, phases=NO_SHRINK)
@given(
    body=st.binary(max_size=256)
    | st.text(max_size=64).map(str.encode)
    | broken_json()
    | st.integers(4301, 20_000).map(lambda n: b"9" * n)
)
def test_invalid_json_bodies_are_400_with_the_reason(wire: Wire, body: bytes):
    assert_json_answer(wire, body)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        b"[" * 50_000 + b"]" * 50_000,
        b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
        b"1" * 200_000,
        b"-" + b"1" * 5_000,
        b'{"n": ' + b"9" * 10_000 + b"}",
        b'["\xc3\x28"]',
        b"\xfe\xff\x00[",
    ],
    ids=[
        "unclosed nesting",
        "deep nesting",
        "deep objects",
        "huge number",
        "huge negative",
        "huge number inside",
        "bad continuation",
        "bad utf-16",
    ],
)
def test_pathological_json_is_400(wire: Wire, body: bytes):
    assert len(body) <= MAX_BODY
    status, reply = post_json(wire, body)
    assert status == 400, reply
    assert reply["error"].startswith("request body is not valid JSON: "), reply


# 5. Slowloris, slow bodies and idle connections

DRIP = 0.5  # seconds between two bytes of a slow client


@dataclass
class Attacker:
    sock: socket.socket
    opened: float
    sent: int = 0
    closed: float | None = None
    got: bytes = b""


@dataclass
class Attack:
    """ATTACKERS connections that send ``first`` at once, then the bytes of
    ``drip`` one every DRIP seconds (``drip`` empty: nothing more), watched
    on one thread until the server has closed them all."""

    wire: Wire
    first: bytes
    drip: bytes
    attackers: list[Attacker] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    error: list[BaseException] = field(default_factory=list)

    def open(self) -> None:
        # All at once: the server's accept queue (1024) takes the whole burst.
        for _ in range(ATTACKERS):
            s = self.wire.connect()
            a = Attacker(s, time.monotonic())
            self.attackers.append(a)
            send(s, self.first)
            s.setblocking(False)
        self.wire.wait_sockets(lambda n: n >= ATTACKERS, f"the server to accept {ATTACKERS}")

    def open_count(self) -> int:
        return sum(a.closed is None for a in self.attackers)

    def send_byte(self, a: Attacker) -> None:
        try:
            a.sent += a.sock.send(self.drip[a.sent : a.sent + 1])
        except BlockingIOError:
            pass
        except OSError:
            a.closed = time.monotonic()

    def watch(self) -> None:
        try:
            self._watch()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error.append(exc)

    def _watch(self) -> None:
        sel = selectors.DefaultSelector()
        for a in self.attackers:
            sel.register(a.sock, selectors.EVENT_READ, a)
        next_drip = time.monotonic() + DRIP
        while not self.stop.is_set() and sel.get_map():
            for key, _ in sel.select(timeout=max(0.0, next_drip - time.monotonic())):
                a = key.data
                try:
                    chunk = a.sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                a.got += chunk
                if not chunk:
                    a.closed = time.monotonic()
                    sel.unregister(a.sock)
            if time.monotonic() >= next_drip:
                next_drip += DRIP
                for a in self.attackers:
                    if self.drip and a.closed is None:
                        self.send_byte(a)
                        if a.closed is not None:
                            sel.unregister(a.sock)
        sel.close()

    def close(self) -> None:
        self.stop.set()
        for a in self.attackers:
            a.sock.close()


def run_attack(wire: Wire, attack: Attack, timeout: float, answered: bool) -> None:
    """Runs ``attack`` while a normal client makes requests in a loop, each of
    which must be answered 200 within NORMAL_LATENCY. Every attacker must be
    cut off ``timeout`` seconds after it connected (not before, not much
    later): with a 408 if ``answered``, else a 408 or nothing."""
    if fd_limit() < FDS_NEEDED:
        pytest.skip(f"needs {FDS_NEEDED} open files, the limit is {fd_limit()}")
    watcher = threading.Thread(target=attack.watch, daemon=True)
    latencies: list[tuple[int, float]] = []
    try:
        attack.open()
        watcher.start()
        end = time.monotonic() + timeout + DEADLINE
        while watcher.is_alive() and time.monotonic() < end:
            under_attack = attack.open_count()
            latencies.append((under_attack, wire.get_ok(timeout=NORMAL_LATENCY)))
            watcher.join(0.01)  # paces the loop: about 100 requests a second
        watcher.join(DEADLINE)
        assert not attack.error, attack.error
        assert not watcher.is_alive(), f"{attack.open_count()} connections were never closed"
    finally:
        attack.close()
        watcher.join(DEADLINE)
    during = [t for n, t in latencies if n == ATTACKERS]
    assert during, "no normal request was made while all the attackers were connected"
    assert max(t for _, t in latencies) < NORMAL_LATENCY
    for a in attack.attackers:
        assert a.closed is not None
        lasted = a.closed - a.opened
        assert timeout * 0.9 <= lasted <= timeout + DEADLINE, lasted
        if answered or a.got:
            assert a.got.startswith(b"HTTP/1.1 408 "), a.got[:200]
    wire.wait_quiet()
    wire.get_ok()


def test_slowloris_heads_are_cut_off_and_normal_clients_served(wire: Wire):
    # A request head that never ends, a byte at a time: closed without answer.
    head = b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 1000
    attack = Attack(wire, first=head[:3], drip=head[3:])
    run_attack(wire, attack, HEADER_READ_TIMEOUT, answered=False)


def test_slow_bodies_are_cut_off_with_408_and_normal_clients_served(wire: Wire):
    head = request(b"POST", headers=[(b"Content-Length", b"%d" % MAX_BODY)])
    attack = Attack(wire, first=head, drip=b"a" * 1000)
    run_attack(wire, attack, BODY_READ_TIMEOUT, answered=True)


def test_idle_connections_are_cut_off_and_normal_clients_served(wire: Wire):
    attack = Attack(wire, first=b"", drip=b"")
    run_attack(wire, attack, HEADER_READ_TIMEOUT, answered=False)


def test_idle_keep_alive_connections_are_cut_off_after_a_response(wire: Wire):
    socks = [wire.connect() for _ in range(20)]
    try:
        sent = time.monotonic()
        for s in socks:
            send(s, GET)
        for s in socks:
            # The answer, then nothing until the header-read timeout closes it.
            assert [r.status for r in read_to_close(s)] == [200]
            assert time.monotonic() - sent >= HEADER_READ_TIMEOUT * 0.9
    finally:
        for s in socks:
            s.close()
