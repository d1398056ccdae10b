# Two commands run everything on a fresh machine (they set up .venv on first use):
#   make demo   the main job: finetune a small GPT-2 offline and print what it learned
#   make test   the test suite (make test-slow: the full-size and multi-process tests)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-slow gpu-wheelhouse

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# constraints.txt pins torch to the 2.13.0 CPU build here (pyproject.toml only says which versions work).
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# 2-5 minutes on 2 CPU cores (bf16 where the CPU has it fast, else fp32), no network: writes runs/offline-demo/ and prints held-out accuracy.
demo: setup
	$(PY) train/sft.py --offline-demo --overwrite

test: setup
	$(PY) -m pytest

# llama.cpp for the slow tests, built once from its sdist; pip caches the wheel. Portable x86-64-v3 flags
# rather than -march=native: pip's cache does not know the flags, and the wheel must run on whatever CPU
# the next machine has.
LLAMA_CMAKE_ARGS := $(if $(filter x86_64,$(shell uname -m)),-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON,)
$(VENV)/.llama: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --quiet -c constraints.txt -e ".[dev,llama]"
	touch $@

test-slow: setup $(VENV)/.llama
	# pytest exits 5 when no test is marked slow; that is not a failure.
	$(PY) -m pytest -m slow || [ $$? -eq 5 ]

# wheelhouse/ (git-ignored, ~11 MB): the wheels a CUDA machine with torch preinstalled and no network lacks, plus the
# book's data; bench/README.md ("A GPU check") gives the one command that installs them there and runs the check.
gpu-wheelhouse: setup
	$(PY) bench/gpu_wheelhouse.py
