# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(PY):
	python3 -m venv $(VENV)

# Re-install when the dependency list changes. Editable, so the checkout is what runs.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m engine.commands.demo  # re-running reuses finished runs and resumes interrupted ones

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf runs .cache
