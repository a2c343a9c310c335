# One-command entry points for a fresh machine that has python3 (3.11+) with venv, and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench install clean

demo: $(STAMP)
	$(BIN)/kinhbac demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Benchmarks need Node.js and npm too (a 32-bit MicroPython for the heap factor).
bench: $(STAMP)
	cd bench && npm ci --silent --no-audit --no-fund
	$(BIN)/python -m bench.run

install: $(STAMP)

# Re-install whenever the declared dependencies change.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Kinhbac needs Python 3.11 or newer; this is " + sys.version.split()[0])'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { echo "Could not create $(VENV): install python3-venv (apt install python3-venv)"; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all,test]'
	@touch $@

clean:
	rm -rf $(VENV) run .pytest_cache .hypothesis
