# mlfabric: every target bootstraps what it needs on a fresh Debian machine.
#
#   make demo    the main job: a local multi-process cluster (mlfabric demo)
#   make test    the whole test suite, all tiers (unit, property, sim, net, chaos)
#   make lint    ruff
#   make bench   benchmarks
#   make clean   caches and build output (make distclean also removes .venv)
#
# Bootstrap: create .venv with $(PYTHON) when missing, install torch==$(TORCH_VERSION) FIRST (pip takes
# the local CPU build; a bare "torch" requirement would pull a multi-GB CUDA build), then the project
# with its dev extras, pinning torch again so pip can never resolve another one. A stamp file inside
# .venv records a finished install, so a second run installs nothing. Debian packages the tests need
# (iproute2, iptables for the network-namespace tests; systemd for `systemd-analyze verify` of the unit in
# deploy/systemd, it does not become PID 1) are installed when missing, as root only.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.mlfabric-installed
DEB_PACKAGES := iproute2 iptables systemd
PYTEST_ARGS ?=
BENCH_NODES ?= 2000
BENCH_LOOKUPS ?= 5000

.PHONY: help bootstrap system-deps test demo lint bench clean distclean

help:
	@echo "make demo       run the main job on a local multi-process cluster"
	@echo "make test       run the whole test suite (PYTEST_ARGS='...' to narrow it)"
	@echo "make lint       ruff check"
	@echo "make bench      benchmarks"
	@echo "make clean      remove caches and build output; make distclean also removes $(VENV)"

$(PY):
	@echo ">> creating $(VENV) with $(PYTHON)"
	@if ! $(PYTHON) -m venv $(VENV) 2>/dev/null; then \
	  rm -rf $(VENV); \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo ">> $(PYTHON) cannot create a venv; installing python3-venv"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null; \
	  fi; \
	  $(PYTHON) -m venv $(VENV); \
	fi

$(STAMP): $(PY) pyproject.toml
	@echo ">> installing torch==$(TORCH_VERSION) (CPU build), then mlfabric[dev] into $(VENV)"
	@$(PIP) install -qq "torch==$(TORCH_VERSION)"
	@$(PIP) install -qq -e '.[dev]' "torch==$(TORCH_VERSION)"
	@touch $@

bootstrap: $(STAMP) system-deps

# Quiet when everything is present; installs only what is missing, and only as root.
system-deps:
	@missing=""; \
	for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if ! command -v dpkg-query >/dev/null || ! command -v apt-get >/dev/null; then \
	    echo ">> not a Debian system: cannot install$$missing (tests that need them skip)"; \
	  elif [ "$$(id -u)" != 0 ]; then \
	    echo ">> not root: cannot install Debian packages$$missing (tests that need them skip)"; \
	  else \
	    echo ">> installing Debian packages:$$missing"; \
	    apt-get update -qq; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  fi; \
	fi

test: bootstrap
	@rc=0; $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ "$$rc" = 5 ]; then echo "error: pytest collected no tests" >&2; fi; \
	exit "$$rc"

demo: bootstrap
	$(VENV)/bin/mlfabric demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: bootstrap
	$(VENV)/bin/mlfabric sim ring --nodes $(BENCH_NODES) --seed 1 --lookups $(BENCH_LOOKUPS) --json
	$(VENV)/bin/mlfabric sim job --nodes 1000 --rounds 10 --kill-aggregators 50 --seed 1 --json
	$(VENV)/bin/mlfabric sim job --nodes 1000 --rounds 10 --kill-aggregators 50 --kill-coordinator 5 --seed 1 --json
	$(VENV)/bin/mlfabric sim job --nodes 1000 --rounds 10 --churn 2 --seed 1 --json
	$(PY) benchmarks/aggregate_round.py --shards 8

clean:
	rm -rf .pytest_cache .hypothesis .ruff_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
