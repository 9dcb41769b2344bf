"""GET /json and POST /enqueue on the original Catzilla (``catzilla==0.2.3`` from PyPI).

Run by ``benches/bench_http.py`` with the interpreter of its own venv:

    python catzilla_orig_app.py PORT

Configured as a production deployment: ``production=True`` (which already turns
request logging off), with request logging and the startup banner turned off
explicitly as well.
"""

from __future__ import annotations

import sys

from catzilla import Catzilla, JSONResponse, Request, Response

app = Catzilla(production=True, log_requests=False, show_banner=False)
app.enable_background_tasks(workers=4)


def noop() -> None:
    return None


@app.get("/json")
def json_route(request: Request) -> Response:
    return JSONResponse({"message": "Hello, World!"})


@app.post("/enqueue")
def enqueue(request: Request) -> Response:
    result = app.add_task(noop)
    return JSONResponse({"task_id": result.task_id})


if __name__ == "__main__":
    app.listen(port=int(sys.argv[1]), host="127.0.0.1")
