# deqrun: `make run` (default experiment) and `make test` build .venv first when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The torch build to install; on other platforms e.g. TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=

.PHONY: install run test test-all lint bench precision table-phantom clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/deqrun $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) scripts/bench_core.py $(ARGS)

# Gradient precision (Geng et al. 2021, Figs. 1 and 3): train MDEQ-tiny on digits logging the
# cosine with the exact gradient every 5 steps, then the synthetic + checkpoint + dynamic study.
precision: $(STAMP)
	$(VENV)/bin/deqrun run_name=precision-mdeq trainer.precision_every=5 trainer.jac_reg_weight=1.0 $(ARGS)
	$(PY) -m deqrun.studies.precision --run outputs/runs/precision-mdeq --out outputs/precision

# Paper tables: make table-phantom SCALE=smoke (CPU, < 30 min) | SCALE=paper (GPU cluster; add
# e.g. ARGS="launcher=slurm hydra.launcher.partition=gpu"). DRY=1 prints the sweep and every job's
# config without running anything.
SCALE ?= smoke
TABLE_DIR := outputs/tables/phantom-$(SCALE)/$(shell date +%Y-%m-%d_%H-%M-%S)

table-phantom: $(STAMP)
ifeq ($(DRY),1)
	$(VENV)/bin/deqrun table=phantom_$(SCALE) $(ARGS) --cfg hydra --package hydra.sweeper.params
	for row in $$($(VENV)/bin/deqrun table=phantom_$(SCALE) --cfg job --package report.rows | sed -n 's/^- //p'); do \
	  echo "# ---- row $$row"; \
	  $(VENV)/bin/deqrun table=phantom_$(SCALE) experiment=phantom/$$row $(ARGS) --cfg job || exit 1; \
	done
else
	$(VENV)/bin/deqrun table=phantom_$(SCALE) hydra.sweep.dir=$(TABLE_DIR) $(ARGS); status=$$?; \
	$(VENV)/bin/deqrun-report $(TABLE_DIR) && exit $$status
endif

clean:
	rm -rf outputs/runs outputs/multirun .pytest_cache .ruff_cache
