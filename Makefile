# The two commands of the README: `make app` installs and runs the demo; `make test` installs and
# runs the whole test suite (lint, unit, parity, training, app and browser tests).
VENV ?= .venv
PY := $(VENV)/bin/python
SYSPY ?= python3

.PHONY: app test install install-dev chromium

$(VENV)/.runtime: requirements.txt pyproject.toml
	test -x $(PY) || $(SYSPY) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

app: install
	$(PY) app.py

test: install-dev chromium
	$(PY) -m ruff check .
	$(PY) -m pytest
