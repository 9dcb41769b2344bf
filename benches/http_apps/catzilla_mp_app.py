"""GET /json and GET /cpu on this project's catzilla, for serving from several processes.

Run by ``benches/bench_processes.py`` with the interpreter that runs the bench (the
one that has this project's package installed), from this directory:

    python -m catzilla run catzilla_mp_app:app --host 127.0.0.1 --port PORT --processes N

GET /cpu runs ``cpu_work.cpu_work``, the same pure-Python work as every other app
of that bench. Both handlers are plain ``def``s.
"""

from __future__ import annotations

from catzilla import Catzilla, JSONResponse, Request, Response
from cpu_work import cpu_work

app = Catzilla()


@app.get("/json")
def json_route(request: Request) -> Response:
    return JSONResponse({"message": "Hello, World!"})


@app.get("/cpu")
def cpu_route(request: Request) -> Response:
    return JSONResponse({"result": cpu_work()})
