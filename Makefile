# ccwrap-trio: `make demo` runs the server against the real CLI and an offline stand-in API;
# `make test` runs lint, type checks and the whole test suite (the real CLI included).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CLAUDE_CODE_VERSION := 2.1.332
CLAUDE_DIR := .tools/claude
CLAUDE := $(CLAUDE_DIR)/node_modules/.bin/claude
# The openai npm package for the Node client test; npm ci writes this marker.
NODE_CLIENT := tests/clients/node/node_modules/.package-lock.json
# instructor in a virtualenv of its own (its jiter pin conflicts with the tests' openai).
INSTRUCTOR := tests/clients/instructor/.venv/bin/instructor-installed

.PHONY: install demo serve test test-under-load lint bench clean

install: $(BIN)/ccwrap-trio $(CLAUDE) $(NODE_CLIENT) $(INSTRUCTOR) system-packages

$(INSTRUCTOR): tests/clients/instructor/requirements.txt
	$(PYTHON) -m venv tests/clients/instructor/.venv
	tests/clients/instructor/.venv/bin/pip install --quiet -r $<
	touch $@

# Debian's Chromium drives the status page test (tests/test_status_page.py); promtool (Debian's
# prometheus) checks and unit-tests the alert rules (tests/test_deployment_files.py).
.PHONY: system-packages
system-packages:
	@command -v chromium >/dev/null && command -v promtool >/dev/null || { \
		apt-get update -qq && apt-get install -y -qq chromium prometheus >/dev/null; }

$(BIN)/ccwrap-trio: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

# The pinned CLI from npm. Its native binary ships inside the platform package; nothing is
# downloaded at run time. (On Node 20 npm warns about engines: the binary does not use Node.)
$(CLAUDE):
	mkdir -p $(CLAUDE_DIR)
	npm install --prefix $(CLAUDE_DIR) --no-save --no-audit --no-fund --loglevel=error \
		@anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION)
	$(CLAUDE) --version | grep -q '^$(CLAUDE_CODE_VERSION) '

$(NODE_CLIENT): tests/clients/node/package.json tests/clients/node/package-lock.json
	npm ci --prefix tests/clients/node --no-audit --no-fund --loglevel=error

demo: $(BIN)/ccwrap-trio $(CLAUDE)
	CLAUDE_BIN=$(CLAUDE) scripts/demo.sh

# For real use: the CLI on PATH (or CCWRAP_CLAUDE_BIN) with your Claude login.
serve: $(BIN)/ccwrap-trio
	$(BIN)/ccwrap-trio serve

lint: $(BIN)/ccwrap-trio
	$(BIN)/ruff check src tests scripts bench
	$(BIN)/mypy

test: install lint
	CCWRAP_TEST_CLAUDE_BIN=$(CURDIR)/$(CLAUDE) $(BIN)/pytest

# The suite must pass on a loaded machine (CI shares the CPU): two busy loops beside it, until it
# passes three times in a row (at most five runs).
test-under-load: install lint
	@yes > /dev/null & p1=$$!; yes > /dev/null & p2=$$!; trap "kill $$p1 $$p2" EXIT; passed=0; \
	for run in 1 2 3 4 5; do \
		if CCWRAP_TEST_CLAUDE_BIN=$(CURDIR)/$(CLAUDE) $(BIN)/pytest -q; then \
			passed=$$((passed + 1)); echo "under load: run $$run passed ($$passed in a row)"; \
		else passed=0; echo "under load: run $$run FAILED"; fi; \
		[ $$passed -ge 3 ] && exit 0; \
	done; exit 1

# The container image built with podman and run: the CLI version, a completion with
# --network=none, the HEALTHCHECK, the manifests' security settings, SIGTERM while busy,
# `podman kube play`, the manifests against the Kubernetes schemas, compose
# (container/test/run.sh; docs/operations.md, "How the image is tested"). Needs root (apt-get,
# podman); caches in .tools/container.
.PHONY: container-test
container-test:
	container/test/run.sh

# Benchmarks side by side (docs/benchmarks.md); ~10 minutes, --quick for ~2.
bench: install
	$(BIN)/pip install --quiet -c constraints.txt -e '.[bench]'
	$(BIN)/python bench/run.py --chart docs/benchmarks.png

# The peers side by side (bench/peers.py, docs/benchmarks.md "Side by side with the peers"):
# ccproxy in its own virtualenv, never in the project's; ~6 minutes, --quick for ~1 (bench/peers.py --quick).
PEERS_VENV := bench/.peers-venv
PEERS_PY ?= $(PYTHON)

.PHONY: bench-peers-setup bench-peers
bench-peers-setup: $(PEERS_VENV)/bin/ccproxy

$(PEERS_VENV)/bin/ccproxy: bench/peers-requirements.txt
	$(PEERS_PY) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/pip install --quiet -r bench/peers-requirements.txt
	touch $@

bench-peers: $(BIN)/ccwrap-trio $(CLAUDE) bench-peers-setup
	$(BIN)/python bench/peers.py

clean:
	rm -rf $(PEERS_VENV) $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache tests/clients/node/node_modules
