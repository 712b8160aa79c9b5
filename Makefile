# Two entry points; each creates the virtual environment and installs what it needs.
#   make demo   set-up + the main job on the embedded default (synthetic data, tiny models, CPU)
#   make test   set-up + the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch==2.13.0 is a CPU build on these machines; pyproject keeps torch a range.
TORCH  ?= torch==2.13.0

.PHONY: setup demo demo-quick test bench gpu-wheels clean

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

# cp312 wheels of what the GPU machine lacks (it has no network); bench/gpu.sh installs them from .whl/.
GPU_WHEELS := zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 \
	jsonschema jsonschema-specifications referencing rpds-py
gpu-wheels: setup
	rm -rf .whl && $(BIN)/python -m pip download -q --no-deps --only-binary=:all: -d .whl \
	  --python-version 3.12 --implementation cp --abi cp312 --abi none \
	  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
	  --platform any $(GPU_WHEELS)
	@ls .whl

clean:
	rm -rf $(VENV) demo_out .pytest_cache
