"""HTTP throughput of this project's server vs the original Catzilla and Starlette/uvicorn.

Three servers, one after the other, on this machine, in one run:

* ours:    ``http_apps/catzilla_app.py`` on the interpreter running this script (which
           must have this project's package installed);
* orig:    ``http_apps/catzilla_orig_app.py`` on ``catzilla==0.2.3`` from PyPI, with
           ``production=True`` and request logging off, in its own venv;
* uvicorn: ``http_apps/starlette_app.py`` (Starlette) on uvicorn, one worker, access log
           off, in its own venv.

The two venvs are made on first use next to this script (``.venv-catzilla-orig`` and
``.venv-uvicorn``, each holding a ``.gitignore`` of ``*``) and reused after that.

Each server is started on 127.0.0.1 on a free port, checked (GET /json and POST /enqueue
must answer 200), then, for each route, warmed up and measured with
``wrk -t1 -c32 -d10s --latency``, and stopped (SIGINT, then SIGKILL after a deadline).
If ours cannot start (no HTTP server yet), that is reported and the baselines still run.

    python benches/bench_http.py                      # 10 s per route
    python benches/bench_http.py --quick              # 1 s per route, no warm-up: a check
    python benches/bench_http.py --only orig,uvicorn  # baselines only

Needs ``wrk`` on PATH (Debian: ``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchargs import BenchParser

BENCH_DIR = Path(__file__).resolve().parent
APPS_DIR = BENCH_DIR / "http_apps"
HOST = "127.0.0.1"

ORIG_REQUIREMENTS = ("catzilla==0.2.3",)
UVICORN_REQUIREMENTS = ("starlette", "uvicorn")
GRANIAN_REQUIREMENTS = ("granian", "starlette")  # bench_processes.py
HUEY_REQUIREMENTS = ("huey",)  # bench_storage.py
APSCHEDULER_REQUIREMENTS = ("apscheduler<4",)  # bench_periodic.py
# bench_redis.py: each Redis task queue in a venv of its own.
CELERY_REQUIREMENTS = ("celery[redis]",)
DRAMATIQ_REQUIREMENTS = ("dramatiq[redis]",)
ARQ_REQUIREMENTS = ("arq",)
RQ_REQUIREMENTS = ("rq",)
HUEY_REDIS_REQUIREMENTS = ("huey", "redis")
REQUIREMENTS_MARKER = "bench-requirements.txt"
PIP_TIMEOUT = 900  # seconds for a baseline venv's pip install

# Every baseline venv of the benches, by its directory under BENCH_DIR.
BASELINE_VENVS = {
    ".venv-catzilla-orig": ORIG_REQUIREMENTS,  # bench_http.py, bench_idle.py
    ".venv-uvicorn": UVICORN_REQUIREMENTS,  # bench_http.py, bench_processes.py
    ".venv-granian": GRANIAN_REQUIREMENTS,  # bench_processes.py
    ".venv-huey": HUEY_REQUIREMENTS,  # bench_storage.py
    ".venv-apscheduler": APSCHEDULER_REQUIREMENTS,  # bench_periodic.py
    ".venv-celery": CELERY_REQUIREMENTS,  # bench_redis.py
    ".venv-dramatiq": DRAMATIQ_REQUIREMENTS,  # bench_redis.py
    ".venv-arq": ARQ_REQUIREMENTS,  # bench_redis.py
    ".venv-rq": RQ_REQUIREMENTS,  # bench_redis.py
    ".venv-huey-redis": HUEY_REDIS_REQUIREMENTS,  # bench_redis.py
}

SERVER_NAMES = ("ours", "orig", "uvicorn")
BASELINES = ("orig", "uvicorn")

# wrk adds "Content-Length: 0" for an empty body.
POST_SCRIPT = 'wrk.method = "POST"\nwrk.body = ""\n'

LATENCY_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


class BenchError(Exception):
    """A server could not be benchmarked; the message says why."""


@dataclass(frozen=True)
class Route:
    method: str
    path: str

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


ROUTES = (Route("GET", "/json"), Route("POST", "/enqueue"))
# A key that each route's JSON answer must hold (smoke_test), by path.
JSON_KEYS = {"/json": "message", "/enqueue": "task_id"}


PORT = "{port}"  # stands for the server's port in Server.command


@dataclass(frozen=True)
class Server:
    name: str
    description: str
    command: tuple[str, ...]
    # A baseline venv must not pick up this repository's package through PYTHONPATH.
    isolated: bool

    def argv(self, port: int) -> list[str]:
        return [str(port) if arg == PORT else arg for arg in self.command]


@dataclass(frozen=True)
class WrkResult:
    requests: int
    rps: float
    p99_ms: float
    non_2xx: int
    socket_errors: int

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors

    def errors_text(self) -> str:
        if not self.errors:
            return "0"
        parts = [f"{self.non_2xx} non-2xx"] if self.non_2xx else []
        if self.socket_errors:
            parts.append(f"{self.socket_errors} socket")
        return ", ".join(parts)


@dataclass(frozen=True)
class Settings:
    duration: int
    warmup: int
    connections: int
    threads: int
    startup_timeout: float
    stop_timeout: float
    pin: bool


# ---------------------------------------------------------------------------- venvs


def clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"):
        env.pop(name, None)
    return env


def ensure_venv(venv: Path, requirements: Sequence[str], recreate: bool) -> Path:
    """Make ``venv`` with ``requirements`` unless it is already there; return its python."""
    python = venv / "bin" / "python"
    marker = venv / REQUIREMENTS_MARKER
    wanted = "".join(f"{req}\n" for req in requirements)
    if not recreate and python.exists() and marker.exists() and marker.read_text() == wanted:
        print(f"[venv] reusing {venv} ({' '.join(requirements)})")
        return python
    if venv.exists():
        if not (venv / "pyvenv.cfg").exists():
            raise BenchError(f"{venv} exists and is not a venv: not touching it")
        print(f"[venv] removing {venv} to rebuild it")
        shutil.rmtree(venv)
    print(f"[venv] creating {venv} with {sys.executable}")
    subprocess.run(
        [sys.executable, "-m", "venv", str(venv)], check=True, env=clean_env(), timeout=PIP_TIMEOUT
    )
    # Keep the venv out of git, as Python 3.13's venv module does itself.
    (venv / ".gitignore").write_text("*\n")
    print(f"[venv] {python} -m pip install {' '.join(requirements)}")
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, *requirements], check=True, env=clean_env(), timeout=PIP_TIMEOUT)
    marker.write_text(wanted)
    return python


def package_versions(python: Path | str, packages: Sequence[str], isolated: bool) -> str:
    code = (
        "import importlib.metadata as m, sys\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        print(f'{name}=={m.version(name)}')\n"
        "    except m.PackageNotFoundError:\n"
        "        print(f'{name} (not installed)')\n"
    )
    proc = subprocess.run(
        [str(python), "-c", code, *packages],
        capture_output=True,
        text=True,
        env=clean_env() if isolated else None,
        check=False,
    )
    return ", ".join(proc.stdout.splitlines()) if proc.returncode == 0 else "unknown versions"


# ---------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def child_setup(cpus: set[int] | None, default_sigint: bool) -> Callable[[], None] | None:
    """What a child runs before exec: pin it to ``cpus``; give SIGINT its default action.

    A program started in the background by a non-interactive shell inherits SIGINT as
    ignored, and so would our servers: the SIGINT that stops them must not be ignored.
    """
    if cpus is None and not default_sigint:
        return None

    def setup() -> None:
        if default_sigint:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return setup


def cpu_split(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """CPUs for the server and for wrk: CPU 0 and the rest with --pin, else no pinning."""
    if not pin:
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise BenchError("--pin needs at least 2 CPUs")
    return {cpus[0]}, set(cpus[1:])


def http_call(port: int, route: Route, timeout: float) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(route.method, route.path, body=b"" if route.method == "POST" else None)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def log_tail(log: Path, lines: int = 25) -> str:
    text = log.read_text(errors="replace").rstrip()
    tail = text.splitlines()[-lines:]
    return "\n".join(f"    | {line}" for line in tail) if tail else "    | (no output)"


def wait_until_ready(proc: subprocess.Popen[bytes], port: int, timeout: float) -> None:
    """Return once the server answers an HTTP request; fail if it exits or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            raise BenchError(f"exited with code {code} before answering on port {port}")
        try:
            http_call(port, ROUTES[0], timeout=1.0)
            return
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() >= deadline:
            raise BenchError(f"did not answer on port {port} within {timeout:g} s")
        time.sleep(0.05)


def smoke_test(
    port: int, routes: Sequence[Route] = ROUTES, json_keys: Mapping[str, str] = JSON_KEYS
) -> None:
    """Each route must answer 200 with JSON holding its key before they are measured."""
    for route in routes:
        try:
            status, body = http_call(port, route, timeout=5.0)
        except (OSError, http.client.HTTPException) as exc:
            raise BenchError(f"{route} failed: {exc!r}") from exc
        if status != 200:
            raise BenchError(f"{route} answered {status}: {body[:200]!r}")
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise BenchError(f"{route} answered non-JSON: {body[:200]!r}") from exc
        if not isinstance(payload, dict) or json_keys[route.path] not in payload:
            raise BenchError(f"{route} answered unexpected JSON: {payload!r}")


def stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGINT to the server's process group; SIGKILL if it is still there after ``timeout``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"    still running {timeout:g} s after SIGINT: SIGKILL")
    except KeyboardInterrupt:
        print("    interrupted while stopping the server: SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def running(
    server: Server, log: Path, settings: Settings, cpus: set[int] | None
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Start ``server`` on a free port, wait until it answers, and always stop it."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            server.argv(port),
            cwd=APPS_DIR,
            env=clean_env() if server.isolated else None,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: Ctrl-C reaches us, we stop it
            preexec_fn=child_setup(cpus, default_sigint=True),
        )
    try:
        wait_until_ready(proc, port, settings.startup_timeout)
        yield proc, port
    finally:
        stop(proc, settings.stop_timeout)


# ---------------------------------------------------------------------------- wrk


def parse_wrk(output: str) -> WrkResult:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    total = re.search(r"^\s*(\d+) requests in ", output, re.MULTILINE)
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.MULTILINE)
    if not (rps and total and p99):
        raise ValueError(f"cannot parse wrk output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return WrkResult(
        requests=int(total.group(1)),
        rps=float(rps.group(1)),
        p99_ms=float(p99.group(1)) * LATENCY_UNITS_MS[p99.group(2)],
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in sock.groups()) if sock else 0,
    )


def run_wrk(
    port: int,
    route: Route,
    duration: int,
    settings: Settings,
    scripts: dict[str, Path],
    cpus: set[int] | None,
) -> str:
    argv = [
        "wrk",
        f"-t{settings.threads}",
        f"-c{settings.connections}",
        f"-d{duration}s",
        "--latency",
    ]
    if route.method in scripts:
        argv += ["-s", str(scripts[route.method])]
    argv.append(f"http://{HOST}:{port}{route.path}")
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=duration + 60,
            preexec_fn=child_setup(cpus, default_sigint=False),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {exc.timeout:g} s") from exc
    if proc.returncode != 0:
        raise BenchError(f"wrk exited with code {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def bench_server(
    server: Server,
    settings: Settings,
    workdir: Path,
    scripts: dict[str, Path],
    routes: Sequence[Route] = ROUTES,
    json_keys: Mapping[str, str] = JSON_KEYS,
) -> dict[Route, WrkResult]:
    """Start ``server``, check it, measure each of ``routes`` in turn, and stop it."""
    server_cpus, wrk_cpus = cpu_split(settings.pin)
    log = workdir / f"{server.name}.log"
    results: dict[Route, WrkResult] = {}
    try:
        with running(server, log, settings, server_cpus) as (proc, port):
            smoke_test(port, routes, json_keys)
            print(f"    up on port {port}, pid {proc.pid}")
            for route in routes:
                if settings.warmup:
                    run_wrk(port, route, settings.warmup, settings, scripts, wrk_cpus)
                output = run_wrk(port, route, settings.duration, settings, scripts, wrk_cpus)
                if proc.poll() is not None:
                    raise BenchError(f"exited with code {proc.returncode} during {route}")
                try:
                    result = parse_wrk(output)
                except ValueError as exc:
                    raise BenchError(str(exc)) from exc
                results[route] = result
                print(
                    f"    {route!s:<14} {result.rps:>10,.0f} req/s   p99 {result.p99_ms:7.2f} ms"
                    f"   errors {result.errors_text()}"
                )
    except BenchError as exc:
        raise BenchError(f"{exc}\n  server output ({log}):\n{log_tail(log)}") from exc
    return results


# ---------------------------------------------------------------------------- report


def print_results(
    names: Sequence[str],
    results: dict[str, dict[Route, WrkResult]],
    failures: dict[str, str],
    name_width: int = 9,
    route_width: int = 14,
) -> None:
    """One row per server and route: requests/s, p99 and errors (or FAILED)."""
    n, r = name_width, route_width
    header = f"{'server':<{n}} {'route':<{r}} {'requests/s':>12} {'p99 ms':>9}  errors"
    print()
    print(header)
    print("-" * len(header))
    for name in names:
        if name in failures:
            print(f"{name:<{n}} {'-':<{r}} {'FAILED':>12} {'-':>9}  -")
            continue
        for route, res in results[name].items():
            print(
                f"{name:<{n}} {route!s:<{r}} {res.rps:>12,.0f} {res.p99_ms:>9.2f}"
                f"  {res.errors_text()}"
            )


def print_table(
    names: Sequence[str],
    results: dict[str, dict[Route, WrkResult]],
    failures: dict[str, str],
) -> None:
    print_results(names, results, failures)

    print()
    baselines = [b for b in BASELINES if b in results]
    if "ours" not in results or not baselines:
        why = "ours did not run" if "ours" not in results else "no baseline ran"
        print(f"ratios (requests/s): n/a, {why}")
        return
    columns = "".join(f"{'ours/' + b:>16}" for b in baselines)
    print(f"{'ratios (requests/s)':<24}{columns}")
    for route in ROUTES:
        ours = results["ours"][route].rps
        cells = "".join(f"{ours / results[b][route].rps:>15.2f}x" for b in baselines)
        print(f"{route!s:<24}{cells}")


# ---------------------------------------------------------------------------- main


def add_server_options(parser: argparse.ArgumentParser, stop_timeout: float) -> None:
    """The options every HTTP bench has for its servers and their venvs."""
    parser.add_argument(
        "--startup-timeout", type=float, default=30.0, help="seconds for a server to answer (30)"
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=stop_timeout,
        help=f"seconds from SIGINT to SIGKILL ({stop_timeout:g})",
    )
    parser.add_argument(
        "--venv-dir",
        type=Path,
        default=BENCH_DIR,
        help="where the baseline venvs live (default: next to this script)",
    )
    parser.add_argument("--recreate-venvs", action="store_true", help="rebuild the baseline venvs")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = BenchParser(__doc__)
    parser.add_size("--duration", type=int, full=10, quick=1, help="seconds per route")
    parser.add_size("--warmup", type=int, full=2, quick=0, help="warm-up seconds per route")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    parser.add_argument(
        "--only",
        default=",".join(SERVER_NAMES),
        help=f"comma-separated servers to run, in order (default {','.join(SERVER_NAMES)})",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin the server to the first CPU and wrk to the others",
    )
    add_server_options(parser, stop_timeout=5.0)
    args = parser.parse(argv)
    args.names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.names) - set(SERVER_NAMES))
    if unknown or not args.names:
        parser.error(f"--only takes names from {', '.join(SERVER_NAMES)}; got {args.only!r}")
    if args.duration < 1 or args.warmup < 0 or args.connections < args.threads:
        parser.error("need --duration >= 1, --warmup >= 0 and --connections >= --threads")
    return args


def make_servers(names: Sequence[str], venv_dir: Path, recreate: bool) -> dict[str, Server]:
    servers: dict[str, Server] = {}
    for name in names:
        if name == "ours":
            python = Path(sys.executable)
            versions = package_versions(python, ["catzilla"], isolated=False)
            servers[name] = Server(
                name,
                f"this project's catzilla on {python} ({versions})",
                (str(python), str(APPS_DIR / "catzilla_app.py"), PORT),
                isolated=False,
            )
        elif name == "orig":
            python = ensure_venv(venv_dir / ".venv-catzilla-orig", ORIG_REQUIREMENTS, recreate)
            versions = package_versions(python, ["catzilla"], isolated=True)
            servers[name] = Server(
                name,
                f"{versions}, production=True, request logging off",
                (str(python), str(APPS_DIR / "catzilla_orig_app.py"), PORT),
                isolated=True,
            )
        else:
            python = ensure_venv(venv_dir / ".venv-uvicorn", UVICORN_REQUIREMENTS, recreate)
            versions = package_versions(python, ["starlette", "uvicorn"], isolated=True)
            servers[name] = Server(
                name,
                f"{versions}, 1 worker, --log-level warning --no-access-log",
                (
                    *(str(python), "-m", "uvicorn", "starlette_app:app"),
                    *("--app-dir", str(APPS_DIR), "--host", HOST, "--port", PORT),
                    *("--workers", "1", "--log-level", "warning", "--no-access-log"),
                ),
                isolated=True,
            )
    return servers


def wrk_version() -> str:
    proc = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    first = (proc.stdout or proc.stderr).splitlines()
    return first[0].strip() if first else "wrk (unknown version)"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not on PATH: install it (Debian/Ubuntu: apt-get install wrk)")
        return 2
    settings = Settings(
        duration=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        threads=args.threads,
        startup_timeout=args.startup_timeout,
        stop_timeout=args.stop_timeout,
        pin=args.pin,
    )
    try:
        servers = make_servers(args.names, args.venv_dir.resolve(), args.recreate_venvs)
    except (BenchError, subprocess.CalledProcessError) as exc:
        print(f"cannot set up the baseline venvs: {exc}")
        return 2

    print()
    print(f"{wrk_version()}; {os.cpu_count()} CPUs; pinning: {'on' if args.pin else 'off'}")
    print(
        f"wrk -t{settings.threads} -c{settings.connections} -d{settings.duration}s --latency, "
        f"after a {settings.warmup} s warm-up, per route"
    )
    results: dict[str, dict[Route, WrkResult]] = {}
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench_http-") as tmp:
        workdir = Path(tmp)
        post_script = workdir / "post.lua"
        post_script.write_text(POST_SCRIPT)
        scripts = {"POST": post_script}
        for name in args.names:
            server = servers[name]
            print(f"\n[{name}] {server.description}")
            try:
                results[name] = bench_server(server, settings, workdir, scripts)
            except BenchError as exc:
                failures[name] = str(exc)
                print(f"    FAILED: {exc}")
                if name == "ours":
                    print(
                        "    Our server did not start: is this project installed in this"
                        " interpreter, and are Request, JSONResponse and app.listen there"
                        " yet? The baselines still run."
                    )

    print_table(args.names, results, failures)
    if failures:
        print(f"\nnot benchmarked: {', '.join(failures)} (see above)")
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted (the server under test was stopped)")
        sys.exit(130)
