"""tests/legacy_app.py, written for the original Catzilla 0.2.3, runs
unchanged: in-process through the TestClient, and as a program."""

from __future__ import annotations

import importlib.util
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from catzilla.testing import TestClient
from helpers import DEADLINE, Client, ServerProcess, free_port, wait_until

APP = Path(__file__).with_name("legacy_app.py")

# The options of 0.2 that mean nothing here, each warned about once.
IGNORED = ["auto_validation", "enable_di", "show_banner", "enable_c_compilation", "use_jemalloc"]


def load() -> ModuleType:
    """A fresh import of the app, under a name of its own."""
    spec = importlib.util.spec_from_file_location(f"legacy_app_{id(object())}", APP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def legacy() -> Iterator[ModuleType]:
    with pytest.warns(DeprecationWarning) as warned:
        module = load()
    messages = [str(w.message) for w in warned]
    for option in IGNORED:
        said = [m for m in messages if f"({option}=...) has no effect" in m]
        # use_jemalloc=True is 0.2's default: only an explicit value is said.
        assert len(said) <= 1, (option, messages)
    assert any("enable_c_compilation=..." in m for m in messages), messages
    assert all(w.filename == str(APP) for w in warned), [w.filename for w in warned]
    yield module
    if module.app.tasks is not None and not module.app.tasks.is_shutdown:
        module.app.tasks.shutdown(timeout=DEADLINE)


EMAIL = {"to": "ada@example.com", "subject": "hello", "body": "one two three", "tags": ["intro"]}


def test_a_model_body_with_query_and_header_parameters_queues_the_email(
    legacy: ModuleType,
) -> None:
    with TestClient(legacy.app) as client:
        with pytest.warns(DeprecationWarning, match=r"add_task\(compile_to_c="):
            r = client.post(
                "/emails", params={"priority": "high"}, json=EMAIL, headers={"X-Request-Id": "r-1"}
            )
        assert r.status_code == 202, r.text
        answer = r.json()
        assert answer["request_id"] == "r-1" and answer["tags"] == ["intro"]

        done = {t.task_id: t for t in legacy.app.tasks.drain(timeout=DEADLINE)}
        email, words = done[answer["task_id"]], done[answer["words_task_id"]]
        sent = {"to": "ada@example.com", "subject": "hello", "body": "one two three"}
        assert email.result() == sent
        assert email.priority.name == "HIGH"
        assert words.result() == 3 and words.priority.name == "LOW"  # from @app.task
        # add_callback got the value (0.2's semantics), before drain returned.
        assert legacy.delivered == ["ada@example.com"]

        status = client.get(f"/emails/{answer['task_id']}").json()
        assert status == {
            "task_id": answer["task_id"],
            "status": "completed",
            "ready": True,
            "result": sent,
        }
        stats = client.get("/stats").json()
        assert stats["total_workers"] == 4 and stats["total_tasks_processed"] == 2
        assert stats["outbox"] == 1
    assert legacy.app.tasks.is_shutdown


def test_the_header_and_query_defaults_apply(legacy: ModuleType) -> None:
    with TestClient(legacy.app) as client:
        with pytest.warns(DeprecationWarning, match="compile_to_c"):
            r = client.post("/emails", json={"to": "b@example.com", "subject": "s"})
        assert r.status_code == 202, r.text
        assert r.json()["request_id"] is None and r.json()["tags"] == []
        done = legacy.app.tasks.drain(timeout=DEADLINE)
        assert {t.priority.name for t in done} == {"NORMAL", "LOW"}


@pytest.mark.parametrize(
    ("query", "body", "where"),
    [
        ({"priority": "urgent"}, EMAIL, ["query", "priority"]),
        ({"delay_ms": "-5"}, EMAIL, ["query", "delay_ms"]),
        ({"delay_ms": "soon"}, EMAIL, ["query", "delay_ms"]),
        ({}, {**EMAIL, "to": "not-an-address"}, ["body", "to"]),
        ({}, {**EMAIL, "subject": "x" * 101}, ["body", "subject"]),
        ({}, {**EMAIL, "tags": list("abcdef")}, ["body", "tags"]),
        ({}, {"subject": "no recipient"}, ["body", "to"]),
    ],
)
def test_invalid_input_answers_422_and_queues_nothing(
    legacy: ModuleType, query: dict[str, str], body: dict[str, object], where: list[str]
) -> None:
    with TestClient(legacy.app) as client:
        r = client.post("/emails", params=query, json=body)
        assert r.status_code == 422, r.text
        assert [e["loc"] for e in r.json()["detail"]] == [where]
        assert legacy.app.tasks.drain(timeout=DEADLINE) == []
        assert legacy.outbox == []


def test_it_runs_as_a_program() -> None:
    port = free_port()
    server = ServerProcess(["-W", "default::DeprecationWarning", str(APP), str(port)])
    try:
        server.wait_serving()
        client = Client("127.0.0.1", port)
        r = client.post(
            "/emails?priority=critical",
            json.dumps(EMAIL),
            headers={"Content-Type": "application/json", "X-Request-Id": "p-1"},
        )
        assert r.status == 202, r.body
        task_id = r.json()["task_id"]

        def completed() -> bool:
            return client.get(f"/emails/{task_id}").json()["status"] == "completed"

        wait_until(completed, DEADLINE, what="the email task completed")
        assert client.get("/stats").json()["delivered"] == ["ada@example.com"]
        assert server.stop(signal.SIGINT) == 0
        assert "enable_c_compilation=...) has no effect" in "\n".join(server.stderr)
    finally:
        server.close()
