# Two commands on a fresh machine:
#   make demo   create .venv, install, build the embedded corpus, pretrain a small ELECTRA, export, summarise
#   make test   create .venv, install, run the test suite (all of it, as CI does)
#   make test-fast   the same without the tests marked slow (DeepSpeed ranks, subprocess runs)
#   make test-latest the suite in its own venv (.venv-latest) with the newest releases, not the lock
#   make lock        refresh requirements/cpu.lock from a fresh resolve (then run make test, commit it)
# CPU machines get the local CPU build of torch (torch==2.13.0); a machine that already has torch keeps it.
# Installs follow the lock (pip constraints): the versions CI ran with. `make install LOCK=` installs
# without it (a GPU machine whose CUDA torch is not 2.13.0).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK ?= requirements/cpu.lock
CONSTRAINTS := $(if $(LOCK),-c $(LOCK))
# The kernels are their own distribution (kernels/pyproject.toml); both install editable.
PROJECTS := -e ./kernels -e ".[dev]"
DEMO_DATA := data/default
DEMO_RUN := runs/demo
# The demo's length: a second `make demo` with a larger DEMO_STEPS continues runs/demo to that step.
DEMO_STEPS ?= 300
# On a CPU: a small ELECTRA chosen by measuring how fast its discriminator learns on two cores (README,
# "What make demo shows"): 2 layers of width 256, a 1/8-width generator, no dropout, lr 2e-3, a short
# vocabulary and sequences. One intra-op thread: the model is small, and spinning OpenMP threads on a busy
# 2-core machine cost up to 7x (override DEMO_THREADS).
DEMO_PREPARE_FLAGS ?= --vocab-size 4096 --seq-len 64 --heldout 256
DEMO_CPU_SETTINGS ?= --set data.seq_len=64 --set model.num_layers=2 --set model.hidden_size=256 \
	--set model.num_heads=4 --set model.intermediate_size=1024 --set model.generator_fraction=0.125 \
	--set model.dropout=0.0 --set model.attention_dropout=0.0 --set train.global_batch_size=64 \
	--set train.warmup_steps=30 --set train.lr=2e-3 --set train.save_every=100 --set train.log_every=10 \
	--set train.eval_every=50 --set train.eval_batches=4
# On a GPU: the real ELECTRA-Small (bf16, Triton kernels) on sequences of 128.
DEMO_GPU_PREPARE_FLAGS ?= --vocab-size 8192 --seq-len 128 --heldout 512
DEMO_GPU_SETTINGS ?= --set data.seq_len=128 --set train.warmup_steps=300 --set train.save_every=1000 \
	--set train.log_every=50 --set train.eval_every=500
DEMO_THREADS ?= 1

.PHONY: install test test-fast test-latest lock demo clean

# One recipe for every venv: $(1) the venv folder, $(2) pip's constraint flags (empty: newest releases).
define make_venv
	@test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	@echo "[electra-fast] installing into $(1) (a few minutes the first time)"
	@$(1)/bin/python -m pip install -q --upgrade pip
	@$(1)/bin/python -c "import torch" 2>/dev/null || $(1)/bin/python -m pip install -q torch==2.13.0
	@$(1)/bin/python -m pip install -q $(2) $(PROJECTS)
endef

$(STAMP): pyproject.toml kernels/pyproject.toml $(LOCK)
	$(call make_venv,$(VENV),$(CONSTRAINTS))
	@touch $(STAMP)

install: $(STAMP)

# pytest exits 5 when it collects no tests; make treats every non-zero exit as a failure.
test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

# For the edit-test loop; CI runs `make test`.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# An upstream release that breaks us is found here, on purpose, not by a red CI: the newest release of
# everything but torch (the local CPU build), in its own venv. README, "When make test-latest fails".
test-latest:
	rm -rf .venv-latest
	$(call make_venv,.venv-latest,)
	ELECTRA_TEST_LATEST=1 .venv-latest/bin/python -m pytest -q --durations=15 tests

# The lock is pip's own resolve in a fresh venv, frozen: torch 2.13.0 (CPU), the Triton that torch 2.13's
# CUDA build pins, then both projects with their dev extra.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q torch==2.13.0 triton==3.7.1
	.venv-lock/bin/python -m pip install -q $(PROJECTS)
	{ sed -n '/^#/p' requirements/cpu.lock; .venv-lock/bin/python -m pip freeze --exclude-editable \
		| sed 's/+cpu$$//'; } > requirements/cpu.lock.tmp && mv requirements/cpu.lock.tmp requirements/cpu.lock
	rm -rf .venv-lock
	@echo "[electra-fast] requirements/cpu.lock refreshed: run make test, then commit it"

# GPU or CPU is decided once, here; the trainer resumes runs/demo when it holds a checkpoint, so a larger
# DEMO_STEPS continues the run and the same one trains nothing and reprints the summary.
demo: $(STAMP)
	@if $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		prepare="$(DEMO_GPU_PREPARE_FLAGS)"; settings="$(DEMO_GPU_SETTINGS)"; else \
		prepare="$(DEMO_PREPARE_FLAGS)"; settings="$(DEMO_CPU_SETTINGS)"; fi; \
	$(PY) -m electra_fast.cli prepare --default --out $(DEMO_DATA) $$prepare && \
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) -m electra_fast.train --config configs/electra-small.yaml \
		--run-dir $(DEMO_RUN) --resume --set data.path=$(DEMO_DATA) \
		--set train.deepspeed_config=zero0 $$settings --set train.max_steps=$(DEMO_STEPS) && \
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) -m electra_fast.demo $(DEMO_RUN)

clean:
	rm -rf $(VENV) .venv-latest .venv-lock runs data build *.egg-info kernels/build kernels/*.egg-info
