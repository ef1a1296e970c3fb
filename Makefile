# Quick start: `make demo` and `make test` each set up .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned: this version's CPU build installs quickly; an unpinned torch pulls a multi-GB build.
TORCH := torch==2.13.0

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.py
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	# an editable install leaves fusec's own modules uncompiled (pip byte-compiles a regular install): where
	# the environment turns off writing bytecode, every start would compile them from source again
	$(BIN)/python -m compileall -q fusec passes backends
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/fusec demo

# Two test processes, whole files each (a module's compiled fixtures are built once): the cold Numba compiles
# that most of the time goes to run on one core each (tests/conftest.py turns the compile workers off there).
test: install-test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) build *.egg-info
