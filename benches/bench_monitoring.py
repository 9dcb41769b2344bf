"""What monitoring costs: the same app with Prometheus metrics and the
dashboard (one live dashboard client connected) against the app without
them, in paired runs; and, for information, with a task event hook too.

Each round starts ``http_apps/catzilla_monitor_app.py`` in each mode (``off``,
``on``, ``hook``; the order rotates), one after the other, and measures:

* tasks end to end: ``POST /burst?n=N`` queues N no-op tasks and waits for all
  of them, timed inside the server (best of a few bursts);
* HTTP: ``wrk`` on ``GET /json``.

With ``on`` and ``hook``, a client holds the dashboard's live stream open
(reading its snapshots, once a second) while both are measured. Each round
gives a ratio to ``off``; the medians are printed. A hook is Python code
called for every task, so its cost is the hook's own; it is shown apart.
Run on a release build:

    python benches/bench_monitoring.py            # 7 rounds
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
            if mode != "off":
                snapshots = stack.enter_context(dashboard_client(port))
            seconds = burst_seconds(port, args.tasks, args.bursts)
            out = run_wrk(port, JSON, args.duration, settings, {}, None)
            result = parse_wrk(out)
            if result.errors:
                raise BenchError(f"wrk saw errors on {mode}: {result.errors_text()}")
            if mode != "off" and snapshots[0] == 0:
                raise BenchError("the dashboard client read no snapshot")
        return seconds, result.rps


def main(argv: list[str] | None = None) -> int:
    parser = BenchParser(__doc__)
    parser.add_size("--rounds", type=int, full=7, quick=1, help="paired rounds")
    parser.add_size("--tasks", type=int, full=100_000, quick=500, help="tasks per burst")
    parser.add_size("--bursts", type=int, full=5, quick=1, help="bursts per server (best taken)")
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
    modes = ("off", "on", "hook")
    ratios: dict[str, list[tuple[float, float]]] = {"on": [], "hook": []}
    print(f"{'round':>5}  " + "  ".join(f"{m + ' tasks':>11}  {m + ' rps':>9}" for m in modes))
    for i in range(args.rounds):
        order = modes[i % 3 :] + modes[: i % 3]
        got: dict[str, tuple[float, float]] = {}
        for mode in order:
            try:
                got[mode] = measure(mode, args, settings, log)
            except (BenchError, subprocess.SubprocessError) as exc:
                print(f"monitoring {mode}: {exc}", file=sys.stderr)
                return 1
        t_off, r_off = got["off"]
        for mode in ("on", "hook"):
            # "x the cost": > 1 is slower than without monitoring.
            ratios[mode].append((got[mode][0] / t_off, r_off / got[mode][1]))
        print(f"{i + 1:>5}  " + "  ".join(f"{got[m][0]:>10.3f}s  {got[m][1]:>9.0f}" for m in modes))
    print()
    for mode, what in (("on", "metrics + dashboard"), ("hook", "metrics + dashboard + a hook")):
        tasks = [t for t, _ in ratios[mode]]
        http = [h for _, h in ratios[mode]]
        print(f"{what}, vs off (x the cost; 1.000x: none):")
        print(
            f"  tasks end to end (time):   median {statistics.median(tasks):.3f}x "
            f"(range {min(tasks):.3f}-{max(tasks):.3f})"
        )
        print(
            f"  HTTP GET /json (1/rps):    median {statistics.median(http):.3f}x "
            f"(range {min(http):.3f}-{max(http):.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
