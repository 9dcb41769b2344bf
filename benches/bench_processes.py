"""HTTP throughput of multi-process serving: catzilla on 2 processes vs granian and uvicorn.

Five servers, one after the other, on this machine, in one run, each serving the same
two routes with the same answers:

* catzilla-p2:  ``http_apps/catzilla_mp_app.py`` on this project's catzilla, with the
                interpreter running this script (which must have it installed):
                ``python -m catzilla run catzilla_mp_app:app --host 127.0.0.1 --port PORT
                --processes 2``, from ``http_apps/``;
* catzilla-p1:  the same with ``--processes 1``, for the scaling from 1 process to 2;
* granian-rsgi: ``http_apps/granian_rsgi_app.py``, a plain RSGI app, on granian
                ``--interface rsgi --workers 2``, access log off;
* granian-asgi: ``http_apps/starlette_app.py`` (Starlette) on granian
                ``--interface asgi --workers 2``, access log off;
* uvicorn:      the same Starlette app on uvicorn ``--workers 2``, access log off, run
                through ``http_apps/uvicorn_nodelay.py``: uvicorn's own command line,
                but with TCP_NODELAY on its connections, which ``--workers N`` leaves
                off (uvicorn issue #3149): without it, every response waits ~40 ms for
                the client's delayed ACK, and the figure is that timer's, ~730 req/s
                on either route, not uvicorn's.

The routes:

* GET /json: ``{"message": "Hello, World!"}``, the trivial route: what the server itself
  costs per request;
* GET /cpu:  about 200 us of pure-Python work that holds the GIL, the same function in
  every app (``http_apps/cpu_work.py``, timed here at the start of the run), answered
  as ``{"result": ...}``: what running Python handlers on several processes gains.

The baselines run from their own venvs, made on first use next to this script and
reused after that: ``.venv-granian`` (granian, starlette) and ``.venv-uvicorn``
(starlette, uvicorn; shared with bench_http.py). Each server is started on 127.0.0.1
on a free port, checked (both routes must answer 200 with JSON), then, for each route,
warmed up and measured with ``wrk -t1 -c32 -d10s --latency``, and stopped (SIGINT to
its process group, then SIGKILL after a deadline). Nothing is pinned: the server's
processes and wrk share the machine's CPUs, the same for every server.

All of that is done ``--rounds`` times (3) over every server in turn, and each figure is
its median round's: the machine is shared and a single 10 s run of one server can land
in a slow spell. The ratios are catzilla-p2's requests/s over each baseline's, per route
(above 1: catzilla is faster), and catzilla-p2's over catzilla-p1's (the scaling; about
2x on GET /cpu is the most 2 processes can give, with CPUs to spare). If this catzilla
has no ``python -m catzilla run`` yet, that is reported, the baselines still run, and
the exit code is 1. The exit code is 0 only if every server ran and answered every
request of the run with a 2xx.

    python benches/bench_processes.py                                  # 10 s per route
    python benches/bench_processes.py --quick                          # 1 s, no warm-up
    python benches/bench_processes.py --only granian-rsgi,granian-asgi,uvicorn

Needs ``wrk`` on PATH (Debian: ``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench_http import (
    APPS_DIR,
    BASELINE_VENVS,
    HOST,
    PORT,
    BenchError,
    Route,
    Server,
    Settings,
    WrkResult,
    add_server_options,
    bench_server,
    ensure_venv,
    package_versions,
    print_results,
    wrk_version,
)
from benchargs import BenchParser

sys.path.insert(0, str(APPS_DIR))

from cpu_work import ITERATIONS, cpu_work  # noqa: E402

PROCESSES = 2  # of catzilla-p2, and the workers of each baseline
SERVER_NAMES = ("catzilla-p2", "catzilla-p1", "granian-rsgi", "granian-asgi", "uvicorn")
OURS = "catzilla-p2"
ONE_PROCESS = "catzilla-p1"
BASELINES = ("granian-rsgi", "granian-asgi", "uvicorn")

ROUTES = (Route("GET", "/json"), Route("GET", "/cpu"))
JSON_KEYS = {"/json": "message", "/cpu": "result"}

CATZILLA_APP = "catzilla_mp_app:app"
RUN_FLAGS = ("--host", "--port", "--processes")  # what ``catzilla run --help`` must offer


def catzilla_run_command(python: Path, processes: int) -> tuple[str, ...]:
    return (
        *(str(python), "-m", "catzilla", "run", CATZILLA_APP),
        *("--host", HOST, "--port", PORT, "--processes", str(processes)),
    )


def catzilla_run_missing(python: Path) -> str | None:
    """Why this catzilla cannot serve with ``python -m catzilla run ... --processes N``,
    or None if ``run --help`` offers the flags the bench uses."""
    try:
        proc = subprocess.run(
            [str(python), "-m", "catzilla", "run", "--help"],
            cwd=APPS_DIR,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "`python -m catzilla run --help` did not finish within 60 s"
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return f"`python -m catzilla run --help` exited {proc.returncode}: {last[0]}"
    missing = [flag for flag in RUN_FLAGS if flag not in proc.stdout]
    if missing:
        return f"`python -m catzilla run` has no {', '.join(missing)}"
    return None


def make_servers(names: Sequence[str], venv_dir: Path, recreate: bool) -> dict[str, Server]:
    servers: dict[str, Server] = {}
    pythons: dict[str, Path] = {}

    def venv_python(venv: str) -> Path:
        if venv not in pythons:
            pythons[venv] = ensure_venv(venv_dir / venv, BASELINE_VENVS[venv], recreate)
        return pythons[venv]

    for name in names:
        if name in (OURS, ONE_PROCESS):
            python = Path(sys.executable)
            processes = PROCESSES if name == OURS else 1
            versions = package_versions(python, ["catzilla"], isolated=False)
            servers[name] = Server(
                name,
                f"this project's catzilla on {python} ({versions}),"
                f" `catzilla run --processes {processes}`",
                catzilla_run_command(python, processes),
                isolated=False,
            )
        elif name in ("granian-rsgi", "granian-asgi"):
            python = venv_python(".venv-granian")
            interface = name.removeprefix("granian-")
            app = "granian_rsgi_app:app" if interface == "rsgi" else "starlette_app:app"
            packages = ["granian"] if interface == "rsgi" else ["granian", "starlette"]
            versions = package_versions(python, packages, isolated=True)
            servers[name] = Server(
                name,
                f"{versions}, {app}, --interface {interface} --workers {PROCESSES}, access log off",
                (
                    *(str(python), "-m", "granian", "--interface", interface),
                    *("--workers", str(PROCESSES), "--host", HOST, "--port", PORT),
                    *("--working-dir", str(APPS_DIR), "--no-access-log"),
                    *("--log-level", "warning", app),
                ),
                isolated=True,
            )
        else:
            python = venv_python(".venv-uvicorn")
            versions = package_versions(python, ["starlette", "uvicorn"], isolated=True)
            servers[name] = Server(
                name,
                f"{versions}, starlette_app:app, --workers {PROCESSES}, access log off,"
                " TCP_NODELAY on (uvicorn_nodelay.py)",
                (
                    *(str(python), str(APPS_DIR / "uvicorn_nodelay.py"), "starlette_app:app"),
                    *("--app-dir", str(APPS_DIR), "--host", HOST, "--port", PORT),
                    *("--workers", str(PROCESSES), "--log-level", "warning", "--no-access-log"),
                ),
                isolated=True,
            )
    return servers


def time_cpu_work() -> float:
    """Microseconds that one ``cpu_work()`` takes in this interpreter (the best of 5
    rounds of 200, after a warm-up)."""
    cpu_work()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(200):
            cpu_work()
        rounds.append((time.perf_counter() - start) / 200)
    return min(rounds) * 1e6


# ---------------------------------------------------------------------------- report


def median(runs: list[WrkResult]) -> WrkResult:
    """The run with the median requests/s (the lower middle one of an even count)."""
    ordered = sorted(runs, key=lambda r: r.rps)
    return ordered[(len(ordered) - 1) // 2]


def ratio(top: WrkResult, bottom: WrkResult) -> str:
    return f"{top.rps / bottom.rps:.2f}x" if bottom.rps > 0 else "n/a"


def print_table(
    names: Sequence[str],
    results: dict[str, dict[Route, WrkResult]],
    failures: dict[str, str],
) -> None:
    print_results(names, results, failures, name_width=13, route_width=10)

    print()
    baselines = [b for b in BASELINES if b in results]
    if OURS not in results or not baselines:
        why = f"{OURS} did not run" if OURS not in results else "no baseline ran"
        print(f"ratios (requests/s): n/a, {why}")
    else:
        columns = "".join(f"{OURS + '/' + b:>27}" for b in baselines)
        print(f"{'ratios (requests/s)':<21}{columns}")
        for route in ROUTES:
            cells = "".join(
                f"{ratio(results[OURS][route], results[b][route]):>27}" for b in baselines
            )
            print(f"{route!s:<21}{cells}")

    print()
    for route in ROUTES:
        label = f"scaling {route} p2/p1"
        if OURS in results and ONE_PROCESS in results:
            print(f"{label:<24}{ratio(results[OURS][route], results[ONE_PROCESS][route]):>8}")
        else:
            missing = ", ".join(n for n in (OURS, ONE_PROCESS) if n not in results)
            print(f"{label:<24}{'n/a':>8}  ({missing} did not run)")


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = BenchParser(__doc__)
    parser.add_size("--duration", type=int, full=10, quick=1, help="seconds per route")
    parser.add_size("--warmup", type=int, full=2, quick=0, help="warm-up seconds per route")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_size(
        "--rounds",
        type=int,
        full=3,
        quick=1,
        help="rounds over every server; each figure is the median round's",
    )
    parser.add_choices("--only", SERVER_NAMES, help="servers to run")
    add_server_options(parser, stop_timeout=10.0)
    args = parser.parse(argv)
    if args.duration < 1 or args.warmup < 0 or args.connections < 1 or args.rounds < 1:
        parser.error("need --duration >= 1, --warmup >= 0, --connections >= 1 and --rounds >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not on PATH: install it (Debian/Ubuntu: apt-get install wrk)")
        return 2
    settings = Settings(
        duration=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        threads=1,
        startup_timeout=args.startup_timeout,
        stop_timeout=args.stop_timeout,
        pin=False,
    )
    try:
        servers = make_servers(args.only, args.venv_dir.resolve(), args.recreate_venvs)
    except (BenchError, subprocess.CalledProcessError) as exc:
        print(f"cannot set up the baseline venvs: {exc}")
        return 2

    print()
    print(f"{wrk_version()}; {os.cpu_count()} CPUs; no pinning")
    print(
        f"wrk -t{settings.threads} -c{settings.connections} -d{settings.duration}s --latency, "
        f"after a {settings.warmup} s warm-up, per route"
    )
    print(f"GET /cpu: cpu_work() of {ITERATIONS:,} iterations takes {time_cpu_work():.0f} us here")
    rounds: dict[str, dict[Route, list[WrkResult]]] = {}
    failures: dict[str, str] = {}
    run_missing = None
    if OURS in args.only or ONE_PROCESS in args.only:
        run_missing = catzilla_run_missing(Path(sys.executable))
    with tempfile.TemporaryDirectory(prefix="bench_processes-") as tmp:
        workdir = Path(tmp)
        # NOTE: the machine is shared and noisy; rounds over every server, and
        # the median of each, keep one slow spell from deciding a ratio.
        for number, name in ((n, name) for n in range(args.rounds) for name in args.only):
            if name in failures:
                continue
            server = servers[name]
            print(f"\n[{name}] round {number + 1} of {args.rounds}: {server.description}")
            if name in (OURS, ONE_PROCESS) and run_missing is not None:
                failures[name] = f"this catzilla cannot serve on several processes: {run_missing}"
                print(f"    NOT RUN: {failures[name]}")
                print("    (python -m catzilla run is not there yet?) The baselines still run.")
                continue
            print(f"    $ {' '.join('PORT' if arg == PORT else arg for arg in server.command)}")
            try:
                got = bench_server(server, settings, workdir, {}, ROUTES, JSON_KEYS)
                for route, res in got.items():
                    rounds.setdefault(name, {}).setdefault(route, []).append(res)
            except BenchError as exc:
                failures[name] = str(exc)
                print(f"    FAILED: {exc}")

    results = {
        name: {route: median(runs) for route, runs in by_route.items()}
        for name, by_route in rounds.items()
        if name not in failures
    }
    print_table(args.only, results, failures)
    with_errors = [
        f"{name} {route}: {res.errors_text()}"
        for name, by_route in rounds.items()
        for route, runs in by_route.items()
        for res in runs
        if res.errors
    ]
    if failures:
        print(f"\nnot benchmarked: {', '.join(failures)} (see above)")
    if with_errors:
        print(f"\nerrors: {'; '.join(with_errors)}")
    return 1 if failures or with_errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted (the server under test was stopped)")
        sys.exit(130)
