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
# On a CPU: a downsized ELECTRA-Small that trains for about five minutes. One intra-op thread: the model
# is small, and spinning OpenMP threads on a busy 2-core machine cost up to 7x (override DEMO_THREADS).
DEMO_CPU_SETTINGS ?= --set model.num_layers=4 --set model.hidden_size=128 --set model.num_heads=2 \
	--set model.intermediate_size=512 --set model.generator_fraction=0.5 --set train.global_batch_size=32 \
	--set train.max_steps=300 --set train.warmup_steps=30 --set train.lr=3e-4 --set train.save_every=100 \
	--set train.log_every=10
# On a GPU: the real ELECTRA-Small (bf16, Triton kernels), a few thousand steps.
DEMO_GPU_SETTINGS ?= --set train.max_steps=3000 --set train.warmup_steps=300 --set train.save_every=1000 \
	--set train.log_every=50
DEMO_THREADS ?= 1

.PHONY: install test test-fast demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# pytest exits 5 when it collects no tests; make treats every non-zero exit as a failure.
test: $(STAMP)
	$(PY) -m pytest -q tests

# For the edit-test loop; CI runs `make test`.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

demo: $(STAMP)
	$(PY) -m electra_fast.cli prepare --default --out $(DEMO_DATA) --vocab-size 8192 --seq-len 128
	if $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		settings="$(DEMO_GPU_SETTINGS)"; else settings="$(DEMO_CPU_SETTINGS)"; fi; \
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) -m electra_fast.train --config configs/electra-small.yaml \
		--run-dir $(DEMO_RUN) --resume --set data.path=$(DEMO_DATA) --set data.seq_len=128 \
		--set train.deepspeed_config=configs/deepspeed/zero0.json $$settings
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) -m electra_fast.demo $(DEMO_RUN)

clean:
	rm -rf $(VENV) runs data build *.egg-info
