# The two commands: `make demo` and `make test`. Both set everything up first.
# `make check` is the fast lane: the unit tests only (tests/unit: no root, namespaces,
# VMs or daemons; any user), on the .venv that `make setup` made, with the fuzzers that
# take their budget from tests/kit/fuzzing.py (wire, routes, save stream, ledger) on a
# tenth of their examples. `make test` always runs every fuzzer in full.
PY := .venv/bin/python
PYTEST_FLAGS ?= -q

.PHONY: setup demo test check lint bench clean

setup:
	@bash deploy/setup.sh

demo: setup
	$(PY) -m node demo --hosts 4

test: setup
	GLEANER_FUZZ_SCALE=1 $(PY) -m pytest $(PYTEST_FLAGS) --durations=25

check:
	@test -x $(PY) || { echo "make check: no $(PY); run make setup first" >&2; exit 1; }
	GLEANER_FUZZ_SCALE=0.1 $(PY) -m pytest tests/unit -p no:cacheprovider $(PYTEST_FLAGS)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b --json || exit 1; done

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache build *.egg-info
