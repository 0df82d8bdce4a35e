# The README's commands. `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: setup demo test lint bench clean

setup: .setup.stamp

# torch==2.13.0 first: on these machines it is a CPU wheel on local disk; a bare `torch`
# requirement could pull a multi-GB CUDA build.
.setup.stamp: pyproject.toml setup.py gradmon/stats/_cpu_kernel.c
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	touch $@

demo: setup
	gradmon demo

test: setup
	$(PYTHON) -m pytest

lint: setup
	ruff check .
	ruff format --check .
	mypy

bench: setup
	gradmon bench

clean:
	rm -rf .setup.stamp build *.egg-info gradmon/stats/*.so
