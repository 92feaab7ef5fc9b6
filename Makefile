# Two commands for a fresh machine with Python 3.11:
#   make quickstart   install, then run the whole pipeline end to end (CPU; ../shared/data or the embedded default, see README)
#   make test         install, then run the test suite (what CI runs)
# Installs are pinned to constraints.txt (the versions the suite passed on); setup.py keeps ranges for users.
#   make test-latest  the suite against the newest releases in a separate venv (not in CI: drift shows here first)
#   make constraints  rewrite constraints.txt from the pinned venv after a green run
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LATEST := .venv-latest

.PHONY: install system-deps test test-long test-latest constraints quickstart bench clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

system-deps:
	bash tests/install_system_deps.sh

test: install system-deps
	$(PY) -m pytest -q tests

test-long: install system-deps
	$(PY) -m pytest -q -m long tests

test-latest: system-deps
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q --upgrade torch
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pytest -q tests

constraints: install
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | sed 's/^\(torch==[^+]*\)+cpu$$/\1/'; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt

quickstart: install
	bash examples/quickstart.sh

bench: install
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(LATEST) runs .pytest_cache
