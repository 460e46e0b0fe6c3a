# `make train` and `make test` set everything up from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is installed first, pinned, so pip takes the release this machine carries.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: train test lint venv clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	touch $@

$(VENV)/.dev: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.dev

train: $(VENV)/.dev
	$(VENV)/bin/kiln train

test: $(VENV)/.dev
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder
	$(VENV)/bin/ruff check src tests benchmarks

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
