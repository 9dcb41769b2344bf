"""No Rust code waits, while holding the GIL, for a thread that may need it.

Each case runs in a fresh interpreter with a deadline, so a deadlock fails
its test (``helpers.run_python`` reports it as a hang) instead of hanging the
suite. docs/design.md lists every wait checked against this rule.
"""

from __future__ import annotations

import textwrap

from helpers import run_python

DONE = "finished cleanly"


def assert_finished(code: str, timeout: float = 60.0) -> str:
    proc = run_python(textwrap.dedent(code) + f"\nprint({DONE!r}, flush=True)\n", timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    assert DONE in proc.stdout, proc.stdout + proc.stderr
    assert "fatal" not in proc.stderr.lower(), proc.stderr
    return proc.stderr


def test_dropping_an_engine_whose_store_was_deleted_does_not_hang():
    # The store's thread notices the deleted directory while the engine is
    # dropped (under the GIL, which waits for that thread): it must not need
    # the GIL to say so.
    assert_finished(
        """
        import tempfile
        from catzilla.background_tasks import BackgroundTasks

        def run():
            with tempfile.TemporaryDirectory() as tmp:
                engine = BackgroundTasks(storage=f"sqlite:///{tmp}/tasks.db")
                results = [engine.add_task(int, i) for i in range(100)]
                for r in results:
                    r.wait(10)
                engine.flush()
                engine.shutdown()

        for _ in range(3):
            run()
        """
    )


def test_a_store_that_degrades_while_the_gil_is_busy_still_logs_once():
    err = assert_finished(
        """
        import logging, os, tempfile, time
        from catzilla.background_tasks import BackgroundTasks

        seen = []
        class Keep(logging.Handler):
            def emit(self, record):
                seen.append(record.getMessage())
        logging.getLogger("catzilla").addHandler(Keep())

        tmp = tempfile.mkdtemp()
        engine = BackgroundTasks(storage=f"sqlite:///{tmp}/tasks.db")
        engine.add_task(int, 1).wait(10)
        engine.flush()
        os.remove(f"{tmp}/tasks.db")
        try:
            # Queued into a store that is gone: refused, or failed saying so.
            engine.add_task(int, 2).wait(10)
        except Exception as exc:
            assert "StorageError" in type(exc).__name__, repr(exc)
        end = time.monotonic() + 10
        while not seen and time.monotonic() < end:
            sum(range(10_000))  # keep the GIL busy, as a CPU-bound program does
        assert engine.get_stats().storage_degraded
        engine.shutdown()
        assert len(seen) == 1 and "was deleted" in seen[0], seen
        """
    )
    assert "Traceback" not in err, err


def test_a_callback_that_shuts_the_engine_down_during_shutdown_gets_an_error():
    # Shutdown cancels the queued task and runs its callback on the same
    # thread; the callback's own shutdown() must not wait for itself.
    err = assert_finished(
        """
        import threading
        from catzilla.background_tasks import BackgroundTasks

        engine = BackgroundTasks(workers=1, max_workers=1, enable_auto_scaling=False)
        hold = threading.Event()
        engine.add_task(hold.wait, 30)
        queued = engine.add_task(print, "never runs")
        seen = []

        def again(handle):
            try:
                engine.shutdown(wait_for_completion=False)
            except RuntimeError as exc:
                seen.append(str(exc))

        queued.add_done_callback(again)
        report = engine.shutdown(wait_for_completion=False, timeout=1)
        hold.set()
        assert queued.task_id in report["cancelled"], report
        assert len(seen) == 1 and "called again" in seen[0], seen
        """
    )
    assert "Traceback" not in err, err


def test_a_forked_child_drops_its_copy_of_a_stored_engine_without_waiting():
    # The child has none of the parent's threads: dropping its copy of an
    # engine must not wait for the parent's store thread (or a new thread
    # that took its place).
    assert_finished(
        """
        import os, sys, tempfile, time
        from catzilla.background_tasks import BackgroundTasks

        tmp = tempfile.mkdtemp()
        old = BackgroundTasks(storage=f"sqlite:///{tmp}/a.db")
        old.add_task(int, 1).wait(5)
        old.shutdown()
        pid = os.fork()
        if pid == 0:
            start = time.monotonic()
            new = BackgroundTasks(storage=f"sqlite:///{tmp}/b.db")
            del old
            took = time.monotonic() - start
            new.add_task(int, 2).wait(5)
            new.shutdown()
            os._exit(0 if took < 2 else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        """,
        timeout=60,
    )


def test_a_task_timeout_leaves_no_pending_interrupt_behind():
    # A timed-out sync task is interrupted with an asynchronous exception; the
    # engine must not leave CPython's "pending" flag set with nothing to raise,
    # or code under sys.settrace (debuggers, coverage) loops forever.
    assert_finished(
        """
        import sys, time
        from catzilla.background_tasks import BackgroundTasks, TaskTimeoutError

        engine = BackgroundTasks(workers=1, max_workers=1, enable_auto_scaling=False)

        def spin(seconds):
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                pass

        def quick():
            return "ok"

        for timeout_ms in (100, 50):
            r = engine.add_task(spin, 5, timeout_ms=timeout_ms, max_retries=0)
            try:
                r.wait(10)
            except TaskTimeoutError:
                pass
            else:
                raise AssertionError("the task was not timed out")
        assert engine.add_task(quick).wait(10) == "ok"
        engine.shutdown()
        sys.settrace(lambda frame, event, arg: None)

        def f():
            return 1

        assert f() == 1
        sys.settrace(None)
        """,
        timeout=30,
    )
