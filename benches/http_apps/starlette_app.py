"""GET /json, POST /enqueue and GET /cpu on Starlette, served by uvicorn or granian.

Run by ``benches/bench_http.py`` (GET /json, POST /enqueue) from its own venv
(``starlette`` and ``uvicorn``):

    python -m uvicorn starlette_app:app --app-dir DIR --port PORT ...

and by ``benches/bench_processes.py`` (GET /json, GET /cpu) on uvicorn from that venv
and on granian (``--interface asgi``) from another (``granian`` and ``starlette``).

Starlette has no task queue: POST /enqueue attaches a ``BackgroundTask`` of a no-op
function to its response, which Starlette runs after the response is sent. The no-op
is an ``async def``, Starlette's fast path: it runs on the event loop, while a plain
``def`` would go through its threadpool and cut this baseline to about a third. The
task id is a counter, so the response looks like the Catzilla ones.

GET /cpu runs ``cpu_work.cpu_work``, the same pure-Python work as every other app of
bench_processes.py, in an ``async def`` handler: on the event loop, as the RSGI app
does, rather than through Starlette's threadpool.
"""

from __future__ import annotations

import itertools

from cpu_work import cpu_work
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

_task_ids = itertools.count(1)


async def noop() -> None:
    return None


async def json_route(request: Request) -> JSONResponse:
    return JSONResponse({"message": "Hello, World!"})


async def cpu_route(request: Request) -> JSONResponse:
    return JSONResponse({"result": cpu_work()})


async def enqueue(request: Request) -> JSONResponse:
    task_id = f"task_{next(_task_ids)}"
    return JSONResponse({"task_id": task_id}, background=BackgroundTask(noop))


app = Starlette(
    routes=[
        Route("/json", json_route, methods=["GET"]),
        Route("/enqueue", enqueue, methods=["POST"]),
        Route("/cpu", cpu_route, methods=["GET"]),
    ]
)
