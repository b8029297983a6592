# Two commands on a fresh machine:
#   make demo   create .venv, install, build the embedded corpus, pretrain a small ELECTRA, export, summarise
#   make test   create .venv, install, run the test suite (all of it, as CI does)
#   make test-fast   the same without the tests marked slow (DeepSpeed ranks, subprocess runs)
# CPU machines get the local CPU build of torch (torch==2.13.0); a machine that already has torch keeps it.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
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

.PHONY: install test test-fast demo clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[electra-fast] installing into $(VENV) (a few minutes the first time)"
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# pytest exits 5 when it collects no tests; make treats every non-zero exit as a failure.
test: $(STAMP)
	$(PY) -m pytest -q tests

# For the edit-test loop; CI runs `make test`.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# GPU or CPU is decided once, here; the trainer resumes runs/demo when it holds a checkpoint, so a larger
# DEMO_STEPS continues the run and the same one trains nothing and reprints the summary.
demo: $(STAMP)
	@if $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		prepare="$(DEMO_GPU_PREPARE_FLAGS)"; settings="$(DEMO_GPU_SETTINGS)"; else \
		prepare="$(DEMO_PREPARE_FLAGS)"; settings="$(DEMO_CPU_SETTINGS)"; fi; \
	$(PY) -m electra_fast.cli prepare --default --out $(DEMO_DATA) $$prepare && \
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) -m electra_fast.train --config configs/electra-small.yaml \
		--run-dir $(DEMO_RUN) --resume --set data.path=$(DEMO_DATA) \
		--set train.deepspeed_config=configs/deepspeed/zero0.json $$settings --set train.max_steps=$(DEMO_STEPS) && \
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) -m electra_fast.demo $(DEMO_RUN)

clean:
	rm -rf $(VENV) runs data build *.egg-info
