# One entry point: `make demo` labels held-out scenes with the small model kept
# in models/demo/ (minutes), `make demo-model` retrains that model from scratch
# (seeded; docs/performance.md's learning check), `make test` runs the suite.
# All create .venv first (idempotent).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: venv test demo demo-model clean

venv: $(VENV)/.installed

# torch is pinned first: the pin resolves to the local CPU wheel, while a bare
# `torch` requirement would pull several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# OpenCV's contrib build last: it shares files with opencv-python-headless.
	$(PY) -m pip install -q -e '.[selective-search]'
	touch $@

test: venv
	$(PY) -m pytest -q tests

demo: venv
	$(PY) jobs/demo.py

demo-model: venv
	$(PY) jobs/demo.py --retrain

clean:
	rm -rf $(VENV) demo-out
