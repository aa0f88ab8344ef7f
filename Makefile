# `make demo` and `make test` do all the set-up a fresh machine needs, then run.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.condmoe-installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist
APT_PACKAGES := dataset-fashion-mnist prometheus
# Two pytest processes, a test file each at a time (loadfile: a file's module fixtures, such as its
# embedded Ray or its two-node cluster, stay one per file). Most of a Ray test's time is start-up
# latency (processes importing torch, actors starting, node-death detection), so two files side by
# side keep both cores busy; `make test PYTEST_ARGS=` runs them one by one.
PYTEST_ARGS ?= -n 2 --dist loadfile
RESULTS_ARGS ?=

.PHONY: setup system-deps ds-ops demo test bench results clean

setup: $(STAMP) system-deps ds-ops

# The venv: torch first, pinned (the CPU wheel on this machine's disk), then condmoe itself.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# Fashion-MNIST (real data) and Prometheus (a real server for the monitoring tests) come from
# Debian. Without apt, condmoe falls back to scikit-learn's digits and says so.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	    echo "installing Debian packages:$$missing"; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	  else echo "apt-get not found: Fashion-MNIST and prometheus unavailable (digits fallback)"; fi; \
	fi

# DeepSpeed compiles its CPU collective op on first use (1-2 minutes on 2 cores): once here, not
# inside the first job or test (cached under ~/.cache/torch_extensions; a no-op afterwards).
ds-ops: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -m condmoe.trainer.ds_ops

demo: setup
	$(VENV)/bin/condmoe demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/routing.py
	$(PY) benchmarks/data.py
	$(PY) benchmarks/hard_routing.py
	$(PY) benchmarks/metrics.py
	$(PY) benchmarks/train.py

# The seed papers' claims on Fashion-MNIST (docs/results.md): five comparisons as condmoe sweeps,
# 3 seeds each, under an hour on 2 idle cores. Not part of `make test`. A smoke run of the pipeline:
#   make results RESULTS_ARGS=--smoke
results: setup
	$(PY) benchmarks/results.py $(RESULTS_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
