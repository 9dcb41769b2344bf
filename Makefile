# Developer tasks; CI runs .ci/run.
.PHONY: build-dev build-release format lint test bench bench-quick reliability

build-dev:
	maturin develop --features test-hooks

build-release:
	maturin develop --release

format:
	cargo fmt
	ruff format python tests benches examples

lint:
	cargo fmt --check
	cargo clippy --all-targets --all-features -- -D warnings
	ruff check python tests benches examples
	mypy --strict python/catzilla examples
	python -m mypy.stubtest catzilla._catzilla --ignore-missing-stub

test:
	cargo test
	python -m pytest -q

bench: build-release
	python benches/bench_tasks.py

# Every script in benches/ with --quick (seconds each; any build): checks that
# each runs end to end, baselines included. CI runs the same in the tests.
bench-quick:
	python -m pytest -q tests/test_benches.py

# The full-scale load runs (CI runs them reduced, inside the tests).
reliability: build-release
	python benches/burst.py --tasks 1000000
	python benches/soak.py --duration 600
	python benches/http_load.py
