# Two entry points; each creates the virtual environment and installs what it needs.
#   make demo   set-up + the main job on the embedded default (synthetic data, tiny models, CPU)
#   make test   set-up + the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch==2.13.0 is a CPU build on these machines; pyproject keeps torch a range.
TORCH  ?= torch==2.13.0

.PHONY: setup demo demo-quick test bench clean

$(BIN)/kdcache: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/kdcache

demo: setup
	$(BIN)/kdcache demo --out demo_out

demo-quick: setup
	$(BIN)/kdcache demo --quick --out demo_out/quick

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) demo_out .pytest_cache
