# The two commands of the README's quick start. Both set up .venv first
# (idempotent: a second run skips installed parts in seconds).
PY := .venv/bin/python

.PHONY: setup test test-fast demo
setup:
	@bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest -q tests

# the edit-test loop: everything but the slow end-to-end tests
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

demo: setup
	$(PY) -m benchmarks.demo $(ARGS)
