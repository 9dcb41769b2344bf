"""The supervisor behind ``catzilla run --processes N`` and ``catzilla worker
--processes N``: it keeps N child processes running, restarts one that dies
(with a backoff when they keep dying), replaces them one by one on SIGHUP or
all at once when the source changes (``--reload``), and stops them all
gracefully on SIGTERM or SIGINT."""

from __future__ import annotations

import functools
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from ._signals import STOP_SIGNALS

logger = logging.getLogger("catzilla.supervisor")

#: The first wait before restarting a child that exited (seconds); it
#: doubles with each quick exit, up to the cap.
RESTART_BACKOFF = 0.5
RESTART_BACKOFF_CAP = 10.0
#: A child that ran this long before exiting is restarted after the first
#: wait again (seconds).
STABLE_AFTER = 30.0
#: How much longer than the grace period the supervisor waits before SIGKILL (seconds).
KILL_MARGIN = 5.0
#: How long a new child may take to say it is ready (seconds).
READY_TIMEOUT = 60.0
# NOTE: a signal that lands while the main thread is in a blocking call runs
# at its next wake-up, so this bounds the delay of every reaction.
TICK = 0.5

#: The option that tells a child where to write its pid once it serves.
READY_FD_OPTION = "--ready-fd"


@dataclass(frozen=True)
class ChildSpec:
    """How to start one child: its command line and the descriptors it inherits."""

    argv: list[str]
    #: "server process", "worker process": how the log names a child.
    kind: str
    #: What the child of slot ``i`` gets besides ``argv``: more arguments, and
    #: descriptors it inherits (a replacement gets the same ones).
    per_slot: Callable[[int], tuple[list[str], tuple[int, ...]]] = lambda i: ([], ())
    #: Children say when they are ready (``--ready-fd``); otherwise a started
    #: child counts as ready at once.
    wait_ready: bool = False
    #: A child exiting with this code found a mistake the same options would
    #: repeat: the supervisor stops and exits with it.
    usage_code: int | None = None


@dataclass
class _Slot:
    """One child, and when to start it again."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = RESTART_BACKOFF
    restart_at: float | None = None
    ready: bool = False
    #: Waiting for a source change before starting again (reload mode).
    parked: bool = False


@dataclass
class _Events:
    """What the supervisor reacts to, in arrival order: signals, children
    ready, and source changes."""

    items: queue.SimpleQueue[tuple[str, Any]] = field(default_factory=queue.SimpleQueue)

    def put(self, kind: str, value: Any = None) -> None:
        self.items.put((kind, value))

    def get(self, timeout: float) -> tuple[str, Any] | None:
        try:
            return self.items.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None


class _Stop(Exception):
    """A stop signal arrived while the supervisor waited for something else."""


class Supervisor:
    """Runs ``count`` children from ``spec`` until a stop signal; see the module."""

    def __init__(
        self,
        spec: ChildSpec,
        count: int,
        *,
        grace: float,
        watch: Callable[[Callable[[str], None], threading.Event], None] | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.spec = spec
        self.slots = [_Slot(i) for i in range(count)]
        self.grace = grace
        self.events = _Events()
        self._watch = watch
        #: Called once, when every child is ready for the first time.
        self._on_ready = on_ready
        self._watch_stop = threading.Event()
        #: Children being replaced, or started to replace one: stopped with the rest.
        self._others: list[subprocess.Popen[bytes]] = []
        self._ready_pids: set[int] = set()
        self._ready_w: int | None = None
        self._served = False  # every slot was ready at least once
        #: A source change seen while busy, acted on once free.
        self._changed: str | None = None

    # Running

    def run(self) -> int:
        """Supervises until a stop signal (then 0), or until the children
        cannot start (1), or one exits with ``usage_code`` (that code)."""
        previous = self._install_signals()
        try:
            if self.spec.wait_ready:
                self._start_ready_pipe()
            if self._watch is not None:
                self._start_watcher()
            for slot in self.slots:
                self._start(slot)
            try:
                code = self._loop()
            except _Stop:
                code = 0
            self._stop_all()
            return code
        finally:
            self._watch_stop.set()
            for proc in self._all_procs():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for number, handler in previous.items():
                signal.signal(number, handler)
            if self._ready_w is not None:
                os.close(self._ready_w)

    def _loop(self) -> int:
        while True:
            now = time.monotonic()
            due = [s.restart_at - now for s in self.slots if s.restart_at is not None]
            event = self.events.get(min([TICK, *due]))
            if event is None and self._changed is not None:
                event, self._changed = ("changed", self._changed), None
            if event is not None:
                kind, value = event
                if kind == "signal" and value == signal.SIGHUP:
                    logger.info("received SIGHUP; replacing the %ses one by one", self.spec.kind)
                    self._roll()
                elif kind == "changed":
                    logger.info("%s changed; restarting the %ses", value, self.spec.kind)
                    self._restart_all()
                else:
                    self._apply(kind, value)
            code = self._check_children()
            if code is not None:
                return code

    def _apply(self, kind: str, value: Any) -> None:
        """Handles an event that needs no waiting; a stop signal raises ``_Stop``."""
        if kind == "signal" and value in STOP_SIGNALS:
            logger.info(
                "received %s; stopping the %ses", signal.Signals(value).name, self.spec.kind
            )
            raise _Stop
        if kind == "ready":
            self._ready_pids.add(value)
            for slot in self.slots:
                if slot.proc is not None and slot.proc.pid == value:
                    slot.ready = True
            if not self._served and all(slot.ready for slot in self.slots):
                self._served = True
                logger.info("%d %s(es) ready", len(self.slots), self.spec.kind)
                if self._on_ready is not None:
                    self._on_ready()
        elif kind == "signal" and value == signal.SIGHUP:
            logger.info("received SIGHUP while replacing the %ses; ignored", self.spec.kind)
        elif kind == "changed":
            self._changed = value  # acted on after the current replacement

    def _check_children(self) -> int | None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is not None:
                code = slot.proc.returncode
                if self.spec.usage_code is not None and code == self.spec.usage_code:
                    logger.error(
                        "%s %d exited with a usage error; stopping", self.spec.kind, slot.proc.pid
                    )
                    return code
                if not slot.ready and self._watch is not None:
                    logger.error(
                        "%s %d %s before it was ready; waiting for a change to restart it",
                        self.spec.kind,
                        slot.proc.pid,
                        exit_reason(code),
                    )
                    slot.proc, slot.parked = None, True
                elif not slot.ready and not self._served:
                    logger.error(
                        "%s %d %s before it was ready; stopping",
                        self.spec.kind,
                        slot.proc.pid,
                        exit_reason(code),
                    )
                    return 1
                else:
                    self._schedule_restart(slot, now)
            elif slot.restart_at is not None and slot.restart_at <= now:
                self._start(slot)
        return None

    # Children

    def _start(self, slot: _Slot) -> None:
        slot.proc = self._spawn(slot.index)
        slot.started = time.monotonic()
        slot.restart_at = None
        slot.parked = False
        slot.ready = not self.spec.wait_ready or slot.proc.pid in self._ready_pids

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        more, fds = self.spec.per_slot(index)
        argv = [*self.spec.argv, *more]
        if self._ready_w is not None:
            argv += [READY_FD_OPTION, str(self._ready_w)]
            fds = (*fds, self._ready_w)
        # NOTE: a process group of its own, so that Ctrl+C at a terminal
        # reaches the supervisor only; its SIGTERM would otherwise be a second
        # signal that cuts the child's drain short.
        proc = subprocess.Popen(
            argv, env=dict(os.environ), stdin=subprocess.DEVNULL, pass_fds=fds, process_group=0
        )
        logger.info("started %s %d", self.spec.kind, proc.pid)
        return proc

    def _schedule_restart(self, slot: _Slot, now: float) -> None:
        assert slot.proc is not None
        uptime = now - slot.started
        if uptime >= STABLE_AFTER:
            slot.backoff = RESTART_BACKOFF
        logger.warning(
            "%s %d %s after %.1f s; restarting it in %.1f s",
            self.spec.kind,
            slot.proc.pid,
            exit_reason(slot.proc.returncode),
            uptime,
            slot.backoff,
        )
        slot.proc, slot.ready = None, False
        slot.restart_at = now + slot.backoff
        slot.backoff = min(slot.backoff * 2, RESTART_BACKOFF_CAP)

    def _all_procs(self) -> list[subprocess.Popen[bytes]]:
        return [s.proc for s in self.slots if s.proc is not None] + self._others

    def _wait(self, done: Callable[[], bool], timeout: float) -> bool:
        """Handles events until ``done()`` or ``timeout``; returns ``done()``."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            event = self.events.get(min(TICK, left))
            if event is not None:
                self._apply(*event)
        return True

    def _settled(self, proc: subprocess.Popen[bytes]) -> bool:
        """Whether a new child said it is ready, or exited."""
        return proc.pid in self._ready_pids or proc.poll() is not None

    def _retire(self, proc: subprocess.Popen[bytes]) -> None:
        """Stops one child gracefully (SIGTERM), killing it if it overstays."""
        self._others.append(proc)
        proc.send_signal(signal.SIGTERM)
        if not self._wait(lambda: proc.poll() is not None, self.grace + KILL_MARGIN):
            logger.warning("%s %d still running; killing it", self.spec.kind, proc.pid)
            proc.kill()
            proc.wait()
        self._others.remove(proc)

    def _roll(self) -> None:
        """Replaces each child in turn: a new one first, and the old one is
        stopped only once the new one is ready. The new one inherits the old
        one's descriptors (its listening socket, which the supervisor keeps
        open), so connections queued on it are served, never dropped. A new
        child that fails stops the replacement; the old children keep serving."""
        for slot in self.slots:
            old = slot.proc
            new = self._spawn(slot.index)
            self._others.append(new)
            ready = self._wait(functools.partial(self._settled, new), READY_TIMEOUT)
            self._others.remove(new)
            if new.poll() is not None or not ready:
                reason = exit_reason(new.returncode) if new.poll() is not None else "is not ready"
                logger.error(
                    "new %s %d %s; the others keep serving (replacement stopped)",
                    self.spec.kind,
                    new.pid,
                    reason,
                )
                if new.poll() is None:
                    new.kill()
                    new.wait()
                return
            slot.proc, slot.ready = new, True
            slot.started, slot.restart_at, slot.parked = time.monotonic(), None, False
            if old is not None and old.poll() is None:
                self._retire(old)
        logger.info("replaced all %d %ses", len(self.slots), self.spec.kind)

    def _restart_all(self) -> None:
        """For ``--reload``: stops every child, then starts them again."""
        live = [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]
        self._others.extend(live)
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        all_gone = self._wait(lambda: all(p.poll() is not None for p in live), self.grace)
        if not all_gone:
            for proc in live:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        for proc in live:
            self._others.remove(proc)
        for slot in self.slots:
            slot.backoff = RESTART_BACKOFF
            self._start(slot)

    def _stop_all(self) -> None:
        """SIGTERM to every child (again on each further signal, which cuts
        their drain short), then SIGKILL to those alive after the grace period."""
        live = [p for p in self._all_procs() if p.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace + KILL_MARGIN
        while live:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            event = self.events.get(min(TICK, left))
            if event is not None and event[0] == "signal" and event[1] in STOP_SIGNALS:
                logger.warning("second signal: the %ses stop without waiting", self.spec.kind)
                for proc in live:
                    proc.send_signal(signal.SIGTERM)
            live = [proc for proc in live if proc.poll() is None]
        for proc in live:
            logger.warning(
                "%s %d still running after %g s; killing it",
                self.spec.kind,
                proc.pid,
                self.grace + KILL_MARGIN,
            )
            proc.kill()
        for proc in live:
            proc.wait()

    # Signals, readiness and the watcher

    def _install_signals(self) -> dict[int, Any]:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.events.put("signal", signum)

        previous: dict[int, Any] = {}
        for signum in (*STOP_SIGNALS, signal.SIGHUP, signal.SIGCHLD):
            if signum in STOP_SIGNALS and signal.getsignal(signum) is signal.SIG_IGN:
                continue  # an inherited SIG_IGN (a background job) stays ignored
            previous[signum] = signal.signal(signum, on_signal)
        return previous

    def _start_ready_pipe(self) -> None:
        read, self._ready_w = os.pipe()

        def read_pids() -> None:
            with os.fdopen(read, "rb") as pipe:
                for line in pipe:
                    try:
                        self.events.put("ready", int(line))
                    except ValueError:
                        continue

        threading.Thread(target=read_pids, name="catzilla-ready", daemon=True).start()

    def _start_watcher(self) -> None:
        assert self._watch is not None
        watch = self._watch

        def run() -> None:
            try:
                watch(lambda what: self.events.put("changed", what), self._watch_stop)
            except Exception:
                logger.exception("the file watcher failed; --reload no longer restarts")

        threading.Thread(target=run, name="catzilla-watch", daemon=True).start()


def tell_ready(fd: int | None) -> None:
    """In a child: says to the supervisor that this process serves."""
    if fd is None:
        return
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)


def watch_sources(root: str) -> Callable[[Callable[[str], None], threading.Event], None]:
    """A watcher of the Python files under ``root`` for ``--reload``, with
    ``watchfiles``: ``watch(changed, stop)`` calls ``changed(what)`` per batch
    of changes until ``stop`` is set."""
    import watchfiles

    def watch(changed: Callable[[str], None], stop: threading.Event) -> None:
        for batch in watchfiles.watch(
            root, watch_filter=watchfiles.PythonFilter(), stop_event=stop, debounce=400
        ):
            changed(_summary(root, sorted(path for _, path in batch)))

    return watch


def _summary(root: str, paths: Sequence[str]) -> str:
    names = [os.path.relpath(p, root) for p in paths]
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def exit_reason(code: int | None) -> str:
    """How a child's exit reads in the log."""
    if code is None:
        return "is still running"
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def python_command(*args: str) -> list[str]:
    """``python -m catzilla ARGS`` with this interpreter."""
    return [sys.executable, "-m", "catzilla", *args]
