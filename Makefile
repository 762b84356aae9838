# The two commands: `make demo` (the main job on embedded defaults) and `make test` (every test).
# Both create .venv and install everything on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install system-deps demo test test-fast test-slow clean

install: $(STAMP)

# headless Chromium renders the HTML reports in the report tests (Debian package; skipped with a reason if absent)
system-deps:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium could not be installed: the report screenshot tests will be skipped"

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

test: $(STAMP) system-deps
	$(VENV)/bin/pytest -m "slow or not slow"

test-fast: $(STAMP) system-deps
	$(VENV)/bin/pytest -m "not slow"

test-slow: $(STAMP) system-deps
	$(VENV)/bin/pytest -m slow

clean:
	rm -rf $(VENV) .clipforge
