# The two commands of the README. Both set up .venv first (idempotent: seconds when already done).
.PHONY: setup demo test test-fast test-gpu bench clean-runs

setup:
	@bash launch/setup_env.sh

demo: setup
	.venv/bin/rlhf-ray train configs/quickstart.yaml

test: setup
	.venv/bin/python -m pytest -q tests

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow" tests

# The GPU tier (tests/gpu): skipped without CUDA; needs the CUDA builds (pip install -e .[gpu]).
test-gpu: setup
	.venv/bin/python -m pytest -q -rs -m gpu tests/gpu

bench: setup
	bash launch/setup_env.sh --bench
	.venv/bin/python benchmarks/run_all.py $(BENCH)

clean-runs:
	rm -rf runs
