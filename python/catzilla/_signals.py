"""How ``listen`` turns SIGINT and SIGTERM into a graceful stop, every time."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

logger = logging.getLogger("catzilla.http")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

Handler = Callable[[int, FrameType | None], Any]


class StopSignals:
    """While installed (main thread only), SIGINT and SIGTERM stop the server.

    - A handler the program set itself runs first, as written; when it
      returns, the stop follows. When it raises ``SystemExit`` or
      ``KeyboardInterrupt`` the stop follows too, and the exception then
      propagates out of ``listen``. Any other exception is logged, and the
      stop follows.
    - A signal set to ``SIG_IGN`` stays ignored; one whose handler was not set
      from Python is left alone.
    - Once the server has stopped and the tasks drain (``draining``), a
      further signal raises ``KeyboardInterrupt`` to cut the drain short.
    """

    def __init__(self, request_stop: Callable[[], None]) -> None:
        self.received = 0
        self.draining = False
        self._request_stop = request_stop
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; leave them alone
        for signum in STOP_SIGNALS:
            current = signal.getsignal(signum)
            own: Handler | None
            if current in (signal.SIG_DFL, signal.default_int_handler):
                own = None
            elif callable(current):
                own = current
            else:
                continue  # SIG_IGN stays ignored; a handler set outside Python is left alone
            self._previous[signum] = signal.signal(signum, self._handler(own))

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handler(self, own: Handler | None) -> Handler:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.received += 1
            if self.draining:
                if self.received > 1:
                    raise KeyboardInterrupt
                return
            try:
                if own is not None:
                    own(signum, frame)
            except Exception:
                logger.exception(
                    "the program's handler for %s raised; stopping the server anyway",
                    signal.Signals(signum).name,
                )
            finally:
                self._request_stop()

        return on_signal
