"""The ``catzilla`` command line. ``catzilla worker module:app`` runs an app's
background tasks from its shared store, in one process or in several kept
running by a supervisor."""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import queue
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any, NoReturn

from . import engine, recovery
from ._signals import STOP_SIGNALS, StopSignals
from .app import Catzilla
from .engine import BackgroundTasks

logger = logging.getLogger("catzilla.worker")

#: The exit code of a mistake in the command line or the target.
EXIT_USAGE = 2
LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
#: The first wait before restarting a worker process that exited (seconds);
#: it doubles with each quick exit, up to the cap.
RESTART_BACKOFF = 0.5
RESTART_BACKOFF_CAP = 10.0
#: A worker process that ran this long before exiting is restarted after the
#: first wait again (seconds).
STABLE_AFTER = 30.0
#: How much longer than ``--grace`` the supervisor waits before SIGKILL (seconds).
KILL_MARGIN = 5.0
# NOTE: a signal that lands on one of the engine's threads does not wake the
# main thread's wait; it runs at the next wake-up, so this bounds its delay.
TICK = 0.5


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
    options = WorkerOptions(
        target=args.target,
        workers=args.workers,
        processes=args.processes,
        queues=args.queues,
        log_level=args.log_level,
        grace=args.grace,
        supervisor_pid=args.supervisor_pid,
    )
    logging.basicConfig(level=LOG_LEVELS[options.log_level], format=LOG_FORMAT)
    try:
        if options.processes > 1:
            return supervise(options)
        return run_worker(options)
    except UsageError as exc:
        return _usage_error(str(exc))


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


def load_engine(target: Target) -> BackgroundTasks:
    """Imports ``target`` (the current directory first on ``sys.path``) and
    returns its engine: a ``Catzilla`` app's ``tasks`` or a ``BackgroundTasks``."""
    cwd = os.getcwd()
    if not sys.path or sys.path[0] not in ("", cwd):
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(target.module)
    except ImportError as exc:
        raise UsageError(f"cannot import module {target.module!r}: {exc}") from None
    recovery.register_main_alias(target.module)
    obj: Any = module
    for name in target.attr.split("."):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            raise UsageError(
                f"{target}: module {target.module!r} has no attribute {target.attr!r}"
            ) from None
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


# The supervisor


@dataclass
class _Slot:
    """One of the supervisor's worker processes, and when to start it again."""

    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = RESTART_BACKOFF
    restart_at: float | None = None


def supervise(options: WorkerOptions) -> int:
    """Runs ``options.processes`` worker processes, restarting any that exits,
    until SIGTERM or SIGINT; then stops them (SIGTERM, and SIGKILL after
    ``grace`` + ``KILL_MARGIN`` seconds)."""
    argv = _child_argv(options)
    events: queue.SimpleQueue[int] = queue.SimpleQueue()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        events.put(signum)

    previous: dict[int, Any] = {}
    for signum in (*STOP_SIGNALS, signal.SIGCHLD):
        if signum in STOP_SIGNALS and signal.getsignal(signum) is signal.SIG_IGN:
            continue  # an inherited SIG_IGN (a background job) stays ignored
        previous[signum] = signal.signal(signum, on_signal)
    slots = [_Slot() for _ in range(options.processes)]
    try:
        logger.info("supervising %d worker processes for %s", len(slots), options.target)
        for slot in slots:
            _start(slot, argv)
        code = _keep_running(slots, argv, events)
        _stop_all(slots, events, options.grace + KILL_MARGIN)
        return code
    finally:
        for slot in slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.kill()
                slot.proc.wait()
        for number, handler in previous.items():
            signal.signal(number, handler)


def _child_argv(options: WorkerOptions) -> list[str]:
    argv = [sys.executable, "-m", "catzilla", "worker", str(options.target), "--processes", "1"]
    if options.workers is not None:
        argv += ["--workers", str(options.workers)]
    if options.queues is not None:
        argv += ["--queues", ",".join(options.queues)]
    argv += ["--log-level", options.log_level, "--grace", repr(options.grace)]
    return [*argv, "--supervisor-pid", str(os.getpid())]


def _start(slot: _Slot, argv: list[str]) -> None:
    # NOTE: a process group of its own, so that Ctrl+C at a terminal reaches
    # the supervisor only; its SIGTERM would otherwise be a second signal
    # that cuts the worker's drain short.
    slot.proc = subprocess.Popen(
        argv, env=dict(os.environ), stdin=subprocess.DEVNULL, process_group=0
    )
    slot.started = time.monotonic()
    slot.restart_at = None
    logger.info("started worker process %d", slot.proc.pid)


def _keep_running(slots: list[_Slot], argv: list[str], events: queue.SimpleQueue[int]) -> int:
    """Restarts worker processes that exit, until a stop signal (then 0) or a
    worker exits with a usage error (then 2: the same options would fail again)."""
    while True:
        now = time.monotonic()
        due = [slot.restart_at - now for slot in slots if slot.restart_at is not None]
        try:
            signum = events.get(timeout=max(0.0, min([TICK, *due])))
        except queue.Empty:
            signum = None
        if signum is not None and signum in STOP_SIGNALS:
            logger.info("received %s; stopping the worker processes", signal.Signals(signum).name)
            return 0
        now = time.monotonic()
        for slot in slots:
            if slot.proc is not None and slot.proc.poll() is not None:
                if slot.proc.returncode == EXIT_USAGE:
                    logger.error(
                        "worker process %d exited with a usage error; stopping", slot.proc.pid
                    )
                    return EXIT_USAGE
                _schedule_restart(slot, now)
            elif slot.restart_at is not None and slot.restart_at <= now:
                _start(slot, argv)


def _schedule_restart(slot: _Slot, now: float) -> None:
    assert slot.proc is not None
    uptime = now - slot.started
    if uptime >= STABLE_AFTER:
        slot.backoff = RESTART_BACKOFF
    logger.warning(
        "worker process %d %s after %.1f s; restarting it in %.1f s",
        slot.proc.pid,
        _exit_reason(slot.proc.returncode),
        uptime,
        slot.backoff,
    )
    slot.proc = None
    slot.restart_at = now + slot.backoff
    slot.backoff = min(slot.backoff * 2, RESTART_BACKOFF_CAP)


def _stop_all(slots: list[_Slot], events: queue.SimpleQueue[int], timeout: float) -> None:
    """SIGTERM to every worker process (again on each further signal, which
    cuts its drain short), then SIGKILL to those alive after ``timeout`` seconds."""
    live = [slot.proc for slot in slots if slot.proc is not None and slot.proc.poll() is None]
    for proc in live:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while live:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            if events.get(timeout=min(TICK, left)) in STOP_SIGNALS:
                logger.warning("second signal: worker processes stop without waiting for tasks")
                for proc in live:
                    proc.send_signal(signal.SIGTERM)
        except queue.Empty:
            pass
        live = [proc for proc in live if proc.poll() is None]
    for proc in live:
        logger.warning("worker process %d still running after %g s; killing it", proc.pid, timeout)
        proc.kill()
    for proc in live:
        proc.wait()


def _exit_reason(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


# The command line


class _Parser(argparse.ArgumentParser):
    """Raises ``UsageError`` instead of printing the usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="catzilla", description="The catzilla command line.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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


def _usage_error(message: str) -> int:
    print(f"catzilla: error: {' '.join(message.splitlines())}", file=sys.stderr)
    return EXIT_USAGE
