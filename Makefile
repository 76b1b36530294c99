# Fresh machine: `make demo` installs and runs the main job; `make test` installs and runs the tests.
PYTHON ?= python
# torch 2.13.0 first and pinned: an unpinned resolve can pull a multi-GB CUDA build.
INSTALL = $(PYTHON) -m pip install -q "torch==2.13.0" && $(PYTHON) -m pip install -q -e

.PHONY: install install-dev demo test bench

install:
	$(INSTALL) ".[serve,onnx,lora,gguf]"

install-dev:
	$(INSTALL) ".[dev]"

demo: install
	gpt2kit train --config configs/tiny_shakespeare.yaml

# Two workers, each test file on one of them (its module fixtures, a server or a trained model, made once).
test: install-dev
	$(PYTHON) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests

bench: install-dev
	$(PYTHON) -m benchmarks
