# `make book` and `make test` each set up a local virtual environment (.venv) first, installing
# the project from its own pyproject.toml; the install is redone when pyproject.toml changes.

PYTHON ?= python3
PROFILE ?= cpu
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Optional data folders, passed to `cxr book run` when set: make book DATA_ROOT=/data/ChestX-ray14
DATA_ARGS := $(if $(DATA_ROOT),--data-root "$(DATA_ROOT)") \
             $(if $(PEDIATRIC_ROOT),--pediatric-root "$(PEDIATRIC_ROOT)")
PYTHON_CHECK := import sys; sys.exit(0 if sys.version_info >= (3, 10) else \
	"this project needs Python >= 3.10, but $(PYTHON) is %d.%d: run make PYTHON=python3.11 (or another >= 3.10)" % sys.version_info[:2])

.PHONY: setup book test lint lab publish clean

setup: $(STAMP)

$(BIN)/python:
	@$(PYTHON) -c '$(PYTHON_CHECK)'
	$(PYTHON) -m venv $(VENV)

# pip older than 21.3 (bundled with early Python 3.10) cannot install a pyproject.toml project
# in editable mode, hence the upgrade. pip byte-compiles what it installs on one core; compileall
# does it on every core (on 2 cores the set-up took 2 min 29 s instead of 3 min 18 s). Without
# .pyc files every import compiles anew where PYTHONDONTWRITEBYTECODE is set (2.5 times slower).
# The few files written for a newer Python do not compile, and are skipped as pip skips them.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install --no-compile -e '.[dev]'
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	@touch $(STAMP)

book: $(STAMP)
	$(BIN)/cxr book run --profile $(PROFILE) $(DATA_ARGS)
	$(BIN)/cxr book build --profile $(PROFILE)

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

# The published edition: run with PROFILE (gpu-sample for the real thing), copy the executed
# chapters into book/chapters/, and render them.
publish: $(STAMP)
	$(BIN)/cxr book run --profile $(PROFILE) --publish $(DATA_ARGS)
	$(BIN)/cxr book build --published

clean:
	rm -rf build _build .pytest_cache .ruff_cache
