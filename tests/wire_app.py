"""The app that tests/test_wire_fuzz.py serves in a subprocess.

Run as ``python tests/wire_app.py [PORT]`` (default 0: a free port); it prints
``catzilla serving on http://HOST:PORT`` once it listens, and stops on SIGINT
or SIGTERM. The timeouts are short so that slow and truncated clients are cut
off quickly, and bodies are limited so that 413 is easy to reach.
"""

from __future__ import annotations

import sys

from catzilla import Catzilla, Request

MAX_BODY = 256 * 1024
HEADER_READ_TIMEOUT = 2.0
BODY_READ_TIMEOUT = 1.0

app = Catzilla(
    max_body_size=MAX_BODY,
    header_read_timeout=HEADER_READ_TIMEOUT,
    body_read_timeout=BODY_READ_TIMEOUT,
)


@app.get("/")
def home(request: Request) -> dict:
    return {"ok": True}


@app.route("/echo", methods=["GET", "POST", "PUT"])
def echo(request: Request) -> dict:
    return {"method": request.method, "size": len(request.body)}


@app.get("/items/{name}")
def item(request: Request, name: str) -> dict:
    return {"name": name, "query": dict(request.query_params)}


@app.post("/json")
def parse_json(request: Request) -> dict:
    data = request.json()
    return {"type": type(data).__name__}


if __name__ == "__main__":
    app.listen(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0)
