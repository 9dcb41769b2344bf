"""Routes are compiled as they are declared: a bad template, a duplicate or a
conflict is a ValueError at the decorator, naming the route."""

from __future__ import annotations

import pytest
from catzilla import Catzilla


def handler(request) -> dict:
    return {}


def test_a_duplicate_route_raises_at_the_decorator():
    app = Catzilla()
    app.get("/tasks/{task_id}")(handler)
    with pytest.raises(ValueError, match=r"GET /tasks/\{task_id\} is defined twice"):
        app.get("/tasks/{task_id}")(handler)
    app.post("/tasks/{task_id}")(handler)  # another method of the same path is fine


def test_a_conflicting_template_raises_at_the_decorator():
    app = Catzilla()
    app.get("/tasks/{task_id}")(handler)
    with pytest.raises(ValueError, match="conflicts"):
        app.get("/tasks/{other}")(handler)


@pytest.mark.parametrize("path", ["tasks", "/{1x}", "/{}", "/{a", "/a}"])
def test_a_bad_template_raises_before_any_handler(path):
    with pytest.raises(ValueError, match="route"):
        Catzilla().get(path)


def test_template_parameters_reach_the_handler_plan():
    app = Catzilla()

    @app.get("/files/{owner}/{*rest}")
    def files(request, owner: str, rest: str) -> dict:
        return {"owner": owner, "rest": rest}

    assert [(m, p) for m, p, _ in app.routes] == [("GET", "/files/{owner}/{*rest}")]
