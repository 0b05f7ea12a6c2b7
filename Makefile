# One venv for everything; created on first use, re-installed when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: run test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(PY) -m proxy $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
