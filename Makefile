# Two commands are all the set-up on a fresh machine with Python 3.12:
#   make demo   train a tiny DeepSeek-V3 on 2 CPU processes: DualPipeV (PP=2), MLA, MoE with
#               bias balancing, MTP, block-scaled FP8 (emulated)
#   make test   the whole test suite (make test-fast skips the slow end-to-end tests)
PYTHON ?= python3.12
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test test-fast clean

$(INSTALLED): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[test]'
	touch $(INSTALLED)

demo: $(INSTALLED)
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --nproc-per-node 2 -m megatron_dsv3.training \
		--preset tiny-fp8 --set num_layers=4 --pipeline-schedule dualpipev --pp 2 \
		--steps 120 --micro-batch-size 4 --num-microbatches 4 --run-dir runs/demo --overwrite --check

test: $(INSTALLED)
	$(PY) -m pytest

test-fast: $(INSTALLED)
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs build *.egg-info
