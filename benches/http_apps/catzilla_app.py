"""GET /json and POST /enqueue on this project's catzilla.

Run by ``benches/bench_http.py`` with the interpreter that runs the bench (the one
that has this project's package installed):

    python catzilla_app.py PORT
"""

from __future__ import annotations

import sys

from catzilla import Catzilla, JSONResponse, Request, Response

app = Catzilla()
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
