# The README's commands. `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: setup system-packages demo test lint bench clean

setup: system-packages .setup.stamp

# prometheus, promtool, alertmanager, amtool, kubectl, openssl, node, npm, pushgateway for
# the tests and `gradmon demo --with-prometheus`: installed with apt-get when missing and
# this runs as root; otherwise it prints the exact command (and the tests that need them
# skip, saying so).
system-packages:
	$(PYTHON) scripts/system_packages.py

# torch==2.13.0 first: on these machines it is a CPU wheel on local disk; a bare `torch`
# requirement could pull a multi-GB CUDA build. --no-build-isolation: the C++ pass
# (gradmon/agent/_scan.cpp) is compiled against this torch (see setup.py).
.setup.stamp: pyproject.toml setup.py gradmon/stats/_cpu_kernel.c gradmon/agent/_scan.cpp
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q "setuptools>=68" wheel
	$(PIP) install -q --no-build-isolation -e ".[dev]"
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
	rm -rf .setup.stamp build *.egg-info gradmon/stats/*.so gradmon/agent/*.so
