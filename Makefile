# keyd — everything a fresh machine needs is installed from here.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEBS   := softhsm2 wrk systemd chromium
AXE    := .npm/node_modules/axe-core/axe.min.js
AXE_VERSION := 4.10.3

.PHONY: run test test-fast lint bench setup system-packages clean dist install

run: setup            ## sandbox keys, JWKS and local API up on the default config.toml
	$(BIN)/keyd --config config.toml init
	exec $(BIN)/keyd --config config.toml serve

test: setup           ## the whole suite, in parallel
	$(BIN)/pytest -n 2 -q

test-fast: setup      ## all but the tests marked slow (daemons, browsers, processes)
	$(BIN)/pytest -m "not slow" -n 2 -q

lint: setup
	$(BIN)/ruff check keyd tests bench
	$(BIN)/mypy keyd

bench: setup          ## each a ratio against a reference measured in the same run
	$(BIN)/python bench/sign_jws.py
	$(BIN)/python bench/verify_jws.py
	$(BIN)/python bench/decrypt_jwe.py
	$(BIN)/python bench/sign_vault.py
	$(BIN)/python bench/sign_pkcs11.py
	$(BIN)/python bench/cli_startup.py
	$(BIN)/python bench/issuer_isolation.py

dist: setup          ## the sdist and the wheel (built from the sdist) in dist/
	$(BIN)/python -m build --outdir dist .

# From a wheel to the systemd layout (systemd/README.md); as root.  ROOT=DIR
# installs under DIR instead (staging, tests).  WHEEL defaults to the newest in dist/.
WHEEL ?= $(lastword $(sort $(wildcard dist/keyd-*.whl)))
install:
	@test -n "$(WHEEL)" || { echo "no wheel: run make dist first, or give WHEEL=path" >&2; exit 1; }
	sh systemd/install.sh $(if $(ROOT),--root $(ROOT)) $(WHEEL)

setup: system-packages $(STAMP) $(AXE)

# Debian packages the tests and benchmarks use (SoftHSM2 for the HSM backend,
# wrk as the load generator, Chromium for the console's browser tests: Playwright
# drives it and never downloads a browser of its own).  Installed only where missing; needs root.
system-packages:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "install as root: apt-get install$$missing" >&2; exit 1; fi; \
	fi

$(STAMP): pyproject.toml setup.py
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# axe-core, the console tests' accessibility checker, from npm into .npm/ (gitignored).
$(AXE):
	npm install --silent --no-save --no-audit --no-fund --prefix .npm axe-core@$(AXE_VERSION)

clean:
	rm -rf $(VENV) var build dist .npm test-artifacts .pytest_cache .mypy_cache .ruff_cache
