# Quick Fix Labels. `make demo` sets up and runs the bundled demo; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= demo-out

.PHONY: install test test-gpu lint demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

test: install
	$(PY) -m pytest -q

test-gpu: install
	$(PY) -m pytest -q -m gpu

lint: install
	$(PY) -m ruff check .

demo: install
	$(PY) -m pipeline.demo --out $(DEMO)

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
