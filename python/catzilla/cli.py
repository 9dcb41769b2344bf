"""The ``catzilla`` command line.

- ``catzilla run module:app`` serves an app, in one process or in several
  that share one listening socket, kept running by a supervisor.
- ``catzilla worker module:app`` runs an app's background tasks from its
  shared store, in one process or in several.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import logging
import math
import os
import queue
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any, NoReturn

from . import _sockets, engine, recovery
from ._signals import StopSignals
from .app import Catzilla
from .engine import BackgroundTasks
from .supervisor import (
    READY_FD_OPTION,
    ChildSpec,
    Supervisor,
    python_command,
    tell_ready,
    watch_sources,
)

logger = logging.getLogger("catzilla.worker")
server_logger = logging.getLogger("catzilla.server")

#: The exit code of a mistake in the command line (and of ``worker``'s target).
EXIT_USAGE = 2
#: The exit code of ``run`` when the app cannot be loaded or served.
EXIT_FAILURE = 1
LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# NOTE: a signal that lands on one of the engine's threads does not wake the
# main thread's wait; it runs at the next wake-up, so this bounds its delay.
TICK = 0.5


class ImportFailed(Exception):
    """The target's module raised while it was imported: perhaps a passing
    problem (a database not up yet), so a supervisor restarts the process."""


class UsageError(Exception):
    """A mistake in the command line or the target: one line, exit code 2."""


@dataclass(frozen=True)
class Target:
    """Where the app is: ``module:attr``."""

    module: str
    attr: str

    def __str__(self) -> str:
        return f"{self.module}:{self.attr}"


@dataclass(frozen=True)
class WorkerOptions:
    """The options of ``catzilla worker``."""

    target: Target
    workers: int | None
    processes: int
    queues: list[str] | None
    log_level: str
    grace: float
    supervisor_pid: int | None


def redact(url: str) -> str:
    """``url`` with its password, if it has one, replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep or rest.startswith("/"):
        return url
    # NOTE: the last "@" ends the credentials, so a password holding a raw
    # "/" or "@" is still hidden whole.
    end = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    credentials, at, _ = rest[:end].rpartition("@")
    user, colon, _ = credentials.partition(":")
    if not at or not colon:
        return url
    return f"{scheme}://{user}:***@{rest[len(credentials) + 1 :]}"


def main(argv: list[str] | None = None) -> int:
    """Runs the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except UsageError as exc:
        return _usage_error(str(exc))
    except SystemExit as exc:  # --help has printed what was asked
        return exc.code if isinstance(exc.code, int) else 0
    logging.basicConfig(level=LOG_LEVELS[args.log_level], format=LOG_FORMAT)
    if args.command == "run":
        try:
            run_options = _run_options(args)
        except argparse.ArgumentTypeError as exc:
            return _usage_error(f"argument TARGET: {exc}", EXIT_FAILURE)
        return run_command(run_options)
    options = WorkerOptions(
        target=args.target,
        workers=args.workers,
        processes=args.processes,
        queues=args.queues,
        log_level=args.log_level,
        grace=args.grace,
        supervisor_pid=args.supervisor_pid,
    )
    try:
        if options.processes > 1:
            return supervise(options)
        return run_worker(options)
    except UsageError as exc:
        return _usage_error(str(exc))
    except ImportFailed as exc:
        return _usage_error(str(exc), EXIT_FAILURE)


# One worker process


def run_worker(options: WorkerOptions) -> int:
    """Imports the app and runs its tasks until SIGTERM or SIGINT; then running
    tasks get ``grace`` seconds, and a second signal stops waiting for them."""
    if options.workers is not None:
        # Exactly that many threads: auto-scaling does not add more.
        engine.OVERRIDES["workers"] = options.workers
        engine.OVERRIDES["max_workers"] = options.workers
    if options.queues is not None:
        engine.OVERRIDES["queues"] = list(options.queues)
    tasks = load_engine(options.target)
    storage = tasks.config["storage"]
    if storage is None:
        raise UsageError(
            "the worker command needs a shared store: "
            "enable_background_tasks(storage='sqlite:///...' or 'redis://...')"
        )
    queues = options.queues or tasks.config.get("queues") or ["default"]
    # Before saying it serves: tasks that processes now gone left are taken
    # back first (leases of exited processes of this host; expired ones).
    tasks.recover()
    logger.info(
        "worker for %s serving queue(s) %s with %d worker(s); store %s",
        options.target,
        ", ".join(queues),
        tasks.config["workers"],
        redact(storage),
    )
    stop: queue.SimpleQueue[None] = queue.SimpleQueue()
    # NOTE: SimpleQueue.put is safe to call from a signal handler that
    # interrupts the wait; Event.set could deadlock on its own lock there.
    signals = StopSignals(lambda: stop.put(None))
    signals.install()
    try:
        try:
            _wait_for_stop(stop, options.supervisor_pid)
        finally:
            # Also when the program's own handler raised SystemExit: the
            # tasks drain first, as in Catzilla.listen.
            report = _drain(tasks, signals, options.grace)
    finally:
        signals.restore()
    logger.info(
        "worker stopped: drained=%s, handed back to the queue=%d",
        report["drained"],
        len(report.get("handed_back", ())),
    )
    return 0


def _drain(tasks: BackgroundTasks, signals: StopSignals, grace: float) -> dict[str, Any]:
    logger.info("stopping: running tasks get up to %g s to finish", grace)
    try:
        signals.draining = True
        return tasks.shutdown(wait_for_completion=signals.received < 2, timeout=grace)
    except KeyboardInterrupt:
        # A second signal while tasks drain: the engine stopped waiting and
        # kept its report, which a further call returns.
        logger.warning("second signal: no longer waiting for running tasks")
        return tasks.shutdown(wait_for_completion=False, timeout=0)


def load_target(target: Target) -> Any:
    """Imports ``target``'s module (the current directory first on
    ``sys.path``) and returns its attribute; ``UsageError`` says what failed."""
    cwd = os.getcwd()
    if not sys.path or sys.path[0] not in ("", cwd):
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(target.module)
    except ImportError as exc:
        raise UsageError(f"cannot import module {target.module!r}: {exc}") from None
    except Exception as exc:
        raise ImportFailed(
            f"importing module {target.module!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    recovery.register_main_alias(target.module)
    obj: Any = module
    for name in target.attr.split("."):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            raise UsageError(
                f"{target}: module {target.module!r} has no attribute {target.attr!r}"
            ) from None
    return obj


def load_engine(target: Target) -> BackgroundTasks:
    """The engine at ``target``: a ``Catzilla`` app's ``tasks`` or a ``BackgroundTasks``."""
    obj = load_target(target)
    if isinstance(obj, Catzilla):
        if obj.tasks is None:
            raise UsageError(f"{target} has not enabled background tasks")
        return obj.tasks
    if isinstance(obj, BackgroundTasks):
        return obj
    raise UsageError(f"{target} is a {type(obj).__name__}, not a Catzilla app or BackgroundTasks")


def _wait_for_stop(stop: queue.SimpleQueue[None], supervisor_pid: int | None) -> None:
    while True:
        try:
            stop.get(timeout=TICK)
            return
        except queue.Empty:
            if supervisor_pid is not None and os.getppid() != supervisor_pid:
                logger.warning("the supervisor (pid %d) is gone; stopping", supervisor_pid)
                return


# Worker processes under a supervisor


def supervise(options: WorkerOptions) -> int:
    """Runs ``options.processes`` worker processes, restarting any that exits,
    until SIGTERM or SIGINT; then stops them (SIGTERM, and SIGKILL after
    ``grace`` + ``KILL_MARGIN`` seconds)."""
    argv = python_command("worker", str(options.target), "--processes", "1")
    if options.workers is not None:
        argv += ["--workers", str(options.workers)]
    if options.queues is not None:
        argv += ["--queues", ",".join(options.queues)]
    argv += ["--log-level", options.log_level, "--grace", repr(options.grace)]
    argv += ["--supervisor-pid", str(os.getpid())]
    spec = ChildSpec(argv=argv, kind="worker process", usage_code=EXIT_USAGE)
    logger.info("supervising %d worker processes for %s", options.processes, options.target)
    return Supervisor(spec, options.processes, grace=options.grace).run()


# Serving: catzilla run


@dataclass(frozen=True)
class RunOptions:
    """The options of ``catzilla run``."""

    target: Target
    host: str
    port: int
    uds: str | None
    processes: int
    threads: int | None
    reload: bool
    log_level: str
    access_log: bool
    backlog: int
    forwarded_allow_ips: list[str] | None
    grace: float
    # Set by the supervisor on its children.
    fd: int | None
    ready_fd: int | None
    supervisor_pid: int | None


def run_command(options: RunOptions) -> int:
    """Serves the app in this process, or under a supervisor with
    ``--processes`` above 1 or ``--reload``."""
    try:
        if options.fd is None and (options.processes > 1 or options.reload):
            return supervise_servers(options)
        return serve_here(options)
    except (UsageError, ImportFailed) as exc:
        return _usage_error(str(exc), EXIT_FAILURE)


def load_app(target: Target) -> Catzilla:
    """The ``Catzilla`` app at ``target``."""
    obj = load_target(target)
    if not isinstance(obj, Catzilla):
        raise UsageError(f"{target} is a {type(obj).__name__}, not a Catzilla app")
    return obj


def _listen(options: RunOptions) -> socket.socket:
    try:
        if options.uds is not None:
            return _sockets.listen_unix(options.uds, options.backlog)
        return _sockets.listen_tcp(options.host, options.port, options.backlog)
    except OSError as exc:
        raise UsageError(exc.strerror or str(exc)) from None


def serve_here(options: RunOptions) -> int:
    """Imports the app and serves it in this process until SIGTERM or SIGINT,
    as ``app.listen`` would."""
    app = load_app(options.target)
    if options.threads is not None:
        app.handler_threads = options.threads
    if options.fd is not None:
        sock = _sockets.adopt(options.fd)
    else:
        sock = _listen(options)
    if options.supervisor_pid is not None:
        _stop_when_orphaned(app, options.supervisor_pid)
    else:
        _ignore_sighup()
    try:
        app._serve(
            sock,
            access_log=options.access_log,
            forwarded_allow_ips=options.forwarded_allow_ips,
            announce=options.fd is None,
            on_ready=lambda: tell_ready(options.ready_fd),
        )
    finally:
        sock.close()
        if options.uds is not None and options.fd is None:
            _unlink(options.uds)
    return 0


def supervise_servers(options: RunOptions) -> int:
    """Runs ``options.processes`` server processes, each on its own socket of
    one ``SO_REUSEPORT`` group (a Unix socket: one socket, shared), which the
    supervisor binds first and keeps open; see ``Supervisor``."""
    if options.uds is not None:
        socks = [_listen(options)]
    else:
        try:
            socks = _sockets.listen_tcp_group(
                options.host, options.port, options.processes, options.backlog
            )
        except OSError as exc:
            raise UsageError(exc.strerror or str(exc)) from None
    try:
        fds = [sock.fileno() for sock in socks]
        argv = python_command("run", str(options.target))
        argv += ["--log-level", options.log_level, "--supervisor-pid", str(os.getpid())]
        if options.threads is not None:
            argv += ["--threads", str(options.threads)]
        if options.access_log:
            argv.append("--access-log")
        if options.forwarded_allow_ips is not None:
            argv += ["--forwarded-allow-ips", ",".join(options.forwarded_allow_ips)]

        def per_slot(index: int) -> tuple[list[str], tuple[int, ...]]:
            fd = fds[index % len(fds)]
            return ["--fd", str(fd)], (fd,)

        spec = ChildSpec(argv=argv, kind="server process", per_slot=per_slot, wait_ready=True)
        watch = watch_sources(os.getcwd()) if options.reload else None
        reloading = f"; reloading on changes under {os.getcwd()}" if watch else ""
        where = _sockets.describe(socks[0])

        def announce() -> None:
            print(
                f"catzilla serving on {where} with {options.processes} process(es){reloading}",
                flush=True,
            )

        supervisor = Supervisor(
            spec, options.processes, grace=options.grace, watch=watch, on_ready=announce
        )
        return supervisor.run()
    finally:
        for sock in socks:
            sock.close()
        if options.uds is not None:
            _unlink(options.uds)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _stop_when_orphaned(app: Catzilla, supervisor_pid: int) -> None:
    """Stops serving once the supervisor is gone (its children are reparented)."""

    gone = threading.Event()

    def watch() -> None:
        # NOTE: Linux has no portable "parent died" event for Python; the
        # parent pid is read every TICK (a syscall), on a daemon thread.
        while not gone.wait(TICK):
            if os.getppid() != supervisor_pid:
                gone.set()
        server_logger.warning("the supervisor (pid %d) is gone; stopping", supervisor_pid)
        app.stop()

    threading.Thread(target=watch, name="catzilla-orphan", daemon=True).start()


def _ignore_sighup() -> None:
    """One process has nothing to replace on SIGHUP: say so, and keep serving."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_DFL:
        return

    def on_sighup(signum: int, frame: Any) -> None:
        server_logger.warning(
            "SIGHUP ignored: a rolling restart needs a supervisor (--processes 2 or more)"
        )

    signal.signal(signal.SIGHUP, on_sighup)


def _run_options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(
        target=_target(args.target),
        host=args.host,
        port=args.port,
        uds=args.uds,
        processes=args.processes,
        threads=args.threads,
        reload=args.reload,
        log_level=args.log_level,
        access_log=args.access_log,
        backlog=args.backlog,
        forwarded_allow_ips=args.forwarded_allow_ips,
        grace=args.grace,
        fd=args.fd,
        ready_fd=args.ready_fd,
        supervisor_pid=args.supervisor_pid,
    )


# The command line


class _Parser(argparse.ArgumentParser):
    """Raises ``UsageError`` instead of printing the usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="catzilla", description="The catzilla command line.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="serve an app",
        description="Serves the Catzilla app at TARGET, as app.listen() would: in this "
        "process, or with --processes N in N processes sharing one socket, kept running "
        "by a supervisor. SIGTERM/SIGINT stop gracefully; SIGHUP replaces the processes "
        "one by one.",
    )
    # NOTE: a TARGET that does not parse is checked after the command line,
    # with the import: exit code 1, as for a module that cannot be imported.
    run.add_argument("target", metavar="TARGET", help="module:attr (attr defaults to app)")
    run.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    run.add_argument("--port", type=_port, default=8000, help="port to listen on (8000)")
    run.add_argument("--uds", metavar="PATH", help="listen on this Unix socket instead")
    run.add_argument(
        "--processes", type=_count, default=1, metavar="N", help="server processes (default: 1)"
    )
    run.add_argument(
        "--threads", type=_count, metavar="N", help="handler threads per process (the app's)"
    )
    run.add_argument(
        "--reload", action="store_true", help="restart when a .py file changes (development)"
    )
    run.add_argument("--log-level", choices=tuple(LOG_LEVELS), default="info")
    run.add_argument(
        "--access-log", action="store_true", help="log one line per request (catzilla.access)"
    )
    run.add_argument(
        "--backlog",
        type=_count,
        default=_sockets.DEFAULT_BACKLOG,
        metavar="N",
        help=f"connections the kernel queues (default: {_sockets.DEFAULT_BACKLOG})",
    )
    run.add_argument(
        "--forwarded-allow-ips",
        type=_proxies,
        metavar="IPS",
        help="comma-separated proxy addresses or networks, or *, whose X-Forwarded-For "
        "gives request.client (default: none)",
    )
    run.add_argument(
        "--grace",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="how long a stopping process gets before it is killed (default: 30)",
    )
    run.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    run.add_argument(READY_FD_OPTION, dest="ready_fd", type=int, help=argparse.SUPPRESS)
    run.add_argument("--supervisor-pid", type=int, help=argparse.SUPPRESS)
    worker = commands.add_parser(
        "worker",
        help="run an app's background tasks from its shared store",
        description="Runs the background tasks of the app at TARGET, taken from the "
        "shared store the app names (enable_background_tasks(storage=...)).",
    )
    worker.add_argument(
        "target", type=_target, metavar="TARGET", help="module:attr (attr defaults to app)"
    )
    worker.add_argument(
        "--workers",
        type=_count,
        metavar="N",
        help="worker threads per process (default: the app's)",
    )
    worker.add_argument(
        "--processes", type=_count, default=1, metavar="N", help="worker processes (default: 1)"
    )
    worker.add_argument(
        "--queues", type=_queues, metavar="A,B", help="queues to serve (default: the app's)"
    )
    worker.add_argument("--log-level", choices=tuple(LOG_LEVELS), default="info")
    worker.add_argument(
        "--grace",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="how long running tasks get to finish on SIGTERM or SIGINT (default: 30)",
    )
    # Set by the supervisor on its workers: they stop when it is gone.
    worker.add_argument("--supervisor-pid", type=int, help=argparse.SUPPRESS)
    return parser


def _target(text: str) -> Target:
    module, colon, attr = text.partition(":")
    target = Target(module, attr if colon else "app")
    if not _dotted(target.module) or not _dotted(target.attr):
        raise argparse.ArgumentTypeError(
            f"must look like module:attr (attr defaults to app), got {text!r}"
        )
    return target


def _dotted(name: str) -> bool:
    return all(part.isidentifier() for part in name.split("."))


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 0 to 65535, got {text!r}")
    return value


def _proxies(text: str) -> list[str]:
    entries = [entry.strip() for entry in text.split(",") if entry.strip()]
    for entry in entries:
        if entry == "*":
            continue
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{entry!r} is not an IP address, a network (10.0.0.0/8) or *"
            ) from None
    return entries


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


def _queues(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"must be queue names separated by commas, got {text!r}")
    return names


def _usage_error(message: str, code: int = EXIT_USAGE) -> int:
    print(f"catzilla: error: {' '.join(message.splitlines())}", file=sys.stderr)
    return code
