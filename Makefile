# Two commands are all the set-up on a fresh machine with Python 3.12:
#   make demo   train the tiny DeepSeek-V3 on CPU (MLA + MoE with bias balancing + MTP)
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
	$(PY) -m megatron_dsv3.training --preset tiny --steps 400 --micro-batch-size 8 \
		--num-microbatches 2 --run-dir runs/demo --check

test: $(INSTALLED)
	$(PY) -m pytest

test-fast: $(INSTALLED)
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs build *.egg-info
