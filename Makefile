# Two commands do all the set-up on a fresh machine:
#   make up     install everything, then run `idlegrid up` (private Redis, gateway, simulated fleet)
#   make test   install everything, then run the test suite
# Everything goes into ./.venv; nothing is installed system-wide.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
UP_ARGS ?=

.PHONY: up test install clean

up: $(VENV)/.installed
	$(VENV)/bin/idlegrid up $(UP_ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q

install: $(VENV)/.installed

# vLLM's CPU build (see scripts/install-cpu-vllm.sh for why it is more than one pip line).
$(VENV)/.installed: pyproject.toml scripts/install-cpu-vllm.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev,bench]'
	scripts/install-cpu-vllm.sh $(PY)
	touch $@

clean:
	rm -rf $(VENV) .idlegrid
