# One task runner for people and CI. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=
# Outside Python: Debian's chromium (Playwright drives it; never `playwright install`) and
# prometheus (the telemetry tests run every dashboard query against a real one), the test
# IdP's npm packages (tests/idp, the real oidc-provider) and the pinned Claude Code CLI the
# end-to-end tests drive (tests/claude_code; its native binary comes as a platform package from the
# same registry, so the install needs no other download).
CHROMIUM := /usr/bin/chromium
PROMETHEUS := /usr/bin/prometheus
IDP_MODULES := tests/idp/node_modules/.package-lock.json
CLAUDE_CODE_MODULES := tests/claude_code/node_modules/.package-lock.json
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-z][a-z0-9-]*:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@# xds-protos carries an old copy of OpenTelemetry's generated protos under the same package path;
	@# installed after opentelemetry-proto it replaces them (no InstrumentationScope, no scope_spans),
	@# so opentelemetry-proto's own files are put back, at the version the resolver chose.
	$(BIN)/pip install --quiet --force-reinstall --no-deps \
	  "opentelemetry-proto==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	touch $(STAMP)

.PHONY: install
install: $(STAMP) ## Create .venv and install the gateway with its development tools

.PHONY: deps-system
deps-system: $(CHROMIUM) $(PROMETHEUS) $(IDP_MODULES) $(CLAUDE_CODE_MODULES) ## Install Debian's chromium and prometheus, the test IdP and Claude Code (npm) if missing
	@:

$(CHROMIUM):
	@if command -v apt-get >/dev/null 2>&1; then \
	  echo "Installing Debian's chromium for the browser tests"; \
	  $(SUDO) apt-get update -qq >/dev/null && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	else \
	  echo "apt-get not found: skipping chromium; install it at $(CHROMIUM) for the browser tests"; \
	fi

$(PROMETHEUS):
	@if command -v apt-get >/dev/null 2>&1; then \
	  echo "Installing Debian's prometheus for the telemetry tests"; \
	  $(SUDO) apt-get update -qq >/dev/null && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	else \
	  echo "apt-get not found: skipping prometheus; install it at $(PROMETHEUS) for the telemetry tests"; \
	fi

$(IDP_MODULES): tests/idp/package.json tests/idp/package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "npm not found: install Node.js 20 or later for the test IdP"; exit 1; }
	@echo "Installing the test IdP's npm packages (tests/idp)"
	@cd tests/idp && npm ci --no-audit --no-fund --loglevel=error >/dev/null
	@touch $@

$(CLAUDE_CODE_MODULES): tests/claude_code/package.json tests/claude_code/package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "npm not found: install Node.js 20 or later for the Claude Code tests"; exit 1; }
	@echo "Installing the pinned Claude Code CLI for the end-to-end tests (tests/claude_code)"
	@cd tests/claude_code && npm ci --no-audit --no-fund --loglevel=error >/dev/null
	@touch $@

.PHONY: run
run: $(STAMP) $(IDP_MODULES) ## Start the whole gateway on loopback (embedded Postgres, emulator, services, Envoy)
	$(BIN)/python -m authz.dev

.PHONY: test
test: $(STAMP) deps-system ## Run the whole suite: unit, integration and end-to-end
	$(BIN)/pytest -q $(PYTEST_ARGS)

.PHONY: test-unit
test-unit: $(STAMP) ## Unit tests only (no sockets)
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

.PHONY: test-integration
test-integration: $(STAMP) deps-system ## Integration tests (real Postgres and in-process servers, no Envoy)
	$(BIN)/pytest -q tests/integration $(PYTEST_ARGS)

.PHONY: test-e2e
test-e2e: $(STAMP) deps-system ## End-to-end tests through the real Envoy binary
	$(BIN)/pytest -q tests/e2e $(PYTEST_ARGS)

.PHONY: lint
lint: $(STAMP) ## ruff
	$(BIN)/ruff check authz backends tests

.PHONY: typecheck
typecheck: $(STAMP) ## mypy --strict on the packages
	$(BIN)/mypy

.PHONY: bench
bench: $(STAMP) ## Envoy alone against the gateway on a canned upstream (BENCH_ARGS="--smoke", "--help")
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

.PHONY: protos
protos: $(STAMP) ## Compile protos/ into authz/_generated with grpcio-tools
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=authz/_generated --pyi_out=authz/_generated \
	  $$(cd protos && find . -name '*.proto' | sed 's|^\./||')

.PHONY: envoy-examples
envoy-examples: $(STAMP) ## Re-render envoy/*.yaml from tests/fixtures/config
	$(BIN)/python -m authz.envoy.render --skip-file-refs tests/fixtures/config/example.yaml > envoy/example.yaml
	$(BIN)/python -m authz.envoy.render --skip-file-refs tests/fixtures/config/dev.yaml > envoy/dev.yaml

.PHONY: clean
clean: ## Remove the virtual environment and run state
	rm -rf $(VENV) .run
