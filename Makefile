# Set-up and everyday commands. `make demo` and `make test` work on a fresh clone:
# they create .venv and install kernelgeo (editable) with its dependencies once;
# the stamp file makes a second run skip the install unless setup.cfg/pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-install
# torch and torchvision are pinned together: the CPU here runs the CUDA wheels fine, and a
# matching pair avoids torchvision's "operator torchvision::nms does not exist".
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: all venv demo test test-fast lint docs screenshots bench clean

all: test

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev,docs]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kernelgeo demo

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -x -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check kernelgeo tests bench analysis docs/_ext

docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -b html -j 1 docs docs/_build/html

# headless-Chromium screenshots of built pages into docs/_build/screenshots (needs chromium:
# apt-get install chromium); not part of CI
screenshots: docs
	PY=$(PY) HTML=docs/_build/html bash docs/screenshots/take.sh

bench: $(STAMP)
	$(PY) bench/optimizer_step.py
	$(PY) bench/train_step.py

clean:
	rm -rf docs/_build runs .pytest_cache
