# Two commands on a fresh Debian machine:  `make demo`  and  `make test`.
# Each installs what it needs first (Debian packages, a venv with pinned Python packages);
# re-running is fast when nothing changed.

SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEB_PACKAGES := espeak-ng sox
# What tests/test_slurm.py needs for its one-node SLURM (daemons started by the test itself),
# iproute2 for the network namespaces of tests/test_slurm_multinode.py's two nodes, and the
# headless browser tests/test_report.py opens the report in.
TEST_DEB_PACKAGES := slurm-wlm munge iproute2 chromium
# Root installs Debian packages directly; anyone else goes through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CORES ?= all
SNAKEMAKE_ARGS ?=
PYTEST_ARGS ?=
# The demo's folders: run.results_dir and run.logs_dir of config.yaml (schema defaults results,
# logs), read when a recipe needs them, once the venv exists; `make demo RESULTS=...` overrides.
run_dir = $(shell $(BIN)/python -c 'import sys, yaml; run = (yaml.safe_load(open("config.yaml")) or {}).get("run") or {}; print(run.get(sys.argv[1]) or sys.argv[2])' $(1) $(2) 2>/dev/null || echo $(2))
RESULTS = $(call run_dir,results_dir,results)
LOGS = $(call run_dir,logs_dir,logs)

.PHONY: install demo test test-deps lint format clean

$(STAMP): requirements.lock pyproject.toml
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

install: $(STAMP)

# The whole pipeline on the embedded demo default (config.yaml), on CPU, then the report.
demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores $(CORES) --resources gpu=1 $(SNAKEMAKE_ARGS)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --report $(RESULTS)/report.zip $(SNAKEMAKE_ARGS)
	@echo
	@echo "report:  $(RESULTS)/report.zip (unzip it, open report/report.html in a browser)"
	@echo "samples: $(RESULTS)/samples/stage{1,2,3}/*.wav and samples.tsv (played in the report's 6. Samples)"
	@echo "scores:  $(RESULTS)/eval/stageN/summary.json (the report's 5. Evaluation); the last stage's:"
	@last=$$(ls $(RESULTS)/eval/stage*/summary.json 2>/dev/null | tail -n 1); \
	if [ -n "$$last" ]; then $(BIN)/indextts eval-summary "$$last"; else echo "  (no stage scored: samples.stages is empty)"; fi
	@echo "export:  $(RESULTS)/export/ (export_report.json says what IndexTTS2 can do with it)"
	@echo "logs:    $(LOGS)/<stage>/"

# The house conventions first (snakefmt, snakemake --lint), so CI fails on a regression; then
# the suite, SLURM test included.
test: lint test-deps
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest $(PYTEST_ARGS)

test-deps:
	@missing=""; for p in $(TEST_DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for the tests:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

# Rule files formatted by snakefmt and no `snakemake --lint` warnings (`make format` fixes the first).
lint: $(STAMP)
	$(BIN)/snakefmt --check Snakefile rules/
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --lint

format: $(STAMP)
	$(BIN)/snakefmt Snakefile rules/

# The demo's outputs and logs, and Snakemake's records; another config's run folders stay.
# Only folders inside the clone are removed (a run.results_dir of "." is not wiped).
clean:
	@for d in $(RESULTS) $(LOGS); do case "$$(realpath -m "$$d")/" in "$(CURDIR)/"?*) ;; \
	  *) echo "make clean: $$d is not a folder inside $(CURDIR); remove it by hand"; exit 1;; esac; done
	rm -rf $(RESULTS) $(LOGS) .snakemake
