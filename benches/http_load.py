"""HTTP load at full scale: wrk on 256 keep-alive connections for 30 s against
``benches/soak_app.py``, whose ``POST /task`` queues one no-op task per request.

    python benches/http_load.py                        # wrk -t2 -c256 -d30s
    python benches/http_load.py --duration 10 --json   # shorter; JSON summary
    python benches/http_load.py --quick                # wrk -c32 -d1s: a check of the script

Checks (exit 0 only if all hold; exit 2 if wrk is not installed):

* no errors: wrk reports no non-2xx answers and no socket errors (connect,
  read, write, timeout);
* no lost tasks: once the engine has drained, the tasks that ran equal the
  tasks the app submitted, which are at least the requests wrk counted (wrk
  stops with requests in flight that the server still answers and counts),
  and the engine's ``total_tasks_submitted`` and ``total_tasks_processed``
  equal them;
* the server exits 0 on SIGINT.

tests/test_load.py runs the CI-scale version with a Python client.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_http import parse_wrk
from benchargs import BenchParser
from soak import HOST, AppServer

POST_SCRIPT = 'wrk.method = "POST"\nwrk.body = ""\n'


def drained(counts: dict[str, Any]) -> bool:
    s = counts["stats"]
    done = s["total_tasks_processed"] + s["failed_tasks"] + s["cancelled_tasks"]
    return s["total_queued"] == 0 and s["running_tasks"] == 0 and done == s["total_tasks_submitted"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    server = AppServer()
    try:
        conn = server.connection(10)
        conn.request("POST", "/task", body=b"")
        smoke = conn.getresponse()
        smoke_body = json.loads(smoke.read())
        conn.close()
        if smoke.status != 200 or "task_id" not in smoke_body:
            raise RuntimeError(f"POST /task answered {smoke.status}: {smoke_body}")
        rss_before = server_rss(server)
        with tempfile.TemporaryDirectory(prefix="http_load-") as tmp:
            script = Path(tmp) / "post.lua"
            script.write_text(POST_SCRIPT)
            argv = [
                "wrk",
                f"-t{args.threads}",
                f"-c{args.connections}",
                f"-d{args.duration}s",
                "--latency",
                "-s",
                str(script),
                f"http://{HOST}:{server.port}/task",
            ]
            started = time.monotonic()
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=args.duration + 120, check=False
            )
            took = time.monotonic() - started
        if proc.returncode != 0:
            raise RuntimeError(f"wrk exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        wrk = parse_wrk(proc.stdout)
        rss_loaded = server_rss(server)

        end = time.monotonic() + args.drain_timeout
        counts = server.counts()
        while not drained(counts) and time.monotonic() < end:
            time.sleep(0.05)
            counts = server.counts()
        did_drain = drained(counts)
        if not did_drain:
            server.dump_stacks()
        exit_code = server.stop(30)
    finally:
        server.kill()

    s = counts["stats"]
    submitted = counts["submitted"].get("http", 0) - 1  # less the smoke test's task
    ran = counts["attempts"].get("http", 0) - 1
    failures: list[str] = []
    if wrk.non_2xx:
        failures.append(f"{wrk.non_2xx} non-2xx answers")
    if wrk.socket_errors:
        failures.append(f"{wrk.socket_errors} socket errors")
    if not did_drain:
        failures.append(f"the engine did not drain within {args.drain_timeout:g} s: {s}")
    if ran != submitted:
        failures.append(f"lost tasks: {submitted} submitted, {ran} ran")
    if submitted < wrk.requests:
        failures.append(f"{wrk.requests} requests answered but only {submitted} tasks submitted")
    if not (s["total_tasks_submitted"] == s["total_tasks_processed"] == submitted + 1):
        failures.append(
            f"engine stats: submitted {s['total_tasks_submitted']},"
            f" processed {s['total_tasks_processed']}, app counted {submitted + 1}"
        )
    if s["failed_tasks"] or s["cancelled_tasks"] or s["rejected_tasks"]:
        failures.append(
            f"failed {s['failed_tasks']}, cancelled {s['cancelled_tasks']},"
            f" rejected {s['rejected_tasks']}"
        )
    if exit_code != 0:
        failures.append(f"the server exited with {exit_code} (None: killed after 30 s)")
    if failures and (not did_drain or exit_code != 0):
        failures.append(server.tail())
    return {
        "ok": not failures,
        "failures": failures,
        "wrk": {
            "requests": wrk.requests,
            "requests_per_s": wrk.rps,
            "p99_ms": wrk.p99_ms,
            "non_2xx": wrk.non_2xx,
            "socket_errors": wrk.socket_errors,
            "seconds": round(took, 1),
        },
        "tasks": {"submitted": submitted, "ran": ran},
        "rss_mb": {"before": rss_before, "after_load": rss_loaded},
        "server_exit_code": exit_code,
        "wrk_output": proc.stdout,
    }


def server_rss(server: AppServer) -> float:
    c = server.counts()
    return round(float(c["stats"]["memory_usage_mb"]), 1)


def main(argv: list[str] | None = None) -> int:
    parser = BenchParser(__doc__)
    parser.add_size("--duration", type=int, full=30, quick=1, help="wrk seconds")
    parser.add_size("--connections", type=int, full=256, quick=32, help="wrk connections")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument("--drain-timeout", type=float, default=60, help="seconds to drain (60)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse(argv)
    if shutil.which("wrk") is None:
        print("wrk is not on PATH: install it (Debian/Ubuntu: apt-get install wrk)")
        return 2
    if args.duration < 1 or args.connections < args.threads:
        parser.error("need --duration >= 1 and --connections >= --threads")
    summary = run(args)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0 if summary["ok"] else 1
    w, t = summary["wrk"], summary["tasks"]
    print(summary["wrk_output"].rstrip())
    print(
        f"\nwrk -t{args.threads} -c{args.connections} -d{args.duration}s POST /task:"
        f" {w['requests']} requests ({w['requests_per_s']:,.0f}/s, p99 {w['p99_ms']:.2f} ms),"
        f" {w['non_2xx']} non-2xx, {w['socket_errors']} socket errors"
    )
    print(f"tasks: {t['submitted']} submitted by the app, {t['ran']} ran")
    rss = summary["rss_mb"]
    print(f"server RSS: {rss['before']} MB before, {rss['after_load']} MB after the load")
    for failure in summary["failures"]:
        print(f"FAILED: {failure}")
    print("PASS" if summary["ok"] else "FAIL")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
