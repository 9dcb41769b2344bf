"""Handler parameters: the markers (``Query``, ``Path``, ``Header``, ``Form``,
``Body``), request models (pydantic), and the adapter that fills a handler's
arguments from a request.

Everything about a handler is worked out once, when its route is registered:
which argument comes from where, how it is converted and validated (pydantic
``TypeAdapter`` validators, built then). Per request the adapter only reads
the request and runs the validators it was given. Simple, unconstrained
``int``, ``float``, ``bool`` and ``str`` parameters use cheap converters, and
pydantic only when those refuse a value (so the errors are pydantic's).

A value that does not validate answers 422 with
``{"error": "<summary>", "detail": [{"loc": [...], "msg": ..., "type": ...}]}``,
``loc`` starting with where it came from (``"path"``, ``"query"``,
``"header"``, ``"form"``, ``"body"``); the handler does not run. A required
path, query, header or form parameter that the request lacks answers 400
``{"error": "query parameter 'q' is required"}``.
"""

from __future__ import annotations

import collections.abc
import datetime
import decimal
import enum
import inspect
import types
import typing
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, TypeAlias, TypedDict, Unpack

from pydantic import BaseModel, TypeAdapter, ValidationError, create_model
from pydantic import Field as _pydantic_field
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from ._catzilla import JSONResponse, Request
from .errors import BadRequestError

__all__ = [
    "BaseModel",
    "Body",
    "BodyParam",
    "Field",
    "Form",
    "FormParam",
    "Header",
    "HeaderParam",
    "Param",
    "Path",
    "PathParam",
    "Query",
    "QueryParam",
    "make_adapter",
]


if TYPE_CHECKING:
    from pydantic import Field as Field
else:

    def Field(  # noqa: N802
        default: Any = PydanticUndefined,
        *args: Any,
        regex: str | None = None,
        min_items: int | None = None,
        max_items: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """pydantic's ``Field``, also taking catzilla 0.2's names for three of
        its options: ``regex`` (``pattern``), ``min_items`` and ``max_items``
        (``min_length`` and ``max_length``, which pydantic applies to lists)."""
        for old, new, value in (
            ("regex", "pattern", regex),
            ("min_items", "min_length", min_items),
            ("max_items", "max_length", max_items),
        ):
            if value is not None:
                if kwargs.get(new) is not None:
                    raise TypeError(f"Field() got both {old}= and {new}=; give {new}= only")
                kwargs[new] = value
        return _pydantic_field(default, *args, **kwargs)


class _Unset(enum.Enum):
    """The default of a marker that was given none."""

    UNSET = enum.auto()

    def __repr__(self) -> str:
        return "<unset>"


UNSET = _Unset.UNSET

# Markers


class Param:
    """A parameter marker: where a handler argument comes from, its default
    and its constraints. Made by ``Query()``, ``Path()``, ``Header()``,
    ``Form()`` and ``Body()``."""

    kind: ClassVar[str] = ""
    # The default of ``name: int = Query()``, a marker given no default.
    unset_default: ClassVar[Any] = None

    def __init__(
        self,
        default: Any = UNSET,
        *,
        alias: str | None = None,
        description: str | None = None,
        constraints: Mapping[str, Any] | None = None,
    ) -> None:
        self.default = default
        self.alias = alias
        self.description = description
        self.constraints = {k: v for k, v in (constraints or {}).items() if v is not None}

    def __repr__(self) -> str:
        name = type(self).__name__.removesuffix("Param")
        shown = "" if self.default is UNSET else repr(self.default)
        return f"{name}({shown})"


class PathParam(Param):
    """The marker ``Path()`` returns."""

    kind = "path"
    unset_default = ...


class QueryParam(Param):
    """The marker ``Query()`` returns."""

    kind = "query"


class HeaderParam(Param):
    """The marker ``Header()`` returns."""

    kind = "header"

    def __init__(
        self, default: Any = UNSET, *, convert_underscores: bool = True, **kw: Any
    ) -> None:
        super().__init__(default, **kw)
        self.convert_underscores = convert_underscores


class FormParam(Param):
    """The marker ``Form()`` returns."""

    kind = "form"


class BodyParam(Param):
    """The marker ``Body()`` returns."""

    kind = "body"
    unset_default = ...

    def __init__(self, default: Any = UNSET, *, embed: bool = False, **kw: Any) -> None:
        super().__init__(default, **kw)
        self.embed = embed


class Limits(TypedDict, total=False):
    """The options every marker takes: constraints, the name the value has
    in the request, and a description."""

    ge: float
    gt: float
    le: float
    lt: float
    min_length: int
    max_length: int
    pattern: str
    #: catzilla 0.2's name for ``pattern``.
    regex: str
    alias: str
    description: str


_CONSTRAINTS = ("ge", "gt", "le", "lt", "min_length", "max_length", "pattern")


def _marker(cls: type[Param], where: str, default: Any, options: Limits, **extra: Any) -> Any:
    """``cls`` made from a marker function's options; an unknown option is a
    ``TypeError`` naming it."""
    unknown = set(options) - set(Limits.__annotations__)
    if unknown:
        raise TypeError(f"{where}() got an unexpected keyword argument {sorted(unknown)[0]!r}")
    given: dict[str, Any] = dict(options)
    if given.get("pattern") is None:
        given["pattern"] = given.get("regex")
    return cls(
        default,
        alias=given.get("alias"),
        description=given.get("description"),
        constraints={k: given.get(k) for k in _CONSTRAINTS},
        **extra,
    )


def Path(default: Any = UNSET, **options: Unpack[Limits]) -> Any:  # noqa: N802
    """Marks a handler parameter as a path parameter: ``task_id: str = Path(...)``.

    The value comes from the route's ``{task_id}`` and is converted to the
    parameter's annotation and checked against the constraints (``ge``,
    ``gt``, ``le``, ``lt`` for numbers; ``min_length``, ``max_length``,
    ``pattern`` for text); a value that does not pass answers 422.
    """
    return _marker(PathParam, "Path", default, options)


def Query(default: Any = UNSET, **options: Unpack[Limits]) -> Any:  # noqa: N802
    """Marks a handler parameter as a query parameter: ``limit: int = Query(10)``.

    ``Query()`` defaults to None and ``Query(...)`` makes it required: a
    request without it answers 400. ``list[int]`` (or another list type)
    takes every value of a repeated key (``?id=1&id=2``). A value that does
    not convert to the annotation or breaks a constraint answers 422. The
    options are those of ``Path``, plus ``alias`` (the name in the query).
    """
    return _marker(QueryParam, "Query", default, options)


def Header(  # noqa: N802
    default: Any = UNSET, *, convert_underscores: bool = True, **options: Unpack[Limits]
) -> Any:
    """Marks a handler parameter as a request header: ``user_agent: str = Header()``
    reads ``User-Agent`` (underscores become hyphens unless
    ``convert_underscores=False``; ``alias`` names the header outright).

    ``Header()`` defaults to None and ``Header(...)`` makes it required (400
    when missing). A list annotation splits the value on commas.
    """
    return _marker(HeaderParam, "Header", default, options, convert_underscores=convert_underscores)


def Form(default: Any = UNSET, **options: Unpack[Limits]) -> Any:  # noqa: N802
    """Marks a handler parameter as a field of a form body
    (``application/x-www-form-urlencoded`` or ``multipart/form-data``):
    ``name: str = Form(...)``.

    ``Form()`` defaults to None and ``Form(...)`` makes it required (400 when
    missing). A list annotation takes every value of a repeated field. The
    value of a file part is its content, as bytes.
    """
    return _marker(FormParam, "Form", default, options)


def Body(default: Any = UNSET, *, embed: bool = False, **options: Unpack[Limits]) -> Any:  # noqa: N802
    """Marks a handler parameter as the request body, validated as its
    annotation: ``tags: list[str] = Body(...)``. A parameter annotated with a
    pydantic model needs no marker.

    With several body parameters, or ``embed=True``, each one is the value
    of its own key of a JSON object (``alias`` names the key).
    """
    return _marker(BodyParam, "Body", default, options, embed=embed)


# Type inspection


_UNION_TYPES: tuple[Any, ...] = (typing.Union, types.UnionType)
_NONE_TYPE = type(None)
_SEQUENCES: tuple[Any, ...] = (
    list,
    set,
    frozenset,
    tuple,
    collections.abc.Sequence,
    collections.abc.Set,
    collections.abc.MutableSequence,
    collections.abc.MutableSet,
)


def _strip_optional(tp: Any) -> Any:
    """``X`` for ``Optional[X]`` / ``X | None``; anything else unchanged."""
    if typing.get_origin(tp) in _UNION_TYPES:
        rest = [a for a in typing.get_args(tp) if a is not _NONE_TYPE]
        if len(rest) < len(typing.get_args(tp)):
            return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007
    return tp


def _is_sequence(tp: Any) -> bool:
    inner = _strip_optional(tp)
    if typing.get_origin(inner) is Annotated:
        inner = typing.get_args(inner)[0]
    return inner in _SEQUENCES or typing.get_origin(inner) in _SEQUENCES


def _holds_model(tp: Any) -> bool:
    """Whether ``tp`` is a pydantic model or is made of them (``list[Model]``,
    ``Model | None``, ``dict[str, Model]``, ``Annotated[Model, ...]``)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return True
    if typing.get_origin(tp) is Annotated:
        return _holds_model(typing.get_args(tp)[0])
    return any(_holds_model(a) for a in typing.get_args(tp) if a is not Ellipsis)


def _with_constraints(tp: Any, marker: Param | None, extra: tuple[Any, ...], where: str) -> Any:
    """``tp`` with the marker's constraints and other ``Annotated`` metadata."""
    metadata = list(extra)
    if marker is not None and marker.constraints:
        _check_constraints(tp, marker, where)
        metadata.append(_pydantic_field(**marker.constraints))
    return Annotated[(tp, *metadata)] if metadata else tp


_NUMERIC_LIMITS = frozenset({"ge", "gt", "le", "lt"})
_LENGTH_LIMITS = frozenset({"min_length", "max_length"})
_ORDERED = (int, float, decimal.Decimal, datetime.date, datetime.time, datetime.timedelta)


def _check_constraints(tp: Any, marker: Param, where: str) -> None:
    """Refuses, at registration, a constraint that cannot apply to ``tp``
    (pydantic would only say so when validating, with a ``TypeError``):
    ``ge``/``gt``/``le``/``lt`` need a number or a date, ``min_length`` and
    ``max_length`` text, bytes or a list, ``pattern`` text. Types it does
    not know (``Annotated``, ``Literal``, custom ones) are left to pydantic."""
    inner = _strip_optional(tp)
    base = typing.get_origin(inner) or inner
    if not isinstance(base, type):
        return
    given = set(marker.constraints)
    sized = issubclass(base, str | bytes | dict) or _is_sequence(inner)
    wrong = [
        name
        for name in sorted(given)
        if (name in _NUMERIC_LIMITS and not issubclass(base, _ORDERED))
        or (name in _LENGTH_LIMITS and not sized)
        or (name == "pattern" and not issubclass(base, str))
    ]
    if wrong and base.__module__ in ("builtins", "datetime", "decimal", "uuid", "typing"):
        raise TypeError(f"{where}: {', '.join(wrong)} cannot apply to {tp!r}")


# Cheap converters for unconstrained scalars. Each accepts a subset of what
# pydantic accepts, with the same result; a value one refuses goes to pydantic
# (``validate``), which accepts more ("12.0" as an int) or says why not.

_BOOLS = {"1": True, "true": True, "yes": True, "on": True}
_BOOLS.update({"0": False, "false": False, "no": False, "off": False})


Convert: TypeAlias = Callable[[Any], Any]


def _fast_number(parse: Callable[[str], Any]) -> Callable[[Convert], Convert]:
    """A converter that tries ``parse`` (``int`` or ``float``) on ASCII text
    first and hands what it refuses to pydantic's ``validate``."""

    def wrap(validate: Convert) -> Convert:
        def convert(raw: str) -> Any:
            if raw.isascii():  # int() and float() take other digits too; pydantic does not
                try:
                    return parse(raw)
                except ValueError:
                    pass
            return validate(raw)

        return convert

    return wrap


def _fast_bool(validate: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def convert(raw: str) -> Any:
        value = _BOOLS.get(raw.lower())
        return validate(raw) if value is None else value

    return convert


_FAST: dict[Any, Callable[[Callable[[Any], Any]], Callable[[Any], Any]]] = {
    int: _fast_number(int),
    float: _fast_number(float),
    bool: _fast_bool,
}


def _adapter(tp: Any, where: str) -> TypeAdapter[Any]:
    try:
        return TypeAdapter(tp)
    except Exception as exc:  # noqa: BLE001 - a schema pydantic cannot build, or a bad constraint
        raise TypeError(f"{where}: cannot validate {tp!r}: {exc}") from exc


def _json_validator(adapter: TypeAdapter[Any]) -> Callable[[bytes], Any]:
    """The quickest way to validate JSON bytes with ``adapter``: its core
    validator itself, which skips the Python wrapper around it (a quarter
    of the cost for a small model)."""
    method = getattr(getattr(adapter, "validator", None), "validate_json", None)
    if callable(method):
        return typing.cast(Callable[[bytes], Any], method)
    return adapter.validate_json


def _converter(tp: Any, where: str) -> Convert | None:
    """How a value read from the request (a str, or a list of them) becomes
    ``tp``: None when it stays as it is."""
    if tp is inspect.Parameter.empty or tp is Any or tp is str:
        return None
    validate = _adapter(tp, where).validate_python
    fast = _FAST.get(tp) if isinstance(tp, type) else None
    return validate if fast is None else fast(validate)


# The plan


_KIND_TEXT = {
    "path": "path parameter",
    "query": "query parameter",
    "header": "header",
    "form": "form field",
}


@dataclass(slots=True)
class _Field:
    """A handler argument read from the path, the query, a header or a form field."""

    arg: str  # the handler's keyword
    kind: str  # path, query, header, form
    key: str  # its name in the request
    required: bool
    default: Any
    convert: Convert | None
    many: bool  # takes every value of a repeated name (a list type)


@dataclass(slots=True)
class _BodyArg:
    """A handler argument read from the body."""

    arg: str
    key: str  # its key in an embedded body
    required: bool
    default: Any
    adapter: TypeAdapter[Any]
    many: bool  # a list type: every value of a repeated form field
    # For a form body: the model's field names that take every value of a
    # repeated form field; None when the argument is not a model.
    form_lists: frozenset[str] | None


@dataclass(slots=True)
class _BodyPlan:
    args: list[_BodyArg]
    embed: bool
    validate_json: Callable[[bytes], Any]  # the value, or the embedded model

    def from_json(self, body: bytes) -> dict[str, Any]:
        value = self.validate_json(body)
        if not self.embed:
            return {self.args[0].arg: value}
        return {a.arg: getattr(value, a.arg) for a in self.args}

    def fallback(
        self, request: Request, exc: ValidationError, form: _Form | None | _Unset = UNSET
    ) -> dict[str, Any]:
        """The arguments when the body was not valid JSON for them: a form
        body read as a form (``form``, when already read), an empty body as
        the defaults; else ``exc``'s errors (raised as ``_Invalid``)."""
        if form is UNSET:
            form = _Form.of(request)
        if isinstance(form, _Form):
            return self.from_form(form)
        if not request.body.strip():
            missing = [a for a in self.args if a.required]
            if not missing:
                return {a.arg: a.default for a in self.args}
            if not self.embed:
                raise _Invalid([_missing(("body",))], None)
            raise _Invalid([_missing(("body", a.key)) for a in missing], None)
        raise _Invalid(_details(("body",), exc), _first_input(exc))

    def from_form(self, form: _Form) -> dict[str, Any]:
        values: dict[str, Any] = {}
        errors: list[dict[str, Any]] = []
        for a in self.args:
            if a.form_lists is not None and (form.pairs or a.required):
                raw: Any = form.as_dict(a.form_lists)
            elif a.key in form.first:
                raw = form.all[a.key] if a.many else form.first[a.key]
            elif a.required:
                errors.append(_missing(("body", a.key)))
                continue
            else:
                values[a.arg] = a.default
                continue
            try:
                values[a.arg] = a.adapter.validate_python(raw)
            except ValidationError as exc:
                prefix = ("body",) if a.form_lists is not None else ("body", a.key)
                errors.extend(_details(prefix, exc))
        if errors:
            raise _Invalid(errors, None)
        return values


@dataclass(slots=True)
class _Plan:
    takes_request: bool  # the first positional parameter is the request
    request_args: list[str] = field(default_factory=list)  # others annotated Request
    path: list[_Field] = field(default_factory=list)
    query: list[_Field] = field(default_factory=list)
    header: list[_Field] = field(default_factory=list)
    form: list[_Field] = field(default_factory=list)
    body: _BodyPlan | None = None


class _Invalid(Exception):
    """Validation errors, as the 422 answer lists them."""

    def __init__(self, details: list[dict[str, Any]], first_input: Any) -> None:
        super().__init__(details)
        self.details = details
        self.first_input = first_input


def _details(prefix: tuple[Any, ...], exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": [*prefix, *e["loc"]], "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_context=False, include_input=False)
    ]


def _first_input(exc: ValidationError) -> Any:
    errors = exc.errors(include_url=False, include_context=False)
    return errors[0].get("input") if errors else None


def _missing(loc: tuple[Any, ...]) -> dict[str, Any]:
    return {"loc": list(loc), "msg": "Field required", "type": "missing"}


def _where(loc: list[Any]) -> str:
    kind, rest = (loc[0], loc[1:]) if loc else ("body", [])
    if kind == "body":
        if not rest:
            return "request body"
        return "body field " + repr(".".join(str(p) for p in rest))
    name, more = (rest[0], rest[1:]) if rest else ("", [])
    return f"{_KIND_TEXT.get(kind, kind)} {name!r}" + "".join(f"[{p!r}]" for p in more)


def _summary(details: list[dict[str, Any]], first_input: Any) -> str:
    first = details[0]
    text = f"{_where(first['loc'])}: {first['msg']}"
    if isinstance(first_input, str | int | float) and not isinstance(first_input, bool):
        shown = repr(first_input)
        text += f", got {shown if len(shown) <= 60 else shown[:57] + '...'}"
    if len(details) > 1:
        more = len(details) - 1
        text += f" (and {more} more error{'s' if more > 1 else ''})"
    return text


def _unprocessable(details: list[dict[str, Any]], first_input: Any) -> JSONResponse:
    body = {"error": _summary(details, first_input), "detail": details}
    return JSONResponse(body, status_code=422)


# Forms

_URLENCODED = "application/x-www-form-urlencoded"
_MULTIPART = "multipart/form-data"


@dataclass(slots=True)
class _Form:
    """A form body: every (name, value) pair in order; the first value of
    each name; every value of each name."""

    pairs: list[tuple[str, str | bytes]]
    first: dict[str, str | bytes]
    all: dict[str, list[str | bytes]]

    @classmethod
    def of(cls, request: Request) -> _Form | None:
        """The request's form, or None when its body is not a form."""
        content_type = request.headers.get("content-type", "")
        media = content_type.partition(";")[0].strip().lower()
        if media == _URLENCODED:
            text = request.body.decode("utf-8", "replace")
            pairs: list[tuple[str, str | bytes]] = list(
                urllib.parse.parse_qsl(text, keep_blank_values=True)
            )
        elif media == _MULTIPART:
            pairs = _parse_multipart(request.body, content_type)
        else:
            return None
        first: dict[str, str | bytes] = {}
        every: dict[str, list[str | bytes]] = {}
        for name, value in pairs:
            first.setdefault(name, value)
            every.setdefault(name, []).append(value)
        return cls(pairs, first, every)

    def as_dict(self, lists: frozenset[str]) -> dict[str, Any]:
        """The fields as a model's input: a list for the ``lists`` names."""
        return {name: self.all[name] if name in lists else v for name, v in self.first.items()}


_NO_FORM = _Form([], {}, {})


def _parse_multipart(body: bytes, content_type: str) -> list[tuple[str, str | bytes]]:
    """The fields of a ``multipart/form-data`` body: a file part's value is
    its content (bytes), any other part's its text."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise BadRequestError("multipart/form-data body without a boundary")
    fields: list[tuple[str, str | bytes]] = []
    header_name = bytearray()
    header_value = bytearray()
    headers: dict[bytes, bytes] = {}
    data = bytearray()

    def on_part_begin() -> None:
        headers.clear()
        data.clear()

    def on_header_field(chunk: bytes, start: int, end: int) -> None:
        header_name.extend(chunk[start:end])

    def on_header_value(chunk: bytes, start: int, end: int) -> None:
        header_value.extend(chunk[start:end])

    def on_header_end() -> None:
        headers[bytes(header_name).lower()] = bytes(header_value)
        header_name.clear()
        header_value.clear()

    def on_part_data(chunk: bytes, start: int, end: int) -> None:
        data.extend(chunk[start:end])

    def on_part_end() -> None:
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        name = disposition.get(b"name")
        if name is None:
            return  # not a form field
        key = name.decode("utf-8", "replace")
        if b"filename" in disposition:
            fields.append((key, bytes(data)))
        else:
            fields.append((key, data.decode("utf-8", "replace")))

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise BadRequestError(f"malformed multipart/form-data body: {exc}") from None
    return fields


def _model_list_fields(tp: Any) -> frozenset[str] | None:
    """For a model (or an optional one): the names, as a form gives them,
    of its fields that take a list. None for any other type."""
    inner = _strip_optional(tp)
    if typing.get_origin(inner) is Annotated:
        inner = typing.get_args(inner)[0]
    if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
        return None
    names = set()
    for name, info in inner.model_fields.items():
        if _is_sequence(info.annotation):
            names.add(info.alias or name)
    return frozenset(names)


# Building the plan


def _annotations(handler: Callable[..., Any], params: list[inspect.Parameter]) -> dict[str, Any]:
    """The handler's annotations, resolved (``Annotated`` kept). When they
    cannot all be resolved at once, each one that can be is; the others stay
    strings."""
    try:
        return typing.get_type_hints(handler, include_extras=True)
    except Exception:  # noqa: BLE001 - e.g. a name local to the function that defined it
        pass
    namespace = getattr(inspect.unwrap(handler), "__globals__", {})
    hints: dict[str, Any] = {}
    for p in params:
        if isinstance(p.annotation, str):
            try:
                hints[p.name] = eval(p.annotation, dict(namespace))  # noqa: S307 - as get_type_hints
            except Exception:  # noqa: BLE001
                hints[p.name] = p.annotation
        else:
            hints[p.name] = p.annotation
    return hints


def _split_annotated(tp: Any) -> tuple[Any, Param | None, tuple[Any, ...]]:
    """(type, marker, other metadata) of ``Annotated[type, marker, ...]``."""
    if typing.get_origin(tp) is not Annotated:
        return tp, None, ()
    base, *metadata = typing.get_args(tp)
    markers = [m for m in metadata if isinstance(m, Param)]
    if len(markers) > 1:
        raise ValueError(f"{tp!r} holds more than one parameter marker")
    others = tuple(m for m in metadata if not isinstance(m, Param))
    return base, (markers[0] if markers else None), others


def _is_request_type(tp: Any) -> bool:
    """``Request`` (or a subclass), also as ``Request | None``."""
    tp = _strip_optional(tp)
    return tp is Request or (isinstance(tp, type) and issubclass(tp, Request))


#: Types a plain parameter with a default is read from the query string as
#: (alone, optional, or in a list), as FastAPI reads them.
_QUERY_TYPES: tuple[type, ...] = (
    str,
    int,
    float,
    bool,
    decimal.Decimal,
    uuid.UUID,
    datetime.date,
    datetime.datetime,
    datetime.time,
    enum.Enum,
)


def _is_query_type(tp: Any) -> bool:
    inner = _strip_optional(tp)
    if _is_sequence(inner):
        args = typing.get_args(inner)
        inner = _strip_optional(args[0]) if args else str
    return isinstance(inner, type) and issubclass(inner, _QUERY_TYPES)


def _build_plan(handler: Callable[..., Any], path: str, route_params: list[str]) -> _Plan:
    name = getattr(handler, "__qualname__", repr(handler))
    signature = inspect.signature(handler)
    params = list(signature.parameters.values())
    hints = _annotations(handler, params)

    def where(p: inspect.Parameter) -> str:
        return f"handler {name} parameter {p.name!r}"

    def marker_of(p: inspect.Parameter) -> tuple[Any, Param | None, tuple[Any, ...], Any]:
        """(type, marker, metadata, default) of ``p``."""
        tp, marker, extra = _split_annotated(hints.get(p.name, p.annotation))
        default = p.default
        if isinstance(default, Param):
            if marker is not None:
                raise ValueError(f"{where(p)} has a marker both as default and in Annotated")
            marker = default
            default = marker.unset_default if marker.default is UNSET else marker.default
        elif marker is not None:
            if marker.default is not UNSET:
                raise ValueError(
                    f"{where(p)}: give the default as the parameter's default, "
                    f"not in the {marker!r} inside Annotated"
                )
            if default is inspect.Parameter.empty:
                default = ...
        return tp, marker, extra, default

    plan = _Plan(takes_request=False)
    first = params[0] if params else None
    if (
        first is not None
        and first.kind in (inspect.Parameter.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD)
        and first.name not in route_params
    ):
        tp, marker, _, _ = marker_of(first)
        if isinstance(tp, str) and not tp.rpartition(".")[2].endswith("Request"):
            # Unresolved, it may be a model the body fills: never guess.
            raise TypeError(
                f"{where(first)}: cannot resolve its annotation {tp!r}, so cannot tell "
                "whether it is the request or a body model (define the type where the "
                "handler's module can see it)"
            )
        # The request is the first parameter unless it is annotated as
        # something else (``q: int = 5`` is a query parameter, not the request).
        plan.takes_request = marker is None and (
            tp is inspect.Parameter.empty
            or tp is Any
            or isinstance(tp, str)
            or _is_request_type(tp)
        )
    body: list[tuple[inspect.Parameter, Any, BodyParam | None, Any]] = []
    takes_all = False
    for p in params[1:] if plan.takes_request else params:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            takes_all = True
            continue
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        if p.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise ValueError(f"{where(p)} is positional-only: only the request can be")
        tp, marker, extra, default = marker_of(p)
        if isinstance(tp, str) and (marker is not None or p.name in route_params):
            raise TypeError(
                f"{where(p)}: cannot resolve its annotation {tp!r} "
                "(define the type where the handler's module can see it)"
            )
        is_model = not isinstance(tp, str) and _holds_model(tp)
        if is_model and isinstance(marker, PathParam | QueryParam | HeaderParam):
            raise TypeError(
                f"{where(p)}: a model is read from the body (JSON or a form), not marked {marker!r}"
            )
        if p.name in route_params:
            if marker is not None and not isinstance(marker, PathParam):
                raise ValueError(f"{where(p)} is the route's {{{p.name}}} but is marked {marker!r}")
            plan.path.append(_field(p.name, "path", p.name, tp, marker, extra, ..., where(p)))
        elif isinstance(marker, PathParam):
            raise ValueError(
                f"handler {name} declares Path parameter {p.name!r}, "
                f"but the route {path!r} has no {{{p.name}}}"
            )
        elif isinstance(marker, BodyParam) or is_model:  # a model marked Form() too
            if default is inspect.Parameter.empty:
                default = ...
            body_marker = marker if isinstance(marker, BodyParam) else None
            if tp is inspect.Parameter.empty:  # unannotated: any JSON value
                tp = Any
            full = _with_constraints(tp, marker, extra, where(p))
            body.append((p, full, body_marker, default))
        elif isinstance(marker, QueryParam | FormParam):
            key = marker.alias or p.name
            into = plan.query if isinstance(marker, QueryParam) else plan.form
            into.append(_field(p.name, marker.kind, key, tp, marker, extra, default, where(p)))
        elif isinstance(marker, HeaderParam):
            key = marker.alias or (
                p.name.replace("_", "-") if marker.convert_underscores else p.name
            )
            plan.header.append(
                _field(p.name, "header", key.lower(), tp, marker, extra, default, where(p))
            )
        elif _is_request_type(tp):
            plan.request_args.append(p.name)
        elif (
            p.default is not inspect.Parameter.empty
            and not isinstance(tp, str)
            and (_is_query_type(tp))
        ):
            # ``limit: int = 10``: a query parameter, as FastAPI reads it.
            plan.query.append(_field(p.name, "query", p.name, tp, None, extra, default, where(p)))
        elif p.default is inspect.Parameter.empty:
            unresolved = (
                f" (its annotation {tp!r} does not resolve: define the type where the "
                "handler's module can see it)"
                if isinstance(tp, str)
                else ""
            )
            raise ValueError(
                f"handler {name} parameter {p.name!r} has no value: it is not a path "
                f"parameter of {path!r}, has no default and no marker (Query(...), "
                f"Header(...), Form(...), Body(...)) and is not a pydantic model{unresolved}"
            )
    if takes_all:
        named = {f.key for f in plan.path}
        plan.path.extend(
            _Field(n, "path", n, True, ..., None, False) for n in route_params if n not in named
        )
    if body:
        plan.body = _body_plan(name, body)
    return plan


def _field(
    arg: str,
    kind: str,
    key: str,
    tp: Any,
    marker: Param | None,
    extra: tuple[Any, ...],
    default: Any,
    where: str,
) -> _Field:
    if tp is inspect.Parameter.empty:  # unannotated: the text as it came
        tp = str
    inner = _strip_optional(tp)
    many = kind != "path" and _is_sequence(inner)
    if kind == "path" and _is_sequence(inner):
        raise TypeError(f"{where}: a path parameter cannot be a list")
    full = _with_constraints(inner, marker, extra, where)
    required = default is ...
    return _Field(
        arg, kind, key, required, None if required else default, _converter(full, where), many
    )


def _body_plan(
    name: str, body: list[tuple[inspect.Parameter, Any, BodyParam | None, Any]]
) -> _BodyPlan:
    args = [
        _BodyArg(
            arg=p.name,
            key=(marker.alias if marker is not None and marker.alias else p.name),
            required=default is ...,
            default=None if default is ... else default,
            adapter=_adapter(tp, f"handler {name} parameter {p.name!r}"),
            many=_is_sequence(tp),
            form_lists=_model_list_fields(tp),
        )
        for p, tp, marker, default in body
    ]
    embed = len(body) > 1 or any(m is not None and m.embed for _, _, m, _ in body)
    if not embed:
        return _BodyPlan(args, False, _json_validator(args[0].adapter))
    fields: dict[str, Any] = {}
    for (_, tp, _, _), a in zip(body, args, strict=True):
        info: FieldInfo = _pydantic_field(... if a.required else a.default, alias=a.key)
        fields[a.arg] = (tp, info)
    model = create_model(
        f"Body_{name.replace('.', '_').replace('<', '').replace('>', '')}", **fields
    )
    return _BodyPlan(args, True, _json_validator(TypeAdapter(model)))


# The adapter


def make_adapter(
    handler: Callable[..., Any], path: str, route_params: list[str]
) -> Callable[[Request], Any]:
    """Returns the callable the server calls with the request: the handler
    itself when it takes just the request, else a wrapper that reads and
    validates its other arguments and calls it with them, or answers 422
    (or 400 for a missing parameter) without calling it."""
    if not callable(handler):
        raise TypeError(f"handler for {path!r} must be callable, got {handler!r}")
    plan = _build_plan(handler, path, route_params)
    has_fields = plan.path or plan.query or plan.header or plan.form or plan.request_args
    if not has_fields and plan.body is None:
        if plan.takes_request:
            return handler
        return lambda request: handler()
    if not has_fields and plan.body is not None:
        return _body_only(handler, plan.takes_request, plan.body)
    return _general(handler, plan)


def _body_only(
    handler: Callable[..., Any], takes_request: bool, body: _BodyPlan
) -> Callable[[Request], Any]:
    """The adapter of a handler whose only arguments (but the request) come
    from the body: one validation of the JSON body on the way in."""
    # Not embedded: the validated body is the argument itself.
    validate_json = body.validate_json if not body.embed else None
    from_json = body.from_json
    arg = body.args[0].arg

    def call(request: Request) -> Any:
        try:
            if validate_json is not None:
                kwargs = {arg: validate_json(request.body)}
            else:
                kwargs = from_json(request.body)
        except ValidationError as exc:
            try:
                kwargs = body.fallback(request, exc)
            except _Invalid as invalid:
                return _unprocessable(invalid.details, invalid.first_input)
        return handler(request, **kwargs) if takes_request else handler(**kwargs)

    return call


def _general(handler: Callable[..., Any], plan: _Plan) -> Callable[[Request], Any]:
    takes_request = plan.takes_request
    request_args = plan.request_args
    path_rows, query_rows = _rows(plan.path), _rows(plan.query)
    header_rows, form_rows = _rows(plan.header), _rows(plan.form)
    body = plan.body
    query_lists = any(f.many for f in plan.query)

    def call(request: Request) -> Any:
        kwargs: dict[str, Any] = {}
        failed: list[_Invalid] | None = None
        if path_rows:
            failed = _fill(path_rows, request.path_params, None, kwargs, failed)
        if query_rows:
            every = _query_lists(request.query_string) if query_lists else None
            failed = _fill(query_rows, request.query_params, every, kwargs, failed)
        if header_rows:
            failed = _fill(header_rows, request.headers, None, kwargs, failed)
        form: _Form | None | _Unset = UNSET
        if form_rows:
            form = _Form.of(request)
            got = form or _NO_FORM
            failed = _fill(form_rows, got.first, got.all, kwargs, failed)
        if body is not None:
            try:
                try:
                    kwargs.update(body.from_json(request.body))
                except ValidationError as exc:
                    kwargs.update(body.fallback(request, exc, form))
            except _Invalid as invalid:
                failed = [*(failed or ()), invalid]
        if failed:
            details = [d for invalid in failed for d in invalid.details]
            return _unprocessable(details, failed[0].first_input)
        for arg in request_args:
            kwargs[arg] = request
        return handler(request, **kwargs) if takes_request else handler(**kwargs)

    return call


_Row: TypeAlias = tuple[str, str, bool, Any, Convert | None, bool, str]


def _rows(fields: list[_Field]) -> list[_Row]:
    """The fields as tuples, quicker to unpack per request than attributes."""
    return [(f.arg, f.key, f.required, f.default, f.convert, f.many, f.kind) for f in fields]


def _query_lists(query_string: str) -> dict[str, list[str]]:
    return urllib.parse.parse_qs(query_string, keep_blank_values=True)


def _fill(
    rows: list[_Row],
    first: Mapping[str, Any],
    every: Mapping[str, list[Any]] | None,
    kwargs: dict[str, Any],
    failed: list[_Invalid] | None,
) -> list[_Invalid] | None:
    """Reads, converts and validates the ``rows`` fields into ``kwargs``;
    returns ``failed`` with their validation errors added. A required field
    that is missing raises ``BadRequestError`` (400)."""
    for arg, key, required, default, convert, many, kind in rows:
        raw: Any = first.get(key)
        if raw is None:
            if required:
                raise BadRequestError(f"{_KIND_TEXT[kind]} {key!r} is required")
            kwargs[arg] = default
            continue
        if many:
            if every is not None:
                raw = every.get(key, [raw])
            else:  # a header: its values, joined with commas
                raw = [part.strip() for part in raw.split(",")]
        if convert is None:
            kwargs[arg] = raw
            continue
        try:
            kwargs[arg] = convert(raw)
        except ValidationError as exc:
            invalid = _Invalid(_details((kind, key), exc), _first_input(exc))
            failed = [invalid] if failed is None else [*failed, invalid]
    return failed
