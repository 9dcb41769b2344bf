"""The app of benches/bench_scaleout.py: enqueue-only (``workers=0``) on the
store named by the environment variable ``BENCH_STORAGE``. Each worker process
runs ``python -m catzilla worker scaleout_app:app --workers 1``."""

from __future__ import annotations

import os

from catzilla.background_tasks import BackgroundTasks

app = BackgroundTasks(storage=os.environ["BENCH_STORAGE"], workers=0, enable_auto_scaling=False)
