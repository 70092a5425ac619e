# Set-up commands (each works alone on a fresh machine):
#   make train   install the tool with the offline demo packages, then train the demo
#   make test    install the tool with the test dependencies, then run the whole test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-dev lint train test test-fast clean

install:
	$(PIP) install -e ".[demo]"

install-dev:
	$(PIP) install -e ".[demo,dev]"

train: install
	$(PYTHON) -m transfer_cli train

lint:
	$(PYTHON) -m ruff check transfer_cli tests scripts
	$(PYTHON) -m mypy

# Two workers, each test file on one (its module fixtures built once): most tests are single-threaded, so the
# suite takes about half the wall time on a 2-core machine.
test: install-dev lint
	$(PYTHON) -m pytest -q -n 2 --dist loadfile

test-fast: install-dev
	$(PYTHON) -m pytest -q -n 2 --dist loadfile -m "not slow"

clean:
	rm -rf outputs multirun .pytest_cache build *.egg-info
