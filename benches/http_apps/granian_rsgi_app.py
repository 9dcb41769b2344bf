"""GET /json and GET /cpu as a plain RSGI app (granian's native interface), no framework.

Run by ``benches/bench_processes.py`` from its own venv (``granian``), from this
directory:

    python -m granian --interface rsgi --workers N ... granian_rsgi_app:app

The app is one coroutine, called once per request with its scope and protocol
(the RSGI spec, docs/spec/RSGI.md in granian's repository). Each answer is
serialised with ``json.dumps`` per request, as the frameworks' ``JSONResponse``s
do, and GET /cpu runs ``cpu_work.cpu_work``, the same pure-Python work as every
other app of that bench, on the event loop.
"""

from __future__ import annotations

import json

from cpu_work import cpu_work
from granian.rsgi import HTTPProtocol, Scope

JSON_HEADERS = [("content-type", "application/json")]
TEXT_HEADERS = [("content-type", "text/plain; charset=utf-8")]


def json_body(payload: dict[str, object]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


async def app(scope: Scope, proto: HTTPProtocol) -> None:
    if scope.proto != "http":  # no websockets here
        return
    if scope.method == "GET" and scope.path == "/json":
        proto.response_bytes(200, JSON_HEADERS, json_body({"message": "Hello, World!"}))
    elif scope.method == "GET" and scope.path == "/cpu":
        proto.response_bytes(200, JSON_HEADERS, json_body({"result": cpu_work()}))
    else:
        proto.response_bytes(404, TEXT_HEADERS, b"Not Found")
