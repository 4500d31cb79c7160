# Two commands are all the set-up on a fresh machine with Python 3.12:
#   make demo   train a tiny DeepSeek-V3 on 2 CPU processes: DualPipeV (PP=2), MLA, MoE with
#               bias balancing, MTP, block-scaled FP8 (emulated); evaluate the validation split
#               every 20 steps (it prints the final perplexity) and save runs/demo/checkpoints
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
		--steps 120 --micro-batch-size 4 --num-microbatches 4 --eval-interval 20 --eval-iters 2 --save-interval 120 \
		--run-dir runs/demo --overwrite --check

test: $(INSTALLED)
	$(PY) -m pytest

test-fast: $(INSTALLED)
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs build *.egg-info

# make gpu-check   every CUDA test and the GPU benchmarks, one summary table (scripts/gpu_check.py;
#                  no GPU: the CPU parts run, the rest skip with the reason). GPU_PYTHON: .venv's
#                  python when it exists, else python3; missing packages come from wheels/ (no index):
# make gpu-wheels  downloads those wheels, on a machine with internet, for one without
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
.PHONY: gpu-check gpu-wheels
gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py
gpu-wheels:  # --no-deps: torch is the GPU machine's; the rest of the dependency closure is listed
	$(GPU_PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --dest wheels \
		'megatron-core>=0.19.2,<0.20' numpy packaging matplotlib contourpy cycler fonttools kiwisolver pillow \
		pyparsing python-dateutil six tzdata tqdm safetensors psutil pytest iniconfig pluggy pygments
