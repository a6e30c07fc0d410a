# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Test processes (pytest-xdist): 0 runs the suite in this process; N > 0 starts N workers, each
# taking whole files (module fixtures are built once) with torch limited to one thread.
PYTEST_WORKERS ?= 0
PYTEST := $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

.PHONY: demo test test-fast install clean lint

$(PY):
	python3 -m venv $(VENV)

# Re-install when the dependency list changes. Editable, so the checkout is what runs.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m engine.commands.demo  # re-running reuses finished runs and resumes interrupted ones

test: $(STAMP)  # the whole suite; .ci/run runs it
	$(PYTEST)

test-fast: $(STAMP)  # what to run between edits: every test not marked slow
	$(PYTEST) -m "not slow"

# ruff and mypy come with the lint extra: $(PY) -m pip install -e ".[lint]"
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

clean:
	rm -rf runs .cache
