"""Idle CPU of a started task engine: this project vs the original Catzilla.

    python benches/bench_idle.py [--seconds 5]
    python benches/bench_idle.py --quick     # 0.5 s: a check, not a figure

Each engine starts with 4 workers, runs one task, then sits idle; the child
process reports the CPU time it used (getrusage) over the idle period. The
original Catzilla (``catzilla==0.2.3``) runs from the venv ``bench_http.py``
creates, made here on first use.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

from bench_http import BENCH_DIR, ORIG_REQUIREMENTS, clean_env, ensure_venv
from benchargs import BenchParser

PROBE = """
import resource, sys, time
from catzilla import Catzilla
app = Catzilla({args})
app.enable_background_tasks(workers=4)
app.add_task(lambda: None)
time.sleep(0.5)
before = resource.getrusage(resource.RUSAGE_SELF)
start = time.monotonic()
time.sleep({seconds})
after = resource.getrusage(resource.RUSAGE_SELF)
wall = time.monotonic() - start
cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
print("IDLE", cpu / wall * 100, flush=True)
"""


def idle_percent(python: str, args: str, seconds: float, env: dict[str, str] | None) -> float:
    code = PROBE.format(args=args, seconds=seconds)
    out = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, env=env, timeout=seconds + 60
    )
    for line in out.stdout.splitlines():
        if line.startswith("IDLE "):
            return float(line.split()[1])
    raise RuntimeError(f"{python} did not report its idle CPU:\n{out.stdout}\n{out.stderr}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = BenchParser(__doc__)
    parser.add_size("--seconds", type=float, full=5.0, quick=0.5, help="idle period measured")
    args = parser.parse(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    orig_python = ensure_venv(BENCH_DIR / ".venv-catzilla-orig", ORIG_REQUIREMENTS, False)
    ours = idle_percent(sys.executable, "", args.seconds, None)
    orig = idle_percent(
        str(orig_python), "production=True, show_banner=False", args.seconds, clean_env()
    )
    print(f"idle CPU over {args.seconds:g} s, percent of one core (lower is better)")
    print(f"  catzilla (this project)  {ours:6.2f}%")
    print(f"  catzilla 0.2.3           {orig:6.2f}%")
    if ours > 0:
        print(f"  ratio 0.2.3/this project {orig / ours:6.1f}x")
    else:
        print("  ratio 0.2.3/this project n/a (this project used no measurable CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
