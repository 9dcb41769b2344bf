"""One POST route twice: validated by a pydantic model, and checked by hand.

Run by ``benches/bench_params.py``:

    python catzilla_params_app.py PORT

``POST /model`` takes ``user: User`` (catzilla validates the JSON body with
the model); ``POST /hand`` reads ``request.json()`` and checks the same
fields the same way by hand. Both answer the same JSON, and 422 for a body
that does not pass. ``GET /json`` is there for the bench's readiness check.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from catzilla import BaseModel, Catzilla, Field, HTTPError, JSONResponse, Request, Response

EMAIL = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
EMAIL_RE = re.compile(EMAIL)

# The body both routes are sent (bench_params.py's wrk script).
BODY = '{"name":"Ada Lovelace","age":36,"email":"ada@example.com","tags":["math","engines"]}'


class User(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    age: int = Field(ge=0, le=150)
    email: str = Field(pattern=EMAIL)
    tags: list[str] = []


app = Catzilla()


@app.get("/json")
def json_route(request: Request) -> Response:
    return JSONResponse({"message": "Hello, World!"})


@app.post("/model")
def model_route(user: User) -> dict[str, Any]:
    return {"name": user.name, "age": user.age, "tags": len(user.tags)}


@app.post("/hand")
def hand_route(request: Request) -> dict[str, Any]:
    data = request.json()
    if not isinstance(data, dict):
        raise HTTPError(422, "the body must be a JSON object")
    name = data.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 100:
        raise HTTPError(422, "name must be a str of 1 to 100 characters")
    age = data.get("age")
    if not isinstance(age, int) or isinstance(age, bool) or not 0 <= age <= 150:
        raise HTTPError(422, "age must be an int from 0 to 150")
    email = data.get("email")
    if not isinstance(email, str) or EMAIL_RE.match(email) is None:
        raise HTTPError(422, "email must be an email address")
    tags = data.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise HTTPError(422, "tags must be a list of str")
    return {"name": name, "age": age, "tags": len(tags)}


if __name__ == "__main__":
    app.listen(port=int(sys.argv[1]), host="127.0.0.1")
