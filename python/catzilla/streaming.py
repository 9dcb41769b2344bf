"""Streaming responses and Server-Sent Events.

A ``StreamingResponse`` body is sent with chunked encoding as its content
produces it. An async iterator runs on the server's event loop; a plain
iterator (or generator) runs on a thread of its own, so it may block. Either
way the producer waits while the client is slow (a few chunks are buffered),
and stops when the client leaves or the server stops: an async generator gets
``CancelledError`` at its current ``await``, a generator is closed at its
next ``yield``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ._catzilla import STREAM_GONE, STREAM_SENT, StreamingResponse, StreamSink

__all__ = ["EventSourceResponse", "ServerSentEvent", "StreamingResponse"]

logger = logging.getLogger("catzilla.http")

#: What a stream may carry: chunks of text or bytes.
Chunk = str | bytes

# Strong references to running pumps (the loop keeps only weak ones).
_pumps: set[asyncio.Task[None]] = set()


def _call_soon(loop: asyncio.AbstractEventLoop, func: Any, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(func, *args)
    except RuntimeError:
        pass  # the loop is closed: there is nobody left to tell


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def start_stream(content: Any, sink: StreamSink, aio: Any) -> None:
    """Starts the producer of a streaming response (called by the server)."""
    if aio is None:
        threading.Thread(
            target=_drive_sync, args=(content, sink), name="catzilla-stream", daemon=True
        ).start()
        return
    loop: asyncio.AbstractEventLoop = aio.loop
    _call_soon(loop, _spawn, loop, content, sink)


def _spawn(loop: asyncio.AbstractEventLoop, content: Any, sink: StreamSink) -> None:
    task = loop.create_task(_pump(content, sink))
    _pumps.add(task)
    task.add_done_callback(_pumps.discard)


async def _pump(content: AsyncIterable[Chunk], sink: StreamSink) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    iterator: AsyncIterator[Chunk] | None = None
    try:
        iterator = content.__aiter__()
        if task is None:
            return

        def cancel() -> None:
            _call_soon(loop, task.cancel)

        if not sink.on_disconnect(cancel):
            return
        async for chunk in iterator:
            while (state := sink.send(chunk)) != STREAM_SENT:
                if state == STREAM_GONE:
                    return
                room: asyncio.Future[None] = loop.create_future()
                if sink.wait_writable(functools.partial(_call_soon, loop, _settle, room)):
                    await room
    except asyncio.CancelledError:
        return  # the client left, or the server stops
    except Exception:
        _cut_short(sink)
    finally:
        sink.finish()
        await _aclose(iterator)


def _cut_short(sink: StreamSink) -> None:
    """The content raised: logged, and the client sees a cut response."""
    logger.exception("a streaming response's content raised; the response was cut short")
    sink.abort()


async def _aclose(iterator: Any) -> None:
    close = getattr(iterator, "aclose", None)
    if close is None:
        return
    try:
        await close()
    except Exception:
        logger.exception("closing a streaming response's content raised")


def _drive_sync(content: Iterable[Chunk], sink: StreamSink) -> None:
    iterator = None
    try:
        iterator = iter(content)
        for chunk in iterator:
            if not sink.send_blocking(chunk):
                return  # the client left, or the server stops
    except Exception:
        _cut_short(sink)
    finally:
        sink.finish()
        close = getattr(iterator, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                logger.exception("closing a streaming response's content raised")


class ServerSentEvent:
    """One event of an event stream (``text/event-stream``).

    ``data`` is sent as text: a str as is (one ``data:`` line per line),
    anything else as JSON. ``event`` names it (the browser's
    ``addEventListener(name)``); ``id`` sets the stream's last event id;
    ``retry`` tells the client how long to wait before reconnecting (ms);
    ``comment`` adds a ``:`` line, which clients ignore.
    """

    __slots__ = ("comment", "data", "event", "id", "retry")

    def __init__(
        self,
        data: Any = None,
        *,
        event: str | None = None,
        id: str | None = None,  # noqa: A002 - the field's name in the format
        retry: int | None = None,
        comment: str | None = None,
    ) -> None:
        for name, value in (("event", event), ("id", id)):
            if value is not None and (
                not isinstance(value, str) or any(c in value for c in "\r\n\0")
            ):
                raise ValueError(f"{name} must be a str without line breaks or NUL, got {value!r}")
        if retry is not None and (
            isinstance(retry, bool) or not isinstance(retry, int) or retry < 0
        ):
            raise ValueError(f"retry must be an int of milliseconds >= 0, got {retry!r}")
        self.data = data
        self.event = event
        self.id = id
        self.retry = retry
        self.comment = comment

    def encode(self) -> str:
        """The event in the wire format, ending with its blank line."""
        lines: list[str] = []
        if self.comment is not None:
            lines.extend(f": {line}" for line in self.comment.splitlines() or [""])
        if self.event is not None:
            lines.append(f"event: {self.event}")
        if self.id is not None:
            lines.append(f"id: {self.id}")
        if self.retry is not None:
            lines.append(f"retry: {self.retry}")
        if self.data is not None:
            text = self.data if isinstance(self.data, str) else json.dumps(self.data)
            lines.extend(f"data: {line}" for line in text.splitlines() or [""])
        return "\n".join(lines) + "\n\n"

    def __repr__(self) -> str:
        return f"ServerSentEvent(data={self.data!r}, event={self.event!r}, id={self.id!r})"


#: The comment sent when an event stream has been quiet for ``ping`` seconds.
PING = ": ping\n\n"

_sse_threads: ThreadPoolExecutor | None = None
_sse_lock = threading.Lock()


def _sse_executor() -> ThreadPoolExecutor:
    """Threads for plain iterators of event streams (each may block)."""
    global _sse_threads
    with _sse_lock:
        if _sse_threads is None:
            _sse_threads = ThreadPoolExecutor(max_workers=64, thread_name_prefix="catzilla-sse")
        return _sse_threads


_END = object()


def _encode(item: Any) -> str:
    if isinstance(item, ServerSentEvent):
        return item.encode()
    return ServerSentEvent(item).encode()


async def _events(content: Any, ping: float | None) -> AsyncIterator[str]:
    """The encoded events of ``content``, with a ping comment after every
    ``ping`` seconds of silence."""
    loop = asyncio.get_running_loop()
    if hasattr(content, "__aiter__"):
        iterator = content.__aiter__()

        def step() -> Any:
            return loop.create_task(anext(iterator, _END))
    else:
        plain = iter(content)
        running: Future[Any] | None = None  # the next() call on its thread

        def step() -> Any:
            nonlocal running
            running = _sse_executor().submit(next, plain, _END)
            return asyncio.wrap_future(running, loop=loop)

    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(step())
            done, _ = await asyncio.wait({pending}, timeout=ping)
            if not done:
                yield PING
                continue
            item = pending.result()
            pending = None
            if item is _END:
                return
            yield _encode(item)
    finally:
        if pending is not None:
            pending.cancel()
        if hasattr(content, "__aiter__"):
            if pending is not None:
                # aclose() raises while anext() is still inside the generator:
                # let the cancellation reach it first.
                await asyncio.wait({pending})
            await _aclose(iterator)
        else:
            close = getattr(plain, "close", None)
            if close is not None:
                # NOTE: a generator still running next() on its thread cannot
                # be closed now; it is closed on that thread when the call
                # returns (at once if it has returned, or never started). This
                # does not need the event loop, which may be stopping.
                if running is None:
                    _close_plain(close)
                else:
                    running.add_done_callback(lambda _: _close_plain(close))


def _close_plain(close: Any) -> None:
    try:
        close()
    except Exception:
        logger.exception("closing a streaming response's content raised")


class EventSourceResponse(StreamingResponse):
    """A Server-Sent Events stream (``text/event-stream``).

    ``content`` is an async iterator or iterator of ``ServerSentEvent``s
    or of plain data (sent as an event's ``data``: JSON, unless it is a str;
    a dict is data too, never fields). After ``ping``
    seconds without an event a ``: ping`` comment keeps proxies from closing
    the connection (``None``: never).
    """

    def __new__(
        cls,
        content: Any,
        status_code: int = 200,
        headers: dict[str, str] | None = None,
        *,
        ping: float | None = 15.0,
    ) -> EventSourceResponse:
        if ping is not None and (
            isinstance(ping, bool) or not isinstance(ping, (int, float)) or not ping > 0
        ):
            raise ValueError(f"ping must be a number of seconds > 0 or None, got {ping!r}")
        if not (hasattr(content, "__aiter__") or hasattr(content, "__iter__")) or isinstance(
            content, (str, bytes)
        ):
            raise TypeError(
                "content must be an iterator or async iterator of events, "
                f"got {type(content).__name__}"
            )
        merged = {"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})}
        return super().__new__(
            cls, _events(content, ping), status_code, merged, "text/event-stream; charset=utf-8"
        )
