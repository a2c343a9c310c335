# One-command entry points for a fresh machine that has python3 (3.11+) with venv, and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# uv writes the lock files (make lock); installing from them needs only pip.
UV_VERSION := 0.13.9
GATEWAY_CHECK_VENV := $(VENV)/gateway-check

.PHONY: demo test hil bench install lock lock-upgrade check-gateway-lock clean

demo: $(STAMP)
	$(BIN)/kinhbac demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The hardware-in-the-loop suite (docs/hil.md): emulated boards, or real ones with
# PORT=/dev/ttyUSB0 (PORTS="/dev/ttyUSB0 /dev/ttyUSB1" for several) and BENCH=bench.toml.
# JUnit XML and one JSON report per board go to hil-report/.
hil: $(STAMP)
	$(BIN)/python -m pytest hil_tests $(foreach p,$(PORT) $(PORTS),--port $(p)) \
		$(if $(BENCH),--bench $(BENCH)) --junitxml=hil-report/junit.xml $(PYTEST_ARGS)

# Benchmarks need Node.js and npm too (a 32-bit MicroPython for the heap factor).
bench: $(STAMP)
	cd bench && npm ci --silent --no-audit --no-fund
	$(BIN)/python -m bench.run

install: $(STAMP)

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Kinhbac needs Python 3.11 or newer; this is " + sys.version.split()[0])'
	@$(PYTHON) -m venv $(VENV) || { echo "Could not create $(VENV): install python3-venv (apt install python3-venv)"; exit 1; }

# Re-install whenever the lock file or the declared dependencies change. Exactly the locked
# files (--require-hashes), then the project itself, built by the locked setuptools; the check
# fails when pyproject.toml asks for something the lock does not hold (then: make lock).
$(STAMP): pyproject.toml requirements/dev.lock requirements/build.in | $(BIN)/python
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements/dev.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python requirements/locks.py check
	@touch $@

# Write requirements/*.lock again after a change to pyproject.toml (pins still allowed stay);
# lock-upgrade moves every pin to the newest release its range allows.
lock: | $(BIN)/python
	$(BIN)/python -m pip install --quiet 'uv==$(UV_VERSION)'
	$(BIN)/python requirements/locks.py compile --uv $(BIN)/uv

lock-upgrade: | $(BIN)/python
	$(BIN)/python -m pip install --quiet 'uv==$(UV_VERSION)'
	$(BIN)/python requirements/locks.py compile --uv $(BIN)/uv --upgrade

# The Raspberry Pi's install (README), in a throwaway venv: the gateway lock alone runs it.
check-gateway-lock:
	rm -rf $(GATEWAY_CHECK_VENV)
	$(PYTHON) -m venv $(GATEWAY_CHECK_VENV)
	$(GATEWAY_CHECK_VENV)/bin/python -m pip install --quiet --require-hashes --no-deps -r requirements/gateway.lock
	$(GATEWAY_CHECK_VENV)/bin/python -m pip install --quiet --no-deps --no-build-isolation .
	$(GATEWAY_CHECK_VENV)/bin/python -m pip check
	$(GATEWAY_CHECK_VENV)/bin/python -c 'import kinhbac.gateway.daemon'
	$(GATEWAY_CHECK_VENV)/bin/kinhbac gateway settings >/dev/null
	rm -rf $(GATEWAY_CHECK_VENV)

clean:
	rm -rf $(VENV) run .pytest_cache .hypothesis
