"""How the native layer logs: through a Python logger, by level name."""

from __future__ import annotations

import logging
from collections.abc import Callable

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}

Report = Callable[[str, str, BaseException | None], None]


def reporter(logger: logging.Logger) -> Report:
    """A ``report(level, message, exc)`` callable for ``logger``; unknown
    level names log as errors, and ``exc`` adds its traceback."""

    def report(level: str, message: str, exc: BaseException | None) -> None:
        logger.log(_LEVELS.get(level, logging.ERROR), message, exc_info=exc)

    return report
