# The two commands: `make demo` and `make test`. Both set everything up first.
PY := .venv/bin/python
PYTEST_FLAGS ?= -q

.PHONY: setup demo test lint bench clean

setup:
	@bash deploy/setup.sh

demo: setup
	$(PY) -m node demo --hosts 4

test: setup
	$(PY) -m pytest $(PYTEST_FLAGS)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b --json || exit 1; done

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache build *.egg-info
