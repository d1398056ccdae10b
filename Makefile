# Two commands run everything on a fresh machine (they set up .venv on first use):
#   make demo   the main job: finetune a small GPT-2 offline and print what it learned
#   make test   the test suite (make test-slow: the full-size and multi-process tests)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-slow bench

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# constraints.txt pins torch to the 2.13.0 CPU build here (pyproject.toml only says which versions work).
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# 2-5 minutes on 2 CPU cores, no network: writes runs/offline-demo/ and prints held-out accuracy.
demo: setup
	$(PY) train/sft.py --offline-demo --overwrite

test: setup
	$(PY) -m pytest

test-slow: setup
	# pytest exits 5 when no test is marked slow; that is not a failure.
	$(PY) -m pytest -m slow || [ $$? -eq 5 ]
