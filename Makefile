# deqrun: `make run` (default experiment) and `make test` build .venv first when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The torch build to install; on other platforms e.g. TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=

.PHONY: install run test test-all lint bench precision table-jiio table-inr shine-bilevel shine-inversion \
        solver-suite reproduce ddp-scaling clean

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

# Paper tables: make table-NAME SCALE=smoke (CPU) | SCALE=paper (GPU cluster; add e.g.
# ARGS="launcher=slurm hydra.launcher.partition=gpu"), for every configs/table/NAME_<scale>.yaml
# (phantom, shine, ignn, lm, inr). DRY=1 prints the sweep and every job's config without running.
SCALE ?= smoke
NOW := $(shell date +%Y-%m-%d_%H-%M-%S)

# JIIO's table is a timing and robustness study, not a sweep: scripts/jiio_table.py runs the jobs
# (generator, JIIO vs Adam-40 timing, the classifiers trained without and with JIIO attacks).
table-jiio: $(STAMP)
ifeq ($(DRY),1)
	$(PY) scripts/jiio_table.py --scale $(SCALE) --dry $(ARGS)
else
	$(PY) scripts/jiio_table.py --scale $(SCALE) $(ARGS)
endif

# The INR table also prints implicit-minus-explicit PSNR per family (scripts/inr_table.py).
INR_ROWS := fourier_mfn fourier_imfn gabor_mfn gabor_imfn siren isiren
table-inr: $(STAMP)
ifeq ($(DRY),1)
	$(VENV)/bin/deqrun table=inr_$(SCALE) $(ARGS) --cfg hydra --package hydra.sweeper.params
	for row in $(INR_ROWS); do for image in 0 1 2; do \
	  echo "# ---- row $$row image $$image"; \
	  $(VENV)/bin/deqrun table=inr_$(SCALE) experiment=inr/$$row task.image=$$image $(ARGS) --cfg job || exit 1; \
	done; done
else
	$(VENV)/bin/deqrun table=inr_$(SCALE) hydra.sweep.dir=outputs/tables/inr-$(SCALE)/$(NOW) $(ARGS); status=$$?; \
	$(VENV)/bin/deqrun-report outputs/tables/inr-$(SCALE)/$(NOW); \
	$(PY) scripts/inr_table.py outputs/tables/inr-$(SCALE)/$(NOW); exit $$status
endif

table-%: $(STAMP)
ifeq ($(DRY),1)
	$(PY) scripts/reproduce.py --scale $(SCALE) --only $* --dry --args "$(ARGS)"
else
	$(VENV)/bin/deqrun table=$*_$(SCALE) hydra.sweep.dir=outputs/tables/$*-$(SCALE)/$(NOW) $(ARGS); status=$$?; \
	$(VENV)/bin/deqrun-report outputs/tables/$*-$(SCALE)/$(NOW) && exit $$status
endif

# Every table at a scale, skipping finished ones, with an index page outputs/tables/index-<scale>.md:
# make reproduce SCALE=smoke [ONLY=phantom,lm] [DRY=1] [ARGS="..."]
reproduce: $(STAMP)
	$(PY) scripts/reproduce.py --scale $(SCALE) $(if $(ONLY),--only $(ONLY)) \
	  $(if $(filter 1,$(DRY)),--dry) --args "$(ARGS)"

# Data-parallel scaling on CPU through the real runner: 2 gloo processes x 1 thread (torchrun) vs
# 1 process x 2 threads (and 1 x 1), the default experiment, one epoch each.
ddp-scaling: $(STAMP)
	$(PY) scripts/ddp_scaling.py --world 2 --threads 1 $(ARGS)

# SHINE (Ramzi et al. 2022): the bi-level study (offline data) and the inversion-quality study;
# the classic root-finding suite of the solvers (ours, scipy, torchdeq when installed).
shine-bilevel: $(STAMP)
	$(PY) -m deqrun.studies.bilevel --out outputs/shine $(ARGS)

shine-inversion: $(STAMP)
	$(PY) -m deqrun.studies.inversion --out outputs/shine $(ARGS)

solver-suite: $(STAMP)
	$(PY) scripts/solver_suite.py $(ARGS)

clean:
	rm -rf outputs/runs outputs/multirun .pytest_cache .ruff_cache
