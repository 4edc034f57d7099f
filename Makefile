# clipline: `make demo` runs the whole pipeline on generated data; `make test` runs the test suite.
# Both create .venv on first use (pip + venv; torch is pinned) and reuse it afterwards.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.clipline-installed

.PHONY: setup demo test clean reliability

setup: $(STAMP)

# Re-installs only when pyproject.toml changes. torch and torchvision come first, pinned, so that nothing
# later can pull a different build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

demo: setup
	$(BIN)/clipline demo configs/demo.yaml

test: setup
	$(BIN)/python -m pytest -q tests

# The fault-injection, hostile-input and load tests (marker `fault`); writes their table into RELIABILITY.md,
# keeping the text above its marker line.
reliability: setup
	$(BIN)/python -m pytest -q -m fault --reliability-table RELIABILITY.md tests

clean:
	rm -rf runs/demo
