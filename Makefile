# The two commands: `make demo` (the main job on embedded defaults) and `make test` (every test).
# Both create .venv and install everything on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install demo test test-fast test-slow bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the exact pin takes the CPU build that lies on these machines' disk
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# img2dataset drags in the `dataclasses` 0.6 backport, which breaks Prefect's server on 3.11
	$(PY) -m pip uninstall -y -q dataclasses
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/clipforge demo

test: $(STAMP)
	$(VENV)/bin/pytest -m "slow or not slow"

test-fast: $(STAMP)
	$(VENV)/bin/pytest -m "not slow"

test-slow: $(STAMP)
	$(VENV)/bin/pytest -m slow

clean:
	rm -rf $(VENV) .clipforge
