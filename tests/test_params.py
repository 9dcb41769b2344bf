"""Request models and handler parameters (catzilla.params), end to end: one
app served in this process on a free port, spoken to over real sockets.

Each parameter kind (path, query, header, form, body) is converted to its
annotation and checked against its constraints; a failure answers 422 with
``{"error": summary, "detail": [{"loc", "msg", "type"}, ...]}`` and the
handler does not run; a missing required parameter answers 400. Handlers may
return pydantic models (serialised by the server).
"""

from __future__ import annotations

import enum
import inspect
import json
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any, Optional

import pytest
from catzilla import (
    BaseModel,
    Body,
    Catzilla,
    Field,
    Form,
    Header,
    Path,
    Query,
    Request,
)
from catzilla.web import make_adapter
from helpers import DEADLINE, Client, Reply, free_port, wait_until

# Models


class Address(BaseModel):
    street: str
    zip: str = Field(pattern=r"^\d{5}$")


class Owner(BaseModel):
    name: str
    address: Address


class Item(BaseModel):
    name: str = Field(min_length=1)
    price: float = Field(gt=0)
    tags: list[str] = []
    description: str | None = None


class Pet(BaseModel):
    name: str
    owner: Owner


class Event(BaseModel):
    title: str
    when: datetime
    id: uuid.UUID


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


# How many times each counted handler ran, by name.
calls: dict[str, int] = {}
calls_lock = threading.Lock()


def ran(name: str) -> None:
    with calls_lock:
        calls[name] = calls.get(name, 0) + 1


def build_app() -> Catzilla:
    app = Catzilla()

    # Query parameters

    @app.get("/query/types")
    def query_types(
        request: Request,
        limit: int = Query(10),
        ratio: float = Query(0.5),
        exact: bool = Query(False),
        name: str = Query("x"),
        maybe: Optional[int] = Query(),  # noqa: UP045 - Optional[X] on purpose
        other: int | None = Query(None),
    ) -> dict[str, Any]:
        values = [limit, ratio, exact, name, maybe, other]
        return {
            "limit": limit,
            "ratio": ratio,
            "exact": exact,
            "name": name,
            "maybe": maybe,
            "other": other,
            "types": [type(v).__name__ for v in values],
        }

    @app.get("/query/required")
    def query_required(q: str = Query(...), page: int = Query(...)) -> dict[str, Any]:
        return {"q": q, "page": page}

    @app.get("/query/constrained")
    def query_constrained(
        n: int = Query(5, ge=1, le=10),
        f: float = Query(1.0, gt=0, lt=1.5),
        code: str = Query("ab", min_length=2, max_length=4, pattern=r"^[a-z]+$"),
        sort_by: str = Query("name", alias="sort", pattern=r"^(name|date)$"),
    ) -> dict[str, Any]:
        ran("query_constrained")
        return {"n": n, "f": f, "code": code, "sort_by": sort_by}

    @app.get("/query/annotated")
    def query_annotated(
        n: Annotated[int, Query(ge=1)] = 3,
        word: Annotated[str, Query(max_length=3)] = "abc",
        must: Annotated[int, Query()] = ...,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        return {"n": n, "word": word, "must": must}

    @app.get("/query/lists")
    def query_lists(
        tag: list[str] = Query([]),  # noqa: B008
        id: list[int] = Query([]),  # noqa: A002, B008
        few: list[int] = Query([], max_length=2),  # noqa: B008
        single: str = Query(""),
    ) -> dict[str, Any]:
        ran("query_lists")
        return {"tag": tag, "id": id, "few": few, "single": single}

    @app.get("/query/color")
    def query_color(color: Color = Query(Color.RED)) -> dict[str, Any]:  # noqa: B008
        return {"color": color.value, "is_enum": isinstance(color, Color)}

    @app.get("/query/plain-default")
    def query_plain_default(request: Request, limit: int = 7, tag: list[str] = []) -> Any:  # noqa: B006
        # No marker, a simple type and a default: a query parameter, as in FastAPI.
        return {"limit": limit, "tag": tag}

    @app.get("/query/first-is-not-the-request")
    def query_first(q: int = 5, request: Request | None = None) -> dict[str, Any]:
        # An annotated first parameter is not the request.
        return {"q": q, "has_request": isinstance(request, Request)}

    @app.get("/query/unannotated-default")
    def query_unannotated(request: Request, scale=2) -> dict[str, Any]:  # noqa: ANN001
        # Unannotated: left alone (its default).
        return {"scale": scale}

    # Path parameters

    @app.get("/path/int/{item_id}")
    def path_int(item_id: int = Path(ge=1, le=1000)) -> dict[str, Any]:
        ran("path_int")
        return {"item_id": item_id, "type": type(item_id).__name__}

    @app.get("/path/str/{code}")
    def path_str(request: Request, code: str = Path(min_length=3, pattern=r"^[A-Z]+$")) -> dict:
        return {"code": code}

    @app.get("/path/uuid/{key}")
    def path_uuid(key: uuid.UUID) -> dict[str, Any]:
        return {"key": str(key), "type": type(key).__name__}

    @app.get("/path/color/{color}")
    async def path_color(color: Color) -> dict[str, Any]:
        return {"color": color.value}

    @app.get("/path/annotated/{n}")
    def path_annotated(n: Annotated[int, Path(gt=0)]) -> dict[str, Any]:
        return {"n": n}

    # Headers

    @app.get("/headers")
    def headers(
        user_agent: str = Header("none"),
        x_request_id: str | None = Header(),
        token: str = Header("-", alias="X-Token"),
        raw_name: str = Header("-", convert_underscores=False),
        x_count: int = Header(0, ge=0, le=5),
        accept_language: list[str] = Header([]),  # noqa: B008
    ) -> dict[str, Any]:
        ran("headers")
        return {
            "user_agent": user_agent,
            "x_request_id": x_request_id,
            "token": token,
            "raw_name": raw_name,
            "x_count": x_count,
            "accept_language": accept_language,
        }

    @app.get("/headers/required")
    def headers_required(x_api_key: str = Header(...)) -> dict[str, Any]:
        return {"key": x_api_key}

    # Forms

    @app.post("/form/fields")
    def form_fields(
        username: str = Form(...),
        age: int = Form(0, ge=0),
        colors: list[str] = Form([]),  # noqa: B008
        note: str | None = Form(),
    ) -> dict[str, Any]:
        ran("form_fields")
        return {"username": username, "age": age, "colors": colors, "note": note}

    @app.post("/form/upload")
    def form_upload(
        title: str = Form(...),
        files: list[bytes] = Form([]),  # noqa: B008
        one: bytes | None = Form(),
    ) -> dict[str, Any]:
        return {
            "title": title,
            "files": [f.decode() for f in files],
            "one": one.decode() if one is not None else None,
        }

    # Bodies

    @app.post("/items")
    def create_item(item: Item) -> dict[str, Any]:
        ran("create_item")
        return {"type": type(item).__name__, "item": item.model_dump()}

    @app.post("/items/async")
    async def create_item_async(request: Request, item: Item) -> dict[str, Any]:
        ran("create_item_async")
        return {"method": request.method, "item": item.model_dump()}

    @app.post("/items/{shop}")
    def create_in_shop(
        request: Request,
        shop: str,
        item: Item,
        dry_run: bool = Query(False),
        x_user: str = Header("anon"),
    ) -> dict[str, Any]:
        ran("create_in_shop")
        return {"shop": shop, "name": item.name, "dry_run": dry_run, "user": x_user}

    @app.post("/pets")
    def create_pet(pet: Pet) -> dict[str, Any]:
        return {"zip": pet.owner.address.zip, "owner": pet.owner.name}

    @app.post("/items/batch")
    def create_batch(items: list[Item]) -> dict[str, Any]:
        ran("create_batch")
        return {"names": [i.name for i in items], "types": [type(i).__name__ for i in items]}

    @app.post("/items/maybe")
    def maybe_item(item: Item | None = None) -> dict[str, Any]:
        return {"item": item.model_dump() if item is not None else None}

    @app.post("/embedded")
    def embedded(item: Item, owner: Owner, count: int = Body(1, ge=1)) -> dict[str, Any]:
        ran("embedded")
        return {"item": item.name, "owner": owner.name, "count": count}

    @app.post("/embed-one")
    def embed_one(item: Item = Body(embed=True)) -> dict[str, Any]:  # noqa: B008
        return {"item": item.name}

    @app.post("/raw-body")
    def raw_body(data: dict[str, int] = Body(...)) -> dict[str, Any]:  # noqa: B008
        return {"total": sum(data.values())}

    @app.post("/form-model")
    def form_model(item: Annotated[Item, Form()]) -> dict[str, Any]:
        return {"name": item.name, "tags": item.tags}

    @app.post("/request-later")
    def request_later(item: Item, req: Request) -> dict[str, Any]:
        return {"path": req.path, "name": item.name}

    # Returned models (the server serialises them)

    @app.get("/return/model")
    def return_model() -> Item:
        return Item(name="lamp", price=12.5, tags=["home"])

    @app.get("/return/list")
    def return_list() -> list[Item]:
        return [Item(name="a", price=1), Item(name="b", price=2, description="bee")]

    @app.get("/return/nested")
    def return_nested() -> dict[str, Any]:
        return {"count": 1, "items": [Item(name="a", price=1)], "pet": PET}

    @app.get("/return/event")
    async def return_event() -> Event:
        return EVENT

    @app.post("/return/echo")
    def return_echo(pet: Pet) -> Pet:
        return pet

    return app


PET = Pet(name="rex", owner=Owner(name="ann", address=Address(street="1 Main St", zip="12345")))
EVENT = Event(
    title="launch",
    when=datetime(2024, 5, 6, 7, 8, 9),
    id=uuid.UUID("12345678-1234-5678-1234-567812345678"),
)


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """The app, served in this process for the whole module."""
    app = build_app()
    port = free_port()
    t = threading.Thread(target=app.listen, kwargs={"port": port}, daemon=True)
    t.start()
    c = Client("127.0.0.1", port)

    def up() -> bool:
        assert t.is_alive(), "listen ended before serving"
        if app._server is None:
            return False
        try:
            return c.get("/query/types").status == 200
        except OSError:
            return False

    wait_until(up, what="the in-process server")
    try:
        yield c
    finally:
        app.stop()
        t.join(DEADLINE)
    assert not t.is_alive(), "listen did not return after app.stop()"


def post_json(client: Client, path: str, data: Any, **kwargs: Any) -> Reply:
    headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
    return client.post(path, body=json.dumps(data), headers=headers, **kwargs)


def post_form(client: Client, path: str, body: str) -> Reply:
    headers = {"content-type": "application/x-www-form-urlencoded"}
    return client.post(path, body=body, headers=headers)


def multipart(
    fields: list[tuple[str, str]], files: list[tuple[str, str, bytes]] = ()
) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body and its headers."""
    boundary = "----catzilla" + uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
    for name, filename, content in files:
        parts.append(
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
            ).encode()
            + content
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


def count(name: str) -> int:
    with calls_lock:
        return calls.get(name, 0)


def unprocessable(r: Reply) -> dict[str, Any]:
    """The 422 answer's JSON, checked for its shape."""
    assert r.status == 422, (r.status, r.body)
    data = r.json()
    assert set(data) == {"error", "detail"}, data
    assert isinstance(data["error"], str) and data["error"]
    assert data["detail"], data
    for entry in data["detail"]:
        assert set(entry) == {"loc", "msg", "type"}, entry  # no input, url or ctx
        assert isinstance(entry["loc"], list) and entry["loc"][0] in (
            "path",
            "query",
            "header",
            "form",
            "body",
        )
    return data


def locs(data: dict[str, Any]) -> list[list[Any]]:
    return [e["loc"] for e in data["detail"]]


# Query parameters


def test_query_defaults_and_types(client: Client):
    assert client.get("/query/types").json() == {
        "limit": 10,
        "ratio": 0.5,
        "exact": False,
        "name": "x",
        "maybe": None,
        "other": None,
        "types": ["int", "float", "bool", "str", "NoneType", "NoneType"],
    }


def test_query_conversion(client: Client):
    r = client.get("/query/types?limit=-3&ratio=2.5e1&exact=ON&name=a+b%26c&maybe=4&other=+5")
    assert r.json() == {
        "limit": -3,
        "ratio": 25.0,
        "exact": True,
        "name": "a b&c",
        "maybe": 4,
        "other": 5,
        "types": ["int", "float", "bool", "str", "int", "int"],
    }


@pytest.mark.parametrize(
    ("query", "value"),
    [("exact=t", True), ("exact=N", False), ("exact=1", True), ("exact=off", False)],
)
def test_query_bool_spellings(client: Client, query: str, value: bool):
    assert client.get(f"/query/types?{query}").json()["exact"] is value


def test_query_int_accepts_what_pydantic_accepts(client: Client):
    # Beyond int(): pydantic takes "12.0" as 12 (the cheap converter hands it over).
    assert client.get("/query/types?limit=12.0").json()["limit"] == 12
    assert client.get("/query/types?limit=1_000").json()["limit"] == 1000


@pytest.mark.parametrize(
    ("query", "name", "kind"),
    [
        ("limit=many", "limit", "int_parsing"),
        ("limit=1.5", "limit", "int_parsing"),
        ("ratio=x", "ratio", "float_parsing"),
        ("exact=maybe", "exact", "bool_parsing"),
        ("maybe=", "maybe", "int_parsing"),
        ("other=%D9%A1", "other", "int_parsing"),  # an Arabic-Indic digit: not an int here
    ],
)
def test_query_value_that_does_not_convert_is_422(client: Client, query: str, name: str, kind: str):
    data = unprocessable(client.get(f"/query/types?{query}"))
    assert data["detail"] == [
        {"loc": ["query", name], "msg": data["detail"][0]["msg"], "type": kind}
    ]
    assert f"query parameter {name!r}" in data["error"]
    raw = query.split("=", 1)[1]
    if raw.isalpha():
        assert repr(raw) in data["error"]


def test_required_query_param_missing_is_400(client: Client):
    r = client.get("/query/required?page=2")
    assert r.status == 400
    assert r.json() == {"error": "query parameter 'q' is required"}
    assert client.get("/query/required?q=a&page=2").json() == {"q": "a", "page": 2}


def test_empty_required_query_value_is_present(client: Client):
    assert client.get("/query/required?q=&page=1").json() == {"q": "", "page": 1}


@pytest.mark.parametrize(
    ("query", "loc", "kind"),
    [
        ("n=0", ["query", "n"], "greater_than_equal"),
        ("n=11", ["query", "n"], "less_than_equal"),
        ("f=0", ["query", "f"], "greater_than"),
        ("f=1.5", ["query", "f"], "less_than"),
        ("code=a", ["query", "code"], "string_too_short"),
        ("code=abcde", ["query", "code"], "string_too_long"),
        ("code=AB", ["query", "code"], "string_pattern_mismatch"),
        ("sort=size", ["query", "sort"], "string_pattern_mismatch"),
    ],
)
def test_query_constraints(client: Client, query: str, loc: list[str], kind: str):
    before = count("query_constrained")
    data = unprocessable(client.get(f"/query/constrained?{query}"))
    assert [(e["loc"], e["type"]) for e in data["detail"]] == [(loc, kind)]
    assert count("query_constrained") == before  # the handler did not run


def test_query_constraints_pass(client: Client):
    r = client.get("/query/constrained?n=10&f=1.25&code=abcd&sort=date")
    assert r.json() == {"n": 10, "f": 1.25, "code": "abcd", "sort_by": "date"}


def test_every_failing_parameter_is_reported(client: Client):
    data = unprocessable(client.get("/query/constrained?n=0&f=9&code=A"))
    assert locs(data) == [["query", "n"], ["query", "f"], ["query", "code"]]
    assert data["error"].startswith("query parameter 'n': ")
    assert data["error"].endswith("(and 2 more errors)")


def test_annotated_query_markers(client: Client):
    assert client.get("/query/annotated?must=1").json() == {"n": 3, "word": "abc", "must": 1}
    assert client.get("/query/annotated?must=1&n=9&word=xy").json() == {
        "n": 9,
        "word": "xy",
        "must": 1,
    }
    assert client.get("/query/annotated").status == 400
    data = unprocessable(client.get("/query/annotated?must=1&n=0&word=long"))
    assert locs(data) == [["query", "n"], ["query", "word"]]


def test_list_query_params_take_every_value(client: Client):
    r = client.get("/query/lists?tag=a&tag=b%20c&id=1&id=2&id=3&single=x&single=y")
    assert r.json() == {"tag": ["a", "b c"], "id": [1, 2, 3], "few": [], "single": "x"}


def test_list_query_param_with_one_value_and_absent(client: Client):
    assert client.get("/query/lists?tag=only").json()["tag"] == ["only"]
    assert client.get("/query/lists").json() == {"tag": [], "id": [], "few": [], "single": ""}


def test_list_query_param_bad_item_is_422_with_its_index(client: Client):
    before = count("query_lists")
    data = unprocessable(client.get("/query/lists?id=1&id=two&id=3"))
    assert data["detail"][0]["loc"] == ["query", "id", 1]
    assert data["detail"][0]["type"] == "int_parsing"
    assert "'two'" in data["error"]
    assert count("query_lists") == before


def test_list_query_param_length_constraint(client: Client):
    data = unprocessable(client.get("/query/lists?few=1&few=2&few=3"))
    assert data["detail"][0]["loc"] == ["query", "few"]
    assert data["detail"][0]["type"] == "too_long"


def test_enum_query_param(client: Client):
    assert client.get("/query/color?color=blue").json() == {"color": "blue", "is_enum": True}
    data = unprocessable(client.get("/query/color?color=green"))
    assert data["detail"][0]["type"] == "enum"


def test_a_plain_typed_parameter_with_a_default_is_a_query_parameter(client: Client):
    assert client.get("/query/plain-default").json() == {"limit": 7, "tag": []}
    r = client.get("/query/plain-default?limit=99&tag=a&tag=b")
    assert r.json() == {"limit": 99, "tag": ["a", "b"]}
    r = client.get("/query/plain-default?limit=many")
    assert r.status == 422 and r.json()["detail"][0]["loc"] == ["query", "limit"]


def test_an_annotated_first_parameter_is_not_the_request(client: Client):
    assert client.get("/query/first-is-not-the-request?q=8").json() == {
        "q": 8,
        "has_request": True,
    }
    assert client.get("/query/first-is-not-the-request").json()["q"] == 5


def test_an_unannotated_parameter_with_a_default_keeps_it(client: Client):
    assert client.get("/query/unannotated-default?scale=9").json() == {"scale": 2}


# Path parameters


def test_path_int_with_constraints(client: Client):
    assert client.get("/path/int/42").json() == {"item_id": 42, "type": "int"}
    before = count("path_int")
    data = unprocessable(client.get("/path/int/0"))
    assert data["detail"][0]["loc"] == ["path", "item_id"]
    assert data["detail"][0]["type"] == "greater_than_equal"
    data = unprocessable(client.get("/path/int/abc"))
    assert data["detail"][0]["type"] == "int_parsing"
    assert "item_id" in data["error"] and "abc" in data["error"]
    assert count("path_int") == before


def test_path_str_with_constraints(client: Client):
    assert client.get("/path/str/ABC").json() == {"code": "ABC"}
    assert unprocessable(client.get("/path/str/AB"))["detail"][0]["type"] == "string_too_short"
    assert (
        unprocessable(client.get("/path/str/abc"))["detail"][0]["type"] == "string_pattern_mismatch"
    )


def test_path_uuid_and_enum(client: Client):
    key = "12345678-1234-5678-1234-567812345678"
    assert client.get(f"/path/uuid/{key}").json() == {"key": key, "type": "UUID"}
    assert unprocessable(client.get("/path/uuid/nope"))["detail"][0]["loc"] == ["path", "key"]
    assert client.get("/path/color/red").json() == {"color": "red"}
    assert unprocessable(client.get("/path/color/pink"))["detail"][0]["type"] == "enum"


def test_annotated_path_marker(client: Client):
    assert client.get("/path/annotated/3").json() == {"n": 3}
    assert unprocessable(client.get("/path/annotated/0"))["detail"][0]["type"] == "greater_than"


# Headers


def test_headers_by_converted_name_alias_and_defaults(client: Client):
    r = client.get(
        "/headers",
        headers={
            "User-Agent": "probe/1.0",
            "X-Request-Id": "r-1",
            "X-Token": "secret",
            "raw_name": "kept",
            "X-Count": "3",
            "Accept-Language": "en, fr ,de",
        },
    )
    assert r.json() == {
        "user_agent": "probe/1.0",
        "x_request_id": "r-1",
        "token": "secret",
        "raw_name": "kept",
        "x_count": 3,
        "accept_language": ["en", "fr", "de"],
    }


def test_header_defaults(client: Client):
    r = client.get("/headers", headers={"User-Agent": "u"})
    assert r.json() == {
        "user_agent": "u",
        "x_request_id": None,
        "token": "-",
        "raw_name": "-",
        "x_count": 0,
        "accept_language": [],
    }


def test_header_underscore_name_is_not_read_with_conversion(client: Client):
    # x_request_id reads "x-request-id", not a header spelled with an underscore.
    r = client.get("/headers", headers={"x_request_id": "underscored"})
    assert r.json()["x_request_id"] is None


@pytest.mark.parametrize(("value", "kind"), [("many", "int_parsing"), ("9", "less_than_equal")])
def test_header_that_does_not_validate_is_422(client: Client, value: str, kind: str):
    before = count("headers")
    data = unprocessable(client.get("/headers", headers={"X-Count": value}))
    assert data["detail"] == [
        {"loc": ["header", "x-count"], "msg": data["detail"][0]["msg"], "type": kind}
    ]
    assert data["error"].startswith("header 'x-count': ")
    assert count("headers") == before


def test_required_header_missing_is_400(client: Client):
    r = client.get("/headers/required")
    assert r.status == 400
    assert r.json() == {"error": "header 'x-api-key' is required"}
    assert client.get("/headers/required", headers={"X-API-Key": "k"}).json() == {"key": "k"}


# Forms


def test_urlencoded_form_fields(client: Client):
    r = post_form(client, "/form/fields", "username=ann+lee&age=31&colors=red&colors=%23fff")
    assert r.json() == {"username": "ann lee", "age": 31, "colors": ["red", "#fff"], "note": None}


def test_form_field_that_does_not_validate_is_422(client: Client):
    before = count("form_fields")
    data = unprocessable(post_form(client, "/form/fields", "username=a&age=-1"))
    assert data["detail"][0]["loc"] == ["form", "age"]
    assert data["detail"][0]["type"] == "greater_than_equal"
    assert data["error"].startswith("form field 'age': ")
    assert count("form_fields") == before


def test_required_form_field_missing_is_400(client: Client):
    r = post_form(client, "/form/fields", "age=3")
    assert r.status == 400
    assert r.json() == {"error": "form field 'username' is required"}


def test_form_fields_from_a_body_that_is_not_a_form_are_missing(client: Client):
    r = post_json(client, "/form/fields", {"username": "ann"})
    assert r.status == 400
    assert r.json() == {"error": "form field 'username' is required"}


def test_multipart_form_fields_and_files(client: Client):
    body, headers = multipart(
        [("title", "photos ✓")],
        [("files", "a.txt", b"first"), ("files", "b.txt", b"second"), ("one", "c", b"\x00x")],
    )
    r = client.post("/form/upload", body=body, headers=headers)
    assert r.json() == {"title": "photos ✓", "files": ["first", "second"], "one": "\x00x"}


def test_multipart_text_fields_convert_like_urlencoded_ones(client: Client):
    body, headers = multipart([("username", "bo"), ("age", "7"), ("colors", "a"), ("colors", "b")])
    r = client.post("/form/fields", body=body, headers=headers)
    assert r.json() == {"username": "bo", "age": 7, "colors": ["a", "b"], "note": None}


def test_malformed_multipart_is_400(client: Client):
    headers = {"content-type": "multipart/form-data"}  # no boundary
    r = client.post("/form/fields", body=b"--x\r\n", headers=headers)
    assert r.status == 400
    assert "boundary" in r.json()["error"]


def test_model_from_urlencoded_form(client: Client):
    r = post_form(client, "/items", "name=lamp&price=9.5&tags=a&tags=b")
    assert r.json() == {
        "type": "Item",
        "item": {"name": "lamp", "price": 9.5, "tags": ["a", "b"], "description": None},
    }


def test_model_from_form_with_one_value_for_a_list_field(client: Client):
    r = post_form(client, "/items", "name=lamp&price=1&tags=only")
    assert r.json()["item"]["tags"] == ["only"]


def test_model_from_multipart_form(client: Client):
    body, headers = multipart([("name", "desk"), ("price", "120"), ("description", "oak")])
    r = client.post("/items", body=body, headers=headers)
    assert r.json()["item"] == {"name": "desk", "price": 120.0, "tags": [], "description": "oak"}


def test_model_marked_form_is_filled_from_the_form(client: Client):
    r = post_form(client, "/form-model", "name=a&price=1&tags=x&tags=y")
    assert r.json() == {"name": "a", "tags": ["x", "y"]}


def test_optional_model_from_an_empty_form_is_its_default(client: Client):
    headers = {"content-type": "application/x-www-form-urlencoded"}
    assert client.post("/items/maybe", body=b"", headers=headers).json() == {"item": None}


def test_multipart_without_its_closing_boundary_is_400(client: Client):
    headers = {"content-type": "multipart/form-data; boundary=XX"}
    r = client.post("/form/fields", body=b"not a multipart body at all", headers=headers)
    assert r.status == 400
    assert "multipart" in r.json()["error"]


def test_model_from_form_that_does_not_validate_is_422(client: Client):
    before = count("create_item")
    data = unprocessable(post_form(client, "/items", "name=&price=x"))
    assert locs(data) == [["body", "name"], ["body", "price"]]
    assert count("create_item") == before


# Body models


def test_body_model(client: Client):
    r = post_json(client, "/items", {"name": "lamp", "price": 12.5, "tags": ["home"]})
    assert r.status == 200
    assert r.json() == {
        "type": "Item",
        "item": {"name": "lamp", "price": 12.5, "tags": ["home"], "description": None},
    }


def test_body_model_without_a_content_type_is_json(client: Client):
    r = client.post("/items", body=b'{"name": "x", "price": 1}')
    assert r.json()["item"]["name"] == "x"


def test_body_model_optional_fields(client: Client):
    r = post_json(client, "/items", {"name": "x", "price": 1, "description": "d"})
    assert r.json()["item"] == {"name": "x", "price": 1.0, "tags": [], "description": "d"}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"name": "x"}, [(["body", "price"], "missing")]),
        ({"name": "x", "price": "cheap"}, [(["body", "price"], "float_parsing")]),
        (
            {"name": "", "price": 0},
            [(["body", "name"], "string_too_short"), (["body", "price"], "greater_than")],
        ),
        ({"name": "x", "price": 1, "tags": "a"}, [(["body", "tags"], "list_type")]),
        ([1, 2], [(["body"], "model_type")]),
    ],
)
def test_body_model_that_does_not_validate_is_422(
    client: Client, data: Any, expected: list[tuple[list[Any], str]]
):
    before = count("create_item")
    got = unprocessable(post_json(client, "/items", data))
    assert [(e["loc"], e["type"]) for e in got["detail"]] == expected
    assert count("create_item") == before


def test_422_summary_names_the_first_error(client: Client):
    data = unprocessable(post_json(client, "/items", {"name": "x", "price": -2}))
    assert data["error"] == "body field 'price': Input should be greater than 0, got -2"


def test_invalid_json_body_is_422_json_invalid(client: Client):
    before = count("create_item")
    data = unprocessable(
        client.post("/items", body=b'{"name": ', headers={"content-type": "application/json"})
    )
    assert data["detail"][0]["loc"] == ["body"]
    assert data["detail"][0]["type"] == "json_invalid"
    assert data["error"].startswith("request body: Invalid JSON")
    assert count("create_item") == before


def test_empty_body_for_a_required_model_is_422_missing(client: Client):
    data = unprocessable(client.post("/items"))
    assert data["detail"] == [{"loc": ["body"], "msg": "Field required", "type": "missing"}]


def test_nested_models(client: Client):
    pet = {"name": "rex", "owner": {"name": "ann", "address": {"street": "1 Main", "zip": "12345"}}}
    assert post_json(client, "/pets", pet).json() == {"zip": "12345", "owner": "ann"}
    pet["owner"]["address"]["zip"] = "12"  # type: ignore[index]
    data = unprocessable(post_json(client, "/pets", pet))
    assert locs(data) == [["body", "owner", "address", "zip"]]
    assert data["error"].startswith("body field 'owner.address.zip': ")
    del pet["owner"]["name"]  # type: ignore[attr-defined]
    data = unprocessable(post_json(client, "/pets", pet))
    assert locs(data) == [["body", "owner", "name"], ["body", "owner", "address", "zip"]]


def test_list_of_models(client: Client):
    items = [{"name": "a", "price": 1}, {"name": "b", "price": 2}]
    assert post_json(client, "/items/batch", items).json() == {
        "names": ["a", "b"],
        "types": ["Item", "Item"],
    }
    assert post_json(client, "/items/batch", []).json() == {"names": [], "types": []}
    before = count("create_batch")
    data = unprocessable(
        post_json(client, "/items/batch", [{"name": "a", "price": 1}, {"price": 0}])
    )
    assert locs(data) == [["body", 1, "name"], ["body", 1, "price"]]
    assert unprocessable(post_json(client, "/items/batch", {"name": "a"}))["detail"][0]["type"] == (
        "list_type"
    )
    assert count("create_batch") == before


def test_optional_model(client: Client):
    assert client.post("/items/maybe").json() == {"item": None}
    assert post_json(client, "/items/maybe", None).json() == {"item": None}
    r = post_json(client, "/items/maybe", {"name": "x", "price": 1})
    assert r.json()["item"]["name"] == "x"
    assert unprocessable(post_json(client, "/items/maybe", {"name": "x"}))["detail"][0]["loc"] == [
        "body",
        "price",
    ]


def test_async_handler_with_a_model(client: Client):
    r = post_json(client, "/items/async", {"name": "x", "price": 3})
    assert r.json() == {
        "method": "POST",
        "item": {"name": "x", "price": 3.0, "tags": [], "description": None},
    }
    before = count("create_item_async")
    unprocessable(post_json(client, "/items/async", {"name": "x"}))
    assert count("create_item_async") == before


def test_model_with_path_query_and_header_params(client: Client):
    r = post_json(
        client, "/items/shop-1?dry_run=yes", {"name": "x", "price": 1}, headers={"X-User": "bo"}
    )
    assert r.json() == {"shop": "shop-1", "name": "x", "dry_run": True, "user": "bo"}


def test_errors_of_every_kind_in_one_answer(client: Client):
    before = count("create_in_shop")
    data = unprocessable(post_json(client, "/items/s?dry_run=perhaps", {"name": "x"}))
    assert locs(data) == [["query", "dry_run"], ["body", "price"]]
    assert data["error"].endswith("(and 1 more error)")
    assert count("create_in_shop") == before


def test_several_body_params_are_embedded_by_name(client: Client):
    data = {
        "item": {"name": "x", "price": 1},
        "owner": {"name": "ann", "address": {"street": "s", "zip": "00000"}},
        "count": 4,
    }
    assert post_json(client, "/embedded", data).json() == {"item": "x", "owner": "ann", "count": 4}
    del data["count"]
    assert post_json(client, "/embedded", data).json()["count"] == 1
    before = count("embedded")
    bad = unprocessable(
        post_json(client, "/embedded", {"item": {"name": "x", "price": 1}, "count": 0})
    )
    assert [(e["loc"], e["type"]) for e in bad["detail"]] == [
        (["body", "owner"], "missing"),
        (["body", "count"], "greater_than_equal"),
    ]
    assert count("embedded") == before


def test_empty_body_for_several_body_params_lists_each_missing_one(client: Client):
    data = unprocessable(client.post("/embedded"))
    assert [(e["loc"], e["type"]) for e in data["detail"]] == [
        (["body", "item"], "missing"),
        (["body", "owner"], "missing"),
    ]


def test_embed_one_model(client: Client):
    assert post_json(client, "/embed-one", {"item": {"name": "x", "price": 1}}).json() == {
        "item": "x"
    }
    data = unprocessable(post_json(client, "/embed-one", {"name": "x", "price": 1}))
    assert locs(data) == [["body", "item"]]


def test_body_marker_on_a_plain_type(client: Client):
    assert post_json(client, "/raw-body", {"a": 1, "b": "2"}).json() == {"total": 3}
    data = unprocessable(post_json(client, "/raw-body", {"a": "x"}))
    assert locs(data) == [["body", "a"]]


def test_request_annotated_anywhere_receives_the_request(client: Client):
    r = post_json(client, "/request-later", {"name": "n", "price": 1})
    assert r.json() == {"path": "/request-later", "name": "n"}


# Returned models: serialised by the server (model_dump_json for a model,
# the JSON writer for models inside lists and dicts).


def test_returning_a_model(client: Client):
    r = client.get("/return/model")
    assert r.status == 200, r.body
    assert r.json() == {"name": "lamp", "price": 12.5, "tags": ["home"], "description": None}


def test_returning_a_list_of_models(client: Client):
    r = client.get("/return/list")
    assert r.status == 200, r.body
    assert r.json() == [
        {"name": "a", "price": 1.0, "tags": [], "description": None},
        {"name": "b", "price": 2.0, "tags": [], "description": "bee"},
    ]


def test_returning_models_nested_in_a_dict(client: Client):
    r = client.get("/return/nested")
    assert r.status == 200, r.body
    assert r.json() == {
        "count": 1,
        "items": [{"name": "a", "price": 1.0, "tags": [], "description": None}],
        "pet": PET.model_dump(mode="json"),
    }


def test_returning_a_model_with_dates_and_uuids_from_an_async_handler(client: Client):
    r = client.get("/return/event")
    assert r.status == 200, r.body
    assert r.json() == json.loads(EVENT.model_dump_json())
    assert r.json()["when"] == "2024-05-06T07:08:09"


def test_a_validated_model_round_trips(client: Client):
    data = PET.model_dump(mode="json")
    r = post_json(client, "/return/echo", data)
    assert r.status == 200, r.body
    assert r.json() == data


# Registration: the plan is worked out once, and mistakes fail at once


def test_a_handler_taking_only_the_request_is_called_directly():
    def handler(request: Request) -> dict[str, Any]:
        return {}

    assert make_adapter(handler, "/x", []) is handler


def test_handlers_are_not_inspected_per_request(client: Client, monkeypatch: pytest.MonkeyPatch):
    looked = []
    real = inspect.signature

    def spy(*args: Any, **kwargs: Any) -> inspect.Signature:
        looked.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(inspect, "signature", spy)
    post_json(client, "/items/shop?dry_run=1", {"name": "x", "price": 1})
    client.get("/query/constrained?n=2")
    post_form(client, "/form/fields", "username=a")
    assert looked == []


def test_path_marker_without_the_route_param_is_refused():
    app = Catzilla()
    with pytest.raises(ValueError, match="declares Path parameter 'item_id'"):

        @app.get("/items")
        def handler(item_id: int = Path(...)) -> None: ...


def test_parameter_without_a_source_is_refused():
    app = Catzilla()
    with pytest.raises(ValueError, match=r"has no value.*Query\(\.\.\.\)"):

        @app.get("/items")
        def handler(request: Request, limit: int) -> None: ...


def test_a_constraint_that_does_not_fit_the_type_is_refused():
    app = Catzilla()
    with pytest.raises(TypeError, match="handler .* parameter 'limit'"):

        @app.get("/items")
        def handler(limit: int = Query(1, pattern="^1$")) -> None: ...


def test_a_model_marked_as_query_is_refused():
    app = Catzilla()
    with pytest.raises(TypeError, match="a model is read from the body"):

        @app.get("/items")
        def handler(item: Item = Query(None)) -> None: ...  # noqa: B008


def test_a_route_param_marked_as_query_is_refused():
    app = Catzilla()
    with pytest.raises(ValueError, match="is the route's {item_id}"):

        @app.get("/items/{item_id}")
        def handler(item_id: int = Query(1)) -> None: ...


def test_an_unresolvable_first_annotation_is_refused():
    class Local(BaseModel):
        x: int

    app = Catzilla()
    # With `from __future__ import annotations`, "Local" cannot be resolved
    # from the module: it must not silently become the request.
    with pytest.raises(TypeError, match="cannot resolve its annotation 'Local'"):

        @app.post("/local")
        def handler(item: Local) -> None: ...


def test_markers_repr():
    assert repr(Query(3)) == "Query(3)"
    assert repr(Header()) == "Header()"
    assert repr(Form(...)) == "Form(Ellipsis)"


@pytest.mark.parametrize("marker", ["Path", "Query", "Header", "Form", "Body"])
def test_a_marker_option_typo_is_a_type_error_naming_it(marker: str) -> None:
    import catzilla

    with pytest.raises(
        TypeError, match=f"{marker}\\(\\) got an unexpected keyword argument 'min_lenght'"
    ):
        getattr(catzilla, marker)(None, min_lenght=3)


def test_unannotated_markers_take_text_and_any_json() -> None:
    # An unannotated Body() is any JSON value, an unannotated Query() with a
    # constraint is text (they used to fail at registration on inspect._empty).
    from catzilla.testing import TestClient

    app = Catzilla()

    @app.post("/any")
    def anything(data=Body(), q=Query(None, min_length=2)):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202, B008
        return {"data": data, "q": q}

    with pytest.raises(TypeError, match="ge cannot apply to <class 'str'>"):
        app.get("/ge")(lambda x=Query(ge=1): None)  # noqa: B008

    client = TestClient(app)
    assert client.post("/any?q=ab", json=[1, "x"]).json() == {"data": [1, "x"], "q": "ab"}
    r = client.post("/any?q=a", json=1)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["query", "q"]
