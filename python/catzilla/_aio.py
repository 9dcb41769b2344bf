"""The engine's asyncio event loop thread, where coroutine tasks are awaited."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from ._catzilla import ASYNC_CANCELLED as CANCELLED
from ._catzilla import ASYNC_ERROR as ERROR
from ._catzilla import ASYNC_OK as OK
from ._catzilla import ASYNC_TIMEOUT as TIMEOUT

Done = Callable[[int, Any], None]

#: The handle of the coroutine task running in the current context.
current_task_handle: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "catzilla_current_task", default=None
)


class EventLoopThread:
    """Runs one asyncio loop on a daemon thread; many coroutines at once."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="catzilla-asyncio", daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()

    def submit(
        self, awaitable: Awaitable[Any], timeout: float | None, done: Done, handle: Any = None
    ) -> None:
        """Starts ``awaitable`` on the loop; ``done(code, value)`` reports its end.
        ``handle`` is what ``current_task()`` returns inside it."""
        self.loop.call_soon_threadsafe(self._start, awaitable, timeout, done, handle)

    def _start(
        self, awaitable: Awaitable[Any], timeout: float | None, done: Done, handle: Any
    ) -> None:
        try:
            if handle is not None and asyncio.iscoroutine(awaitable):
                context = contextvars.copy_context()
                context.run(current_task_handle.set, handle)
                task = self.loop.create_task(awaitable, context=context)
            else:
                task = asyncio.ensure_future(awaitable, loop=self.loop)
        except BaseException as exc:  # noqa: BLE001 - reported as the task's error
            done(ERROR, exc)
            return
        expired = False
        timer: asyncio.TimerHandle | None = None

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        if timeout is not None:
            timer = self.loop.call_later(timeout, expire)

        def finished(t: asyncio.Future[Any]) -> None:
            if timer is not None:
                timer.cancel()
            if t.cancelled():
                done(TIMEOUT if expired else CANCELLED, None)
            elif (exc := t.exception()) is not None:
                done(ERROR, exc)
            else:
                done(OK, t.result())

        task.add_done_callback(finished)

    def stop(self, timeout: float) -> None:
        """Lets running coroutines finish for up to ``timeout`` seconds, then
        cancels the rest (each reported as cancelled) and stops the loop."""
        if self.loop.is_closed():
            return
        loop = self.loop

        async def drain() -> None:
            current = asyncio.current_task()
            pending = [t for t in asyncio.all_tasks() if t is not current]
            if pending and timeout > 0:
                await asyncio.wait(pending, timeout=timeout)
            loop.stop()

        try:
            loop.call_soon_threadsafe(lambda: loop.create_task(drain()))
        except RuntimeError:
            return
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout + 5.0)


async def await_result(handle: Any) -> Any:
    """``await task_result``: suspends until the task finishes, then returns
    its value or raises its error."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not finished.done():
            finished.set_result(None)

    def on_done(_: Any) -> None:
        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass  # the awaiting loop is closed; nobody is waiting any more

    handle.add_done_callback(on_done)
    await finished
    return handle.result()
