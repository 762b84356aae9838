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
	@# PostgreSQL for the multi-user Prefect server test (Debian puts initdb in /usr/lib/postgresql/*/bin)
	@{ command -v initdb || ls /usr/lib/postgresql/*/bin/initdb; } >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
		echo "postgresql could not be installed: the PostgreSQL-backed Prefect test will be skipped"

# the same script builds the image (infra/docker/Dockerfile): torch==2.13.0 first, then the project, then the fix-up
$(STAMP): pyproject.toml infra/install.sh
	test -x $(PY) || python3 -m venv $(VENV)
	sh infra/install.sh $(PY) dev
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
