# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= test,lint,dali-cuda12
# The declared floor (pyproject.toml: torch>=2.11): the suite again on torch 2.11 and its torchvision
VENV_FLOOR ?= .venv-floor
PY_FLOOR := $(VENV_FLOOR)/bin/python
STAMP_FLOOR := $(VENV_FLOOR)/.installed
FLOOR_PINS ?= torch==2.11.* torchvision==0.26.*
FLOOR_TESTS ?= tests

# Test processes (pytest-xdist): 0 runs the suite in this process; N > 0 starts N workers, each
# taking whole files (module fixtures are built once) with torch limited to one thread. 2 by default:
# on a 2-core machine the suite ran 1.7x faster so (docs/PERFORMANCE.md, "Test suite").
PYTEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

.PHONY: demo test test-fast test-floor install clean lint

$(PY):
	python3 -m venv $(VENV)

# Re-install when the dependency list changes. Editable, so the checkout is what runs.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m engine.commands.demo  # re-running reuses finished runs and resumes interrupted ones

test: $(STAMP)  # the whole suite; .ci/run runs it
	$(PYTEST)

test-fast: $(STAMP)  # what to run between edits: every test not marked slow
	$(PYTEST) -m "not slow"

# ruff and mypy come with the lint extra (in EXTRAS)
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

$(PY_FLOOR):
	python3 -m venv $(VENV_FLOOR)

$(STAMP_FLOOR): pyproject.toml | $(PY_FLOOR)
	$(PY_FLOOR) -m pip install --quiet --disable-pip-version-check $(FLOOR_PINS) -e ".[$(EXTRAS)]"
	$(PY_FLOOR) -c "import torch, torchvision; print('floor: torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $(STAMP_FLOOR)

# The suite on the floor; a subset with FLOOR_TESTS="tests/test_distributed.py tests/test_gpu.py ..."
test-floor: $(STAMP_FLOOR)
	$(PY_FLOOR) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(FLOOR_TESTS)

clean:
	rm -rf runs .cache
