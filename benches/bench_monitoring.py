"""What monitoring costs: the same app with metrics, the dashboard (one live
dashboard client connected) and a task event hook, against the app without
them, in paired runs.

Each round starts ``http_apps/catzilla_monitor_app.py`` twice, ``off`` and
``on`` (in alternating order), one after the other, and measures on each:

* tasks end to end: ``POST /burst?n=N`` queues N no-op tasks and waits for all
  of them, timed inside the server (best of a few bursts);
* HTTP: ``wrk`` on ``GET /json``.

For ``on``, a client holds the dashboard's live stream open (reading its
snapshots, once a second) while both are measured. Each round gives an on/off
ratio; the medians are printed. Run on a release build:

    python benches/bench_monitoring.py            # 5 rounds
    python benches/bench_monitoring.py --quick    # a check, not a figure

Needs ``wrk`` on PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import statistics
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from bench_http import (
    APPS_DIR,
    HOST,
    BenchError,
    Route,
    Server,
    Settings,
    parse_wrk,
    run_wrk,
    running,
)
from benchargs import BenchParser

TOKEN = "bench-token-0"
JSON = Route("GET", "/json")


def app_server(mode: str) -> Server:
    return Server(
        name=mode,
        description=f"catzilla, monitoring {mode}",
        command=(sys.executable, str(APPS_DIR / "catzilla_monitor_app.py"), "{port}", mode),
        isolated=False,
    )


@contextlib.contextmanager
def dashboard_client(port: int) -> Iterator[list[int]]:
    """Holds the dashboard's live stream open and counts the snapshots read."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    conn.request("GET", "/_catzilla/api/stream", headers={"authorization": f"Bearer {TOKEN}"})
    response = conn.getresponse()
    if response.status != 200:
        raise BenchError(f"the dashboard stream answered {response.status}")
    snapshots = [0]

    def read() -> None:
        with contextlib.suppress(OSError, http.client.HTTPException, ValueError, AttributeError):
            for line in response:
                if line.startswith(b"event: snapshot"):
                    snapshots[0] += 1

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield snapshots
    finally:
        conn.close()


def burst_seconds(port: int, n: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        conn = http.client.HTTPConnection(HOST, port, timeout=120)
        try:
            conn.request("POST", f"/burst?n={n}", body=b"")
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise BenchError(f"/burst answered {response.status}: {body[:200]!r}")
        best = min(best, float(json.loads(body)["seconds"]))
    return best


def measure(
    mode: str, args: argparse.Namespace, settings: Settings, log: Path
) -> tuple[float, float]:
    """(seconds for a burst of tasks, requests per second) of one server."""
    with running(app_server(mode), log, settings, None) as (_, port):
        with contextlib.ExitStack() as stack:
            if mode == "on":
                snapshots = stack.enter_context(dashboard_client(port))
            seconds = burst_seconds(port, args.tasks, args.bursts)
            out = run_wrk(port, JSON, args.duration, settings, {}, None)
            result = parse_wrk(out)
            if result.errors:
                raise BenchError(f"wrk saw errors on {mode}: {result.errors_text()}")
            if mode == "on" and snapshots[0] == 0:
                raise BenchError("the dashboard client read no snapshot")
        return seconds, result.rps


def main(argv: list[str] | None = None) -> int:
    parser = BenchParser(__doc__)
    parser.add_size("--rounds", type=int, full=5, quick=1, help="paired rounds")
    parser.add_size("--tasks", type=int, full=20000, quick=500, help="tasks per burst")
    parser.add_size("--bursts", type=int, full=3, quick=1, help="bursts per server (best taken)")
    parser.add_size("--duration", type=int, full=8, quick=1, help="wrk seconds per server")
    args = parser.parse(argv)
    settings = Settings(
        duration=args.duration,
        warmup=0,
        connections=32,
        threads=1,
        startup_timeout=30.0,
        stop_timeout=15.0,
        pin=False,
    )
    log = Path(__file__).resolve().parent / ".bench_monitoring.log"
    task_ratios: list[float] = []
    http_ratios: list[float] = []
    print(
        f"{'round':>5}  {'tasks off':>10}  {'tasks on':>10}  {'ratio':>6}  "
        f"{'rps off':>9}  {'rps on':>9}  {'ratio':>6}"
    )
    for i in range(args.rounds):
        order = ("off", "on") if i % 2 == 0 else ("on", "off")
        got: dict[str, tuple[float, float]] = {}
        for mode in order:
            try:
                got[mode] = measure(mode, args, settings, log)
            except BenchError as exc:
                print(f"monitoring {mode}: {exc}", file=sys.stderr)
                return 1
            except subprocess.SubprocessError as exc:
                print(f"monitoring {mode}: {exc!r}", file=sys.stderr)
                return 1
        (t_off, r_off), (t_on, r_on) = got["off"], got["on"]
        # Ratios are "on takes x the time": > 1 is slower with monitoring.
        task_ratios.append(t_on / t_off)
        http_ratios.append(r_off / r_on)
        print(
            f"{i + 1:>5}  {t_off:>9.3f}s  {t_on:>9.3f}s  {task_ratios[-1]:>6.3f}  "
            f"{r_off:>9.0f}  {r_on:>9.0f}  {http_ratios[-1]:>6.3f}"
        )
    print()
    print(
        f"tasks end to end, on/off time:        median {statistics.median(task_ratios):.3f}x "
        f"(range {min(task_ratios):.3f}-{max(task_ratios):.3f})"
    )
    print(
        f"HTTP GET /json, off/on throughput:    median {statistics.median(http_ratios):.3f}x "
        f"(range {min(http_ratios):.3f}-{max(http_ratios):.3f})"
    )
    print("(1.000x: no cost; 1.050x: 5% slower with metrics, dashboard and a hook)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
