"""Requests, responses, parameter markers, and the adapters that call handlers."""

from __future__ import annotations

import inspect
import json
import logging
import typing
from collections.abc import Callable
from typing import Any

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
from .streaming import EventSourceResponse, ServerSentEvent, StreamingResponse, start_stream

__all__ = [
    "EventSourceResponse",
    "HTMLResponse",
    "JSONResponse",
    "Path",
    "PlainTextResponse",
    "Query",
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


class PathParam:
    """The marker ``Path()`` returns."""

    def __init__(self, default: Any, description: str | None) -> None:
        self.default = default
        self.description = description

    def __repr__(self) -> str:
        return f"Path({self.default!r})"


class QueryParam:
    """The marker ``Query()`` returns."""

    def __init__(self, default: Any, alias: str | None, description: str | None) -> None:
        self.default = default
        self.alias = alias
        self.description = description

    def __repr__(self) -> str:
        return f"Query({self.default!r})"


def Path(default: Any = ..., *, description: str | None = None) -> Any:  # noqa: N802
    """Marks a handler parameter as a path parameter: ``task_id: str = Path(...)``.

    The value comes from the route's ``{task_id}`` and is converted to the
    parameter's annotation (``str``, ``int``, ``float`` or ``bool``); a value
    that does not convert answers 422.
    """
    return PathParam(default, description)


def Query(  # noqa: N802
    default: Any = None, *, alias: str | None = None, description: str | None = None
) -> Any:
    """Marks a handler parameter as a query parameter: ``limit: int = Query(10)``.

    ``Query(...)`` makes it required: a request without it answers 400. A value
    that does not convert to the annotation answers 422.
    """
    return QueryParam(default, alias, description)


Converter = Callable[[str], Any]


def _to_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


_CONVERTERS: dict[Any, Converter] = {int: int, float: float, bool: _to_bool, str: str}


def _converter(annotation: Any) -> Converter:
    return _CONVERTERS.get(annotation, str)


def _convert(kind: str, name: str, convert: Converter, raw: str) -> Any:
    try:
        return convert(raw)
    except ValueError:
        wanted = getattr(convert, "__name__", "value").removeprefix("_to_")
        raise HTTPError(422, f"{kind} parameter {name!r} must be {wanted}, got {raw!r}") from None


def make_adapter(
    handler: Callable[..., Any], path: str, route_params: list[str]
) -> Callable[[Request], Any]:
    """Returns the callable the server calls with the request: the handler
    itself when it takes just the request, else a wrapper that also passes
    path and query parameters as keyword arguments."""
    if not callable(handler):
        raise TypeError(f"handler for {path!r} must be callable, got {handler!r}")
    signature = inspect.signature(handler)
    try:
        hints = typing.get_type_hints(handler)
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to raw ones
        hints = {}
    params = list(signature.parameters.values())
    takes_request = (
        bool(params)
        and params[0].kind
        in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        and params[0].name not in route_params
    )
    from_path: list[tuple[str, Converter]] = []
    from_query: list[tuple[str, str, Converter, Any]] = []
    takes_all = False
    for param in params[1:] if takes_request else params:
        annotation = hints.get(param.name, param.annotation)
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            takes_all = True
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        elif param.name in route_params:
            from_path.append((param.name, _converter(annotation)))
        elif isinstance(param.default, PathParam):
            raise ValueError(
                f"handler {handler.__qualname__} declares Path parameter {param.name!r}, "
                f"but the route {path!r} has no {{{param.name}}}"
            )
        elif isinstance(param.default, QueryParam):
            name = param.default.alias or param.name
            from_query.append((param.name, name, _converter(annotation), param.default.default))
        elif param.default is inspect.Parameter.empty:
            raise ValueError(
                f"handler {handler.__qualname__} parameter {param.name!r} has no value: "
                f"it is not a path parameter of {path!r} and has no default"
            )
    if takes_all:
        named = {n for n, _ in from_path}
        from_path.extend((n, str) for n in route_params if n not in named)
    if not from_path and not from_query:
        if takes_request:
            return handler
        return lambda request: handler()

    def call(request: Request) -> Any:
        kwargs: dict[str, Any] = {}
        if from_path:
            values = request.path_params
            for name, convert in from_path:
                kwargs[name] = _convert("path", name, convert, values[name])
        if from_query:
            query = request.query_params
            for name, key, convert, default in from_query:
                raw = query.get(key)
                if raw is None:
                    if default is ...:
                        raise BadRequestError(f"query parameter {key!r} is required")
                    kwargs[name] = default
                else:
                    kwargs[name] = _convert("query", key, convert, raw)
        return handler(request, **kwargs) if takes_request else handler(**kwargs)

    return call
