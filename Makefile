# The two README commands (make run, make test) need nothing installed beforehand but Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# RUNTIME: the package and its runtime dependencies (make install, make run);
# STAMP: the same plus the test extras (pytest, aioresponses, hypothesis, ruff) for make test.
RUNTIME := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed

.PHONY: install run test test-tools soak bench lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUNTIME): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(RUNTIME)

run: $(RUNTIME)
	$(BIN)/batchtag run examples/photos -o examples/photos-tags.jsonl
	$(BIN)/python -m batchtag.commands.show examples/photos-tags.jsonl

# The export and report tests read sidecars back with exiftool and load the report in
# Chromium; the docs/api.md test runs its curl example. Installed from Debian when missing
# and we are root (CI is); otherwise they skip.
TEST_TOOLS := exiftool:libimage-exiftool-perl chromium:chromium curl:curl

test-tools:
	@missing=""; for pair in $(TEST_TOOLS); do command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing$$missing"; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null; \
		else echo "not root: cannot install$$missing; the tests that need them will skip"; fi; \
	fi

test: $(STAMP) test-tools
	$(BIN)/ruff check batchtag tests bench scripts
	$(BIN)/python -m pytest -q

soak: $(STAMP)
	$(BIN)/python -m pytest -q -m soak -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) >/dev/null 2>&1 \
		|| echo "wrk not installed: bench falls back to an aiohttp load generator (labelled in the table)"
	$(BIN)/python -m bench.run

lint: $(STAMP)
	$(BIN)/ruff check batchtag tests bench scripts
	$(BIN)/ruff format --check batchtag tests bench scripts

format: $(STAMP)
	$(BIN)/ruff format batchtag tests bench scripts
	$(BIN)/ruff check --fix batchtag tests bench scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
