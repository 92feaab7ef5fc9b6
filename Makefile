# Two commands for a fresh machine with Python 3.11:
#   make quickstart   install, then run the whole pipeline end to end (CPU; ../shared/data or the embedded default, see README)
#   make test         install, then run the test suite (what CI runs)
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install system-deps test test-long quickstart bench clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

system-deps:
	bash tests/install_system_deps.sh

test: install system-deps
	$(PY) -m pytest -q tests

test-long: install system-deps
	$(PY) -m pytest -q -m long tests

quickstart: install
	bash examples/quickstart.sh

bench: install
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
