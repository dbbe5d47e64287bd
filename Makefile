# The two commands a new user types are `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint lock services

# One idempotent install step: the virtualenv, the package (editable) and its pinned dependencies.
install: $(STAMP)
$(STAMP): setup.cfg pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e '.[dev]'
	touch $(STAMP)

# The main job on the embedded sample marketplace.
demo: install
	$(PY) scripts/run_demo.py

# Services the tests start themselves need their binaries (PostgreSQL from Debian).
services:
	bash scripts/install_services.sh

test: install services lint
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/hadolint Dockerfile

# Re-pin every dependency to what the virtualenv holds now.
lock: install
	{ echo "# Exact versions the project is tested with (pip constraints; regenerate with 'make lock')."; \
	  $(PY) -m pip freeze --exclude-editable | grep -v -i '^marketplace'; } > requirements/constraints.txt
