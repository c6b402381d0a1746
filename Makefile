# The two commands of the README. Both set up .venv first (idempotent: seconds when already done).
.PHONY: setup demo test test-fast test-long test-all test-gpu bench clean-runs

setup:
	@bash launch/setup_env.sh

demo: setup
	.venv/bin/rlhf-ray train configs/quickstart.yaml

# The fast tier first (pure functions, config, CLI paths that stop before Ray; on two workers, 35 s against 47 on
# one, measured quiet on this 2-core machine: its tests wait on subprocesses and timeouts), then the tier that
# starts Ray, vLLM and DeepSpeed (`slow`; tests/conftest.py fails an unmarked test that starts them) on two
# workers: most of a tiny end-to-end run is processes starting and waiting on each other, so two side by side
# keep the 2-core machine busier (tests/conftest.py keeps a shared run or server on one worker), heaviest work
# first (tests/slow_order.py; `--no-loadscope-reorder` keeps that order: 11.3 minutes against 14.1 in xdist's
# own order, one after the other on this machine). The 25 slowest tests are listed at the end: where the next
# minutes of `make test` are. The long tier (marker `long`) is left to `make test-long`: slow tests whose claim
# `make test` already proves in a cheaper form (the other placement, a second variant, cluster scale;
# docs/TESTS.md lists each and where). CI runs both (`make test-all`).
test: setup
	.venv/bin/python -m pytest -q -m "not slow" -n 2 tests
	.venv/bin/python -m pytest -q -m "slow and not long" -n 2 --dist loadgroup --no-loadscope-reorder --durations=25 tests

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow" -n 2 tests

test-long: setup
	.venv/bin/python -m pytest -q -m long -n 2 --dist loadgroup --no-loadscope-reorder --durations=10 tests

test-all: test test-long

# The GPU tier (tests/gpu): skipped without CUDA; needs the CUDA builds (pip install -e .[gpu]).
test-gpu: setup
	.venv/bin/python -m pytest -q -rs -m gpu tests/gpu

bench: setup
	bash launch/setup_env.sh --bench
	.venv/bin/python benchmarks/run_all.py $(BENCH)

clean-runs:
	rm -rf runs
