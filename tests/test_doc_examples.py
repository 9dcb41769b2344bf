"""The 14 examples of the user's background-tasks documentation, run unchanged.

Each example is started as its own program (``python EXAMPLE``) on port 8000,
one at a time; the test calls every endpoint it prints ("Try: curl ...") and
every other one it defines, checks the documented JSON, checks that the
background work really happened (from what the example prints, or from its
own endpoints), then stops it with SIGINT and expects a clean exit.
"""

from __future__ import annotations

import re
import signal
import socket
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from helpers import DEADLINE, Client, ServerProcess, wait_until

EXAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "doc" / "examples"
if not EXAMPLES.is_dir():
    pytest.skip(f"the documentation examples are not at {EXAMPLES}", allow_module_level=True)

PORT = 8000
# What the examples serve on, spoken to without a proxy (http_proxy & co. are
# not consulted): the examples are on this machine.
CLIENT = Client("127.0.0.1", PORT)
START_TIMEOUT = 30.0
EXIT_TIMEOUT = 10.0
TASK_ID = re.compile(r"^[0-9a-f]{20}$")


def ok_json(method: str, path: str, keys: set[str], client: Client = CLIENT) -> dict[str, Any]:
    """Calls an endpoint that must answer 200 with a JSON object with exactly
    ``keys``, as the documentation's curl commands call it (POST with no body)."""
    r = client.request(method, path)
    assert r.status == 200, (method, path, r.status, r.body)
    data = r.json()
    assert isinstance(data, dict)
    assert set(data) == keys, (method, path, data)
    return data


def assert_task_id(value: Any) -> None:
    assert isinstance(value, str) and TASK_ID.match(value), value


def assert_numbers(data: Any, where: str = "") -> None:
    """Every leaf of ``data`` is an int or float (never a bool, str or None)."""
    if isinstance(data, dict):
        for k, v in data.items():
            assert_numbers(v, f"{where}.{k}")
    else:
        ok = isinstance(data, int | float) and not isinstance(data, bool)
        assert ok, f"{where} is {data!r}, not a number"


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_port_free(port: int = PORT, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not port_is_free(port):
        if time.monotonic() >= end:
            pytest.fail(
                f"port {port} is still in use after {timeout} s; the examples need it: "
                "stop whatever listens there"
            )
        time.sleep(0.05)


def tried(p: ServerProcess) -> set[tuple[str, str]]:
    """The (method, path) of every ``Try: curl ...`` line the example printed."""
    found = set()
    for line in p.lines():
        m = re.search(r"Try: curl (?:-X (\w+) )?http://localhost:8000(\S*)", line)
        if m:
            found.add((m.group(1) or "GET", m.group(2)))
    return found


@pytest.fixture
def example(spawn: Callable[..., ServerProcess], tmp_path: Path) -> Callable[..., ServerProcess]:
    """Starts an example, unchanged, once port 8000 is free; waits until it serves."""

    def start(name: str, endpoints: set[tuple[str, str]]) -> ServerProcess:
        script = EXAMPLES / name
        assert script.is_file(), f"{script} is missing"
        wait_port_free()
        p = spawn([str(script)], cwd=str(tmp_path))
        host, port = p.wait_serving(START_TIMEOUT)
        assert (host, port) == ("127.0.0.1", PORT)
        assert tried(p) == endpoints, "the test must call every endpoint the example prints"
        return p

    return start


def no_errors(p: ServerProcess) -> None:
    out = p.output()
    assert "Traceback" not in out, out
    assert "raised an exception" not in out, out
    assert "never awaited" not in out, out


def stop_cleanly(p: ServerProcess, timeout: float = EXIT_TIMEOUT) -> None:
    """SIGINT: the example must exit with 0 within ``timeout`` s, no traceback."""
    code = p.stop(signal.SIGINT, timeout)
    assert code == 0, p.output()
    no_errors(p)


def watch(p: ServerProcess, seconds: float) -> None:
    """Lets ``seconds`` pass (behaviour over time, not synchronisation),
    failing as soon as an error shows in the example's output."""
    end = time.monotonic() + seconds

    def over() -> bool:
        no_errors(p)
        assert p.proc.poll() is None, f"the example exited:\n{p.output()}"
        return time.monotonic() >= end

    wait_until(over, timeout=seconds + DEADLINE, interval=0.05, what="time to pass")


def test_01_basic_background_task(example: Callable[..., ServerProcess]):
    p = example("01_basic_background_task.py", {("POST", "/start-task")})
    data = ok_json("POST", "/start-task", {"message", "task_id", "status"})
    assert data["message"] == "Task started"
    assert data["status"] == "scheduled"
    assert_task_id(data["task_id"])
    # The documentation's URL says localhost.
    home = ok_json("GET", "/", {"message"}, client=Client("localhost", PORT))
    assert home["message"] == "Hello with background tasks!"
    p.wait_for("Task progress: 1/10", timeout=15)
    # Shutdown lets the running task finish: its remaining ~9 s of work.
    stop_cleanly(p, timeout=25)
    out = "\n".join(p.lines())
    for i in range(1, 11):
        assert f"Task progress: {i}/10" in out


def test_02_async_background_tasks(example: Callable[..., ServerProcess]):
    p = example("02_async_background_tasks.py", {("POST", "/fetch-data")})
    data = ok_json("POST", "/fetch-data", {"message", "task_id", "estimated_duration"})
    assert data["message"] == "Async task started"
    assert data["estimated_duration"] == "2-3 seconds"
    assert_task_id(data["task_id"])
    # The coroutine prints nothing; it runs ~2.5 s: no error may show meanwhile.
    watch(p, 3.0)
    stop_cleanly(p)


def test_03_delayed_execution(example: Callable[..., ServerProcess]):
    p = example("03_delayed_execution.py", {("POST", "/schedule-reminder")})
    data = ok_json("POST", "/schedule-reminder", {"message", "task_id", "scheduled_for"})
    assert data["message"] == "Reminder scheduled"
    assert_task_id(data["task_id"])
    datetime.fromisoformat(data["scheduled_for"])
    p.wait_for("Sending reminder email")
    stop_cleanly(p)


def test_04_recurring_tasks(example: Callable[..., ServerProcess]):
    p = example("04_recurring_tasks.py", {("POST", "/start-monitoring")})
    data = ok_json("POST", "/start-monitoring", {"message", "task_id", "interval", "note"})
    assert data["message"] == "System monitoring started"
    assert data["interval"] == "immediate"
    assert_task_id(data["task_id"])
    p.wait_for("System Health - CPU: 25.5%, Memory: 60.2%")
    stop_cleanly(p)


def test_05_progress_tracking(example: Callable[..., ServerProcess]):
    p = example(
        "05_progress_tracking.py",
        {("POST", "/process-data"), ("GET", "/task-progress/{task_id}")},
    )
    data = ok_json(
        "POST", "/process-data", {"message", "task_id", "catzilla_task_id", "progress_available"}
    )
    assert data["message"] == "Data processing started"
    assert data["progress_available"] is True
    assert_task_id(data["catzilla_task_id"])
    task_id = data["task_id"]
    assert re.fullmatch(r"data_[0-9a-f]{8}", task_id)

    seen: list[int] = []
    last: dict[str, Any] = {}

    def completed() -> bool:
        r = CLIENT.get(f"/task-progress/{task_id}")
        if r.status == 404:  # the task has not started yet
            assert not seen, "progress vanished"
            assert r.json() == {"error": "Task not found"}
            return False
        assert r.status == 200, r.body
        info = r.json()
        assert set(info) == {
            "task_id",
            "progress_percent",
            "current_step",
            "status",
            "started_at",
            "result",
        }
        assert info["task_id"] == task_id
        seen.append(info["progress_percent"])
        last.update(info)
        return info["status"] == "completed"

    wait_until(completed, timeout=30, interval=0.2, what="the data processing task to complete")
    assert seen == sorted(seen), f"progress went backwards: {seen}"
    assert len(set(seen)) >= 2, f"progress never advanced: {seen}"
    assert seen[-1] == 100
    assert last["current_step"] == "Saving results..."
    assert last["result"]["processed_records"] == 1000
    datetime.fromisoformat(last["started_at"])
    assert f"Task {task_id}: Saving results... (100%)" in "\n".join(p.lines())

    r = CLIENT.get("/task-progress/data_unknown")
    assert r.status == 404
    assert r.json() == {"error": "Task not found"}
    stop_cleanly(p)


def test_06_real_time_task_updates(example: Callable[..., ServerProcess]):
    p = example("06_real_time_task_updates.py", {("GET", "/active-tasks"), ("GET", "/task-stats")})
    active = ok_json("GET", "/active-tasks", {"active_tasks", "total_count"})
    assert active == {"active_tasks": [], "total_count": 0}

    stats = ok_json("GET", "/task-stats", {"catzilla_stats"})["catzilla_stats"]
    assert set(stats) == {"queue_metrics", "worker_metrics", "performance_metrics"}
    assert set(stats["queue_metrics"]) == {
        "critical_queue_size",
        "high_queue_size",
        "normal_queue_size",
        "low_queue_size",
        "total_queued",
    }
    assert set(stats["worker_metrics"]) == {"active_workers", "idle_workers", "total_workers"}
    assert set(stats["performance_metrics"]) == {
        "tasks_per_second",
        "avg_execution_time_ms",
        "memory_usage_mb",
    }
    assert_numbers(stats)
    assert stats["worker_metrics"]["total_workers"] == 4
    assert stats["queue_metrics"]["total_queued"] == 0
    assert stats["performance_metrics"]["memory_usage_mb"] > 0
    stop_cleanly(p)


def test_07_task_error_recovery(example: Callable[..., ServerProcess]):
    p = example("07_task_error_recovery.py", {("POST", "/unreliable-task")})
    ids = set()
    for _ in range(4):
        data = ok_json("POST", "/unreliable-task", {"message", "task_id", "note"})
        assert data["message"] == "Unreliable task started"
        assert_task_id(data["task_id"])
        ids.add(data["task_id"])
    assert len(ids) == 4
    # Tasks fail at random and are retried; the server logs no error meanwhile.
    stop_cleanly(p)


def test_08_custom_error_handlers(example: Callable[..., ServerProcess]):
    p = example("08_custom_error_handlers.py", {("POST", "/task-with-error-handling")})
    ids = set()
    for _ in range(3):
        data = ok_json("POST", "/task-with-error-handling", {"message", "task_id", "note"})
        assert data["message"] == "Task with error handling started"
        assert_task_id(data["task_id"])
        ids.add(data["task_id"])
    assert len(ids) == 3
    stop_cleanly(p)


def test_09_task_queues_and_priorities(example: Callable[..., ServerProcess]):
    p = example(
        "09_task_queues_and_priorities.py",
        {("POST", "/priority-task"), ("POST", "/batch-processing")},
    )
    data = ok_json("POST", "/priority-task", {"message", "task_id", "priority"})
    assert data["priority"] == "HIGH"
    assert_task_id(data["task_id"])
    p.wait_for("Performing critical system maintenance")

    batch = ok_json("POST", "/batch-processing", {"message", "batch_tasks", "total_items"})
    assert batch["total_items"] == 10
    assert isinstance(batch["batch_tasks"], list)
    assert len(set(batch["batch_tasks"])) == 10
    for task_id in batch["batch_tasks"]:
        assert_task_id(task_id)
    assert data["task_id"] not in batch["batch_tasks"]
    # Shutdown waits for the 5 s maintenance task and the batch.
    stop_cleanly(p, timeout=20)


def test_10_graceful_shutdown(example: Callable[..., ServerProcess]):
    p = example("10_graceful_shutdown.py", {("GET", "/shutdown-status")})
    status = ok_json("GET", "/shutdown-status", {"shutdown_requested", "message"})
    assert status == {"shutdown_requested": False, "message": "Server is running normally"}

    start = time.monotonic()
    p.proc.send_signal(signal.SIGINT)
    p.wait_for("Graceful shutdown initiated")
    p.wait_for("Waiting for tasks to complete")
    # The example's own handler sleeps 5 s; the server still answers meanwhile.
    during = ok_json("GET", "/shutdown-status", {"shutdown_requested", "message"})
    assert during == {"shutdown_requested": True, "message": "Shutdown in progress"}
    code = p.wait_exit(15, "SIGINT")
    assert code == 0, p.output()
    assert time.monotonic() - start >= 4.5, "the example's 5 s wait was cut short"
    assert "Graceful shutdown completed" in "\n".join(p.lines())
    no_errors(p)


def test_11_persistent_results(example: Callable[..., ServerProcess]):
    p = example(
        "11_persistent_results.py",
        {("POST", "/long-calculation"), ("GET", "/calculation-result/{task_id}")},
    )
    data = ok_json("POST", "/long-calculation", {"message", "task_id", "catzilla_task_id", "note"})
    assert data["message"] == "Calculation started"
    assert_task_id(data["catzilla_task_id"])
    task_id = data["task_id"]
    assert re.fullmatch(r"calc_[0-9a-f]{8}", task_id)

    def result() -> dict[str, Any] | None:
        r = CLIENT.get(f"/calculation-result/{task_id}")
        if r.status == 404:
            assert r.json() == {"error": "Result not found or not yet available"}
            return None
        assert r.status == 200, r.body
        return r.json()

    found = wait_until(result, timeout=30, interval=0.1, what="the calculation result")
    assert set(found) == {"task_id", "result", "retrieved_at"}
    assert found["task_id"] == task_id
    calc = found["result"]
    assert calc["calculation"] == "sum_of_squares"
    assert calc["result"] == sum(i * i for i in range(1000000))
    datetime.fromisoformat(calc["computed_at"])
    datetime.fromisoformat(found["retrieved_at"])

    r = CLIENT.get("/calculation-result/calc_unknown")
    assert r.status == 404
    assert r.json() == {"error": "Result not found or not yet available"}
    stop_cleanly(p)


def test_12_task_analytics(example: Callable[..., ServerProcess]):
    p = example("12_task_analytics.py", {("GET", "/task-analytics"), ("GET", "/task-performance")})
    analytics = ok_json(
        "GET",
        "/task-analytics",
        {
            "total_tasks_executed",
            "performance_metrics",
            "queue_status",
            "worker_status",
            "memory_usage",
            "error_metrics",
            "uptime_seconds",
        },
    )
    assert set(analytics["performance_metrics"]) == {
        "tasks_per_second",
        "average_execution_time_ms",
        "p95_execution_time_ms",
    }
    assert set(analytics["queue_status"]) == {"total_queued", "queue_pressure"}
    assert set(analytics["worker_status"]) == {
        "active_workers",
        "total_workers",
        "worker_utilization",
    }
    assert set(analytics["memory_usage"]) == {"current_mb", "efficiency"}
    assert set(analytics["error_metrics"]) == {"failed_tasks", "error_rate"}
    assert_numbers(analytics)
    assert analytics["worker_status"]["total_workers"] == 4
    assert analytics["uptime_seconds"] > 0
    assert analytics["memory_usage"]["current_mb"] > 0

    perf = ok_json(
        "GET", "/task-performance", {"performance_summary", "detailed_metrics", "timestamp"}
    )
    summary = perf["performance_summary"]
    assert set(summary) == {
        "throughput",
        "avg_response_time",
        "memory_efficiency",
        "worker_utilization",
    }
    assert re.fullmatch(r"\d+\.\d\d tasks/sec", summary["throughput"]), summary
    assert re.fullmatch(r"\d+\.\d\dms", summary["avg_response_time"]), summary
    assert re.fullmatch(r"\d+\.\d%", summary["memory_efficiency"]), summary
    assert re.fullmatch(r"\d+\.\d%", summary["worker_utilization"]), summary
    detailed = perf["detailed_metrics"]
    assert set(detailed) == {"execution_times", "resource_usage"}
    assert set(detailed["execution_times"]) == {"average_ms", "p95_ms", "p99_ms"}
    assert set(detailed["resource_usage"]) == {"cpu_usage", "memory_mb", "engine_cpu"}
    assert_numbers(detailed)
    datetime.fromisoformat(perf["timestamp"])

    later = ok_json("GET", "/task-analytics", set(analytics))
    assert later["uptime_seconds"] > analytics["uptime_seconds"]
    stop_cleanly(p)


def test_13_task_design_guidelines(example: Callable[..., ServerProcess]):
    p = example("13_task_design_guidelines.py", {("POST", "/good-task")})
    data = ok_json("POST", "/good-task", {"task_id"})
    assert_task_id(data["task_id"])
    stop_cleanly(p)


def test_14_performance_tips(example: Callable[..., ServerProcess]):
    p = example(
        "14_performance_tips.py",
        {("POST", "/io-task"), ("POST", "/cpu-task"), ("POST", "/batch-task")},
    )
    io = ok_json("POST", "/io-task", {"task_id", "type"})
    assert io["type"] == "io_bound"
    cpu = ok_json("POST", "/cpu-task", {"task_id", "type"})
    assert cpu["type"] == "cpu_bound"
    batch = ok_json("POST", "/batch-task", {"task_id", "type", "items"})
    assert batch["type"] == "batch"
    assert batch["items"] == 5
    ids = [io["task_id"], cpu["task_id"], batch["task_id"]]
    for task_id in ids:
        assert_task_id(task_id)
    assert len(set(ids)) == 3
    stop_cleanly(p)
