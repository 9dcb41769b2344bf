"""What a request model costs: the same POST route with its JSON body
validated by a pydantic model (``user: User``) against the route reading
``request.json()`` and checking the same fields by hand.

``http_apps/catzilla_params_app.py`` serves both routes side by side
(``POST /model`` and ``POST /hand``); each round measures both with ``wrk``
(the order alternates), on the same body, a small model of four fields (str,
int, an email-like str with a pattern, list[str]). Each round gives the ratio
of the per-request cost (1/rps) model/hand; the median is printed. Every
answer must be a 2xx: a 422 would mean the body did not pass.

It also measures in this process what the server cannot show apart: the
model route's adapter (made by ``make_adapter``, as route registration makes
it) against the hand-written handler, each called with a stand-in request
holding the same body (the real ``Request`` is made only by the server).

Target: model/hand at most 1.3x over HTTP. Run on a release build:

    python benches/bench_params.py            # 7 rounds of 5 s per route
    python benches/bench_params.py --quick    # a check, not a figure

Needs ``wrk`` on PATH.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

sys.path.insert(0, str(APPS_DIR))
import catzilla_params_app as params_app  # noqa: E402

MODEL = Route("POST", "/model")
HAND = Route("POST", "/hand")
TARGET = 1.3

SERVER = Server(
    name="params",
    description="catzilla, a model route and a hand-checked one",
    command=(sys.executable, str(APPS_DIR / "catzilla_params_app.py"), "{port}"),
    isolated=False,
)


def post(port: int, path: str, body: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"content-type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def smoke_test(port: int) -> None:
    """Both routes answer the body alike, and both refuse a bad one with 422."""
    answers = {route.path: post(port, route.path, params_app.BODY) for route in (MODEL, HAND)}
    if answers[MODEL.path] != answers[HAND.path] or answers[MODEL.path][0] != 200:
        raise BenchError(f"the routes answer differently: {answers}")
    bad = json.dumps({**json.loads(params_app.BODY), "age": -1})
    for route in (MODEL, HAND):
        status, _ = post(port, route.path, bad)
        if status != 422:
            raise BenchError(f"{route} answered {status} to a bad body, not 422")


def wrk_script(directory: Path) -> Path:
    script = directory / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(params_app.BODY)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    return script


def measure(port: int, route: Route, seconds: int, settings: Settings, script: Path) -> float:
    """Requests per second of ``route``; every answer must be a 2xx."""
    result = parse_wrk(run_wrk(port, route, seconds, settings, {"POST": script}, None))
    if result.errors:
        raise BenchError(f"wrk saw errors on {route}: {result.errors_text()}")
    return result.rps


class StandIn:
    """What the two handlers read of a request: its body, and ``json()``."""

    __slots__ = ("body",)

    def __init__(self, body: bytes) -> None:
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def per_call(fn: Callable[[], Any], calls: int, repeats: int) -> float:
    """Microseconds per call of ``fn``, best of ``repeats``."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - started)
    return best / calls * 1e6


def in_process(calls: int, repeats: int) -> tuple[float, float]:
    """(model adapter, hand-written handler): microseconds per request."""
    from catzilla.web import make_adapter

    adapter = make_adapter(params_app.model_route, MODEL.path, [])
    request = StandIn(params_app.BODY.encode())
    if adapter(request) != params_app.hand_route(request):  # type: ignore[arg-type]
        raise BenchError("in process, the two handlers answer differently")
    model = per_call(lambda: adapter(request), calls, repeats)  # type: ignore[arg-type]
    hand = per_call(lambda: params_app.hand_route(request), calls, repeats)  # type: ignore[arg-type]
    return model, hand


def run(args: argparse.Namespace) -> int:
    settings = Settings(
        duration=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        threads=1,
        startup_timeout=30.0,
        stop_timeout=15.0,
        pin=False,
    )
    log = Path(__file__).resolve().parent / ".bench_params.log"
    ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench_params-") as tmp:
        script = wrk_script(Path(tmp))
        with running(SERVER, log, settings, None) as (_, port):
            smoke_test(port)
            if args.warmup:
                for route in (MODEL, HAND):
                    measure(port, route, args.warmup, settings, script)
            print(f"wrk -t1 -c{args.connections} -d{args.duration}s per route and round")
            print(f"{'round':>5}  {'model rps':>10}  {'hand rps':>10}  {'model/hand':>10}")
            for i in range(args.rounds):
                order = (MODEL, HAND) if i % 2 == 0 else (HAND, MODEL)
                rps = {
                    route: measure(port, route, args.duration, settings, script) for route in order
                }
                ratio = rps[HAND] / rps[MODEL]  # x the cost per request
                ratios.append(ratio)
                print(f"{i + 1:>5}  {rps[MODEL]:>10,.0f}  {rps[HAND]:>10,.0f}  {ratio:>9.3f}x")
    model_us, hand_us = in_process(args.calls, 5)
    median = statistics.median(ratios)
    print()
    print("POST /model vs POST /hand (x the cost per request; 1.000x: none):")
    print(
        f"  HTTP (1/rps):            median {median:.3f}x "
        f"(range {min(ratios):.3f}-{max(ratios):.3f})"
    )
    print(
        f"  in process (handler):    {model_us / hand_us:.3f}x "
        f"(model {model_us:.2f} us, hand {hand_us:.2f} us per request)"
    )
    met = "met" if median <= TARGET else "NOT met"
    print(f"target: model/hand <= {TARGET}x over HTTP: {met}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = BenchParser(__doc__)
    parser.add_size("--rounds", type=int, full=7, quick=1, help="paired rounds")
    parser.add_size("--duration", type=int, full=5, quick=1, help="wrk seconds per route")
    parser.add_size("--warmup", type=int, full=2, quick=0, help="wrk warm-up seconds per route")
    parser.add_size("--connections", type=int, full=32, quick=8, help="wrk connections")
    parser.add_size("--calls", type=int, full=200_000, quick=2_000, help="in-process calls")
    args = parser.parse(argv)
    try:
        return run(args)
    except (BenchError, subprocess.SubprocessError) as exc:
        print(f"bench_params: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
