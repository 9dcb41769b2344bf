"""Requests, responses, and (from ``params``) the parameter markers and the
adapters that call handlers."""

from __future__ import annotations

import json
import logging

from . import _aio
from ._catzilla import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Request,
    Response,
    _init_http,
)
from ._log import reporter
from .errors import BadRequestError, HTTPError
from .params import (
    BaseModel,
    Body,
    BodyParam,
    Field,
    Form,
    FormParam,
    Header,
    HeaderParam,
    Path,
    PathParam,
    Query,
    QueryParam,
    make_adapter,
)
from .streaming import EventSourceResponse, ServerSentEvent, StreamingResponse, start_stream

__all__ = [
    "BaseModel",
    "Body",
    "BodyParam",
    "EventSourceResponse",
    "Field",
    "Form",
    "FormParam",
    "HTMLResponse",
    "Header",
    "HeaderParam",
    "JSONResponse",
    "Path",
    "PathParam",
    "PlainTextResponse",
    "Query",
    "QueryParam",
    "Request",
    "Response",
    "ServerSentEvent",
    "StreamingResponse",
    "make_adapter",
]

logger = logging.getLogger("catzilla.http")

_report = reporter(logger)

access_logger = logging.getLogger("catzilla.access")


def _access(lines: list[str], dropped: int) -> None:
    """Logs a batch of access log lines (called by the server's log thread)."""
    if dropped:
        access_logger.warning("the access log fell behind: %d line(s) were not logged", dropped)
    if access_logger.isEnabledFor(logging.INFO):
        for line in lines:
            access_logger.info("%s", line)


_init_http(
    {
        "json_loads": json.loads,
        "BadRequestError": BadRequestError,
        "HTTPError": HTTPError,
        "report": _report,
        "EventLoopThread": _aio.EventLoopThread,
        "access": _access,
        "start_stream": start_stream,
    }
)
