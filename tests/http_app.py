"""The app that tests/test_http.py serves in a subprocess.

Run as ``python tests/http_app.py [PORT]`` (default 0: a free port); it prints
``catzilla serving on http://HOST:PORT`` once it listens, and stops on SIGINT
or SIGTERM. Bodies are limited to 1024 bytes so that 413 is easy to reach.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from datetime import date, datetime

from catzilla import (
    BadRequestError,
    Catzilla,
    HTMLResponse,
    HTTPError,
    JSONResponse,
    Path,
    PlainTextResponse,
    Query,
    Request,
    Response,
    TaskPriority,
)

MAX_BODY = 1024

app = Catzilla(max_body_size=MAX_BODY)
app.enable_background_tasks(workers=2, max_workers=2, enable_auto_scaling=False)


# Routing


@app.get("/")
def home(request: Request) -> Response:
    return JSONResponse({"message": "hello"})


@app.get("/thing")
def get_thing(request: Request) -> dict:
    return {"method": request.method, "route": "get"}


@app.post("/thing")
def post_thing(request: Request) -> dict:
    return {"method": request.method, "route": "post"}


@app.put("/thing")
def put_thing(request: Request) -> dict:
    return {"method": request.method, "route": "put"}


@app.patch("/thing")
def patch_thing(request: Request) -> dict:
    return {"method": request.method, "route": "patch"}


@app.delete("/thing")
def delete_thing(request: Request) -> dict:
    return {"method": request.method, "route": "delete"}


@app.route("/multi", methods=["GET", "POST"])
def multi(request: Request) -> dict:
    return {"method": request.method}


@app.get("/no-request")
def no_request() -> dict:
    return {"took_request": False}


# Path and query parameters


@app.get("/users/{user_id}")
def get_user(request: Request, user_id: int) -> dict:
    return {
        "user_id": user_id,
        "type": type(user_id).__name__,
        "raw": request.path_params["user_id"],
    }


@app.get("/items/{name}")
def get_item(request: Request, name: str = Path(...)) -> dict:
    return {"name": name, "path_params": dict(request.path_params)}


@app.get("/orgs/{org}/repos/{repo}")
def get_repo(*, org: str, repo: str) -> dict:
    # Keyword-only: the first positional parameter would receive the Request.
    return {"org": org, "repo": repo}


@app.get("/raw/{key}")
def raw_params(request: Request) -> dict:
    return {"path_params": dict(request.path_params)}


@app.get("/files/{*rest}")
def files(request: Request) -> dict:
    return {"rest": request.path_params["rest"]}


@app.get("/café")
def cafe(request: Request) -> dict:
    return {"route": "café"}


@app.get("/hello world")
def hello_world(request: Request) -> dict:
    return {"route": "hello world"}


@app.get("/search")
def search(
    request: Request,
    q: str = Query(...),
    limit: int = Query(10),
    ratio: float = Query(0.5),
    exact: bool = Query(False),
    sort_by: str = Query("name", alias="sort"),
) -> dict:
    return {
        "q": q,
        "limit": limit,
        "ratio": ratio,
        "exact": exact,
        "sort_by": sort_by,
        "types": [type(v).__name__ for v in (q, limit, ratio, exact, sort_by)],
    }


# Request parsing


@app.route("/echo", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def echo(request: Request) -> dict:
    return {
        "method": request.method,
        "path": request.path,
        "query_string": request.query_string,
        "query_params": dict(request.query_params),
        "headers": dict(request.headers),
        "body_hex": request.body.hex(),
        "text": request.text(),
    }


@app.post("/json")
def parse_json(request: Request) -> dict:
    data = request.json()
    return {"received": data, "type": type(data).__name__}


@app.post("/json-caught")
def parse_json_caught(request: Request) -> Response:
    try:
        request.json()
    except ValueError as exc:
        is_bad_request = isinstance(exc, BadRequestError)
        return JSONResponse({"caught": type(exc).__name__, "bad_request": is_bad_request}, 200)
    return JSONResponse({"caught": None})


@app.get("/client")
def client(request: Request) -> dict:
    host, port = request.client
    return {"host": host, "port": port}


# Response kinds


@app.get("/response/custom")
def custom_response(request: Request) -> Response:
    return Response(
        "a,b\n1,2\n",
        status_code=202,
        content_type="text/csv",
        headers={"X-Extra": "yes", "Cache-Control": "no-store"},
    )


@app.post("/response/created")
def created(request: Request) -> Response:
    return JSONResponse({"id": 7, "ok": True}, status_code=201, headers={"X-Custom": "abc"})


@app.get("/response/html")
def html(request: Request) -> Response:
    return HTMLResponse("<h1>Hi</h1>")


@app.get("/response/text")
def text(request: Request) -> Response:
    return PlainTextResponse("just text")


@app.get("/response/dict")
def as_dict(request: Request) -> dict:
    return {"a": 1, "nested": {"b": [1, 2.5, None, True]}}


@app.get("/response/list")
def as_list(request: Request) -> list:
    return [1, "two", {"three": 3}]


@app.get("/response/str")
def as_str(request: Request) -> str:
    return "plain string ünïcode"


@app.get("/response/bytes")
def as_bytes(request: Request) -> bytes:
    return b"\x00\x01binary"


@app.get("/response/ctype-override")
def ctype_override(request: Request) -> Response:
    return Response("<a/>", headers={"Content-Type": "application/xml", "X-Two": "2"})


@app.get("/response/special-json")
def special_json(request: Request) -> dict:
    return {
        "when": datetime(2024, 1, 2, 3, 4, 5),
        "day": date(2024, 2, 29),
        "priority": TaskPriority.HIGH,
        "nan": float("nan"),
        "inf": float("-inf"),
        "tuple": (1, "a"),
        "big": 2**70,
        "keys": {2: "int", None: "none", False: "bool", 1.5: "float"},
        "escaped": 'quote " backslash \\ newline \n',
    }


@app.delete("/response/none")
def as_none(request: Request) -> None:
    return None


# Errors


@app.get("/boom")
def boom(request: Request) -> dict:
    raise RuntimeError("kaboom-from-handler")


@app.get("/teapot")
def teapot(request: Request) -> dict:
    raise HTTPError(418, "I am a teapot")


@app.get("/bad-return")
def bad_return(request: Request) -> object:
    return object()


# Async handlers

_inflight = 0
_peak = 0


@app.get("/async/sleep")
async def async_sleep(request: Request, delay: float = Query(0.5)) -> dict:
    global _inflight, _peak
    _inflight += 1
    _peak = max(_peak, _inflight)
    try:
        await asyncio.sleep(delay)
    finally:
        _inflight -= 1
    return {"slept": delay, "peak": _peak}


@app.get("/async/value/{n}")
async def async_value(*, n: int) -> dict:
    await asyncio.sleep(0)
    return {"n": n * 2}


@app.get("/async/teapot")
async def async_teapot(request: Request) -> dict:
    await asyncio.sleep(0)
    raise HTTPError(418, "async teapot")


@app.delete("/async/none")
async def async_none(request: Request) -> None:
    await asyncio.sleep(0)


@app.get("/sync/sleep")
def sync_sleep(request: Request, delay: float = Query(0.5)) -> dict:
    time.sleep(delay)
    return {"slept": delay}


# Concurrency probes: each request joins a named group and stays in its
# handler until `want` requests of the group have been in their handlers at
# once, then `hold` seconds more. They count how many handlers run at once,
# instead of inferring it from how long a batch of requests took. A group
# that waited GATHER_LIMIT seconds in vain gives up, all its requests at once.

GATHER_LIMIT = 10.0
_gather = threading.Condition()
_groups: dict[str, dict[str, int]] = {}


def _join(group: str) -> dict[str, int]:
    with _gather:
        g = _groups.setdefault(group, {"in": 0, "peak": 0, "gave_up": 0})
        g["in"] += 1
        g["peak"] = max(g["peak"], g["in"])
        _gather.notify_all()
        return g


def _gathered(g: dict[str, int], want: int) -> bool:
    return g["peak"] >= want or bool(g["gave_up"])


def _leave(g: dict[str, int], want: int) -> dict:
    with _gather:
        g["in"] -= 1
        return {"reached": g["peak"] >= want, "peak": g["peak"]}


@app.get("/sync/gather")
def sync_gather(
    request: Request, group: str = Query(...), want: int = Query(...), hold: float = Query(0.3)
) -> dict:
    g = _join(group)
    try:
        with _gather:
            if not _gather.wait_for(lambda: _gathered(g, want), GATHER_LIMIT):
                g["gave_up"] = 1
                _gather.notify_all()
        time.sleep(hold)  # still in the handler: one more at once would show
    finally:
        reply = _leave(g, want)
    return reply


@app.get("/async/gather")
async def async_gather(
    request: Request, group: str = Query(...), want: int = Query(...), hold: float = Query(0.3)
) -> dict:
    g = _join(group)
    try:
        end = time.monotonic() + GATHER_LIMIT
        while not _gathered(g, want) and time.monotonic() < end:
            await asyncio.sleep(0.005)
        if not _gathered(g, want):
            g["gave_up"] = 1
        await asyncio.sleep(hold)
    finally:
        reply = _leave(g, want)
    return reply


@app.get("/async/boom")
async def async_boom(request: Request) -> dict:
    await asyncio.sleep(0)
    raise ValueError("async-kaboom")


# Background tasks and graceful shutdown


def say(line: str) -> None:
    """Prints a whole line with one write, so lines from threads never mix."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def slow_task(name: str) -> str:
    say(f"task {name} started")
    time.sleep(1.0)
    say(f"task {name} completed")
    return name


@app.post("/enqueue-slow")
def enqueue_slow(request: Request, count: int = Query(3), hold: float = Query(1.0)) -> dict:
    ids = [app.add_task(slow_task, f"t{i}").task_id for i in range(count)]
    say(f"handler enqueued {count}")
    time.sleep(hold)  # keeps the request in flight while the test signals
    say("handler returning")
    return {"task_ids": ids}


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    app.listen(port=port)
    say("listen returned")
