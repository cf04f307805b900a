# The two commands of the README's quick start. Both set up .venv first
# (idempotent: a second run skips installed parts in seconds).
PY := .venv/bin/python

.PHONY: setup test demo
setup:
	@bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m benchmarks.demo $(ARGS)
