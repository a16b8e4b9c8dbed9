# The two quick-start commands:  `make run` (set up, train the default preset, analyze)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch 2.13.0 is installed first; for a GPU, set TORCH to the build you want, e.g.
#   make setup TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
PRESET ?= fast
TIMESTAMP := $(shell date +%Y%m%d-%H%M%S)
RUN ?= runs/$(PRESET)-$(TIMESTAMP)
BIN := $(VENV)/bin

.PHONY: setup run lint test test-fast clean chromium

setup: $(VENV)/.installed

# The browser tests of `vitscope serve` drive Debian's chromium (Playwright cannot download its own here). `make test`
# installs it where apt-get runs as root (CI); elsewhere a note, and those tests skip saying why. Never fails.
chromium:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's chromium for the browser tests"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
			|| echo "note: apt-get could not install chromium: the browser tests will be skipped"; \
	else echo "note: no /usr/bin/chromium (install Debian's chromium package as root): the browser tests will be skipped"; fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: setup
	$(BIN)/vitscope train --preset $(PRESET) --out $(RUN)
	$(BIN)/vitscope analyze $(RUN)

# ruff's rules are in pyproject.toml; `make test` (and so CI) lints before it tests.
lint: setup
	$(BIN)/ruff check .

test: lint chromium
	$(BIN)/python -m pytest -ra

test-fast: lint chromium
	$(BIN)/python -m pytest -ra -m 'not slow'

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
