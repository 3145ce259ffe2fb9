# One task runner for people and CI. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

.PHONY: install
install: $(STAMP) ## Create .venv and install the gateway with its development tools

.PHONY: run
run: $(STAMP) ## Start the whole gateway on loopback (embedded Postgres, emulator, services, Envoy)
	$(BIN)/authz run --dev

.PHONY: test
test: $(STAMP) ## Run the whole suite: unit, integration and end-to-end
	$(BIN)/pytest -q $(PYTEST_ARGS)

.PHONY: test-unit
test-unit: $(STAMP) ## Unit tests only (no sockets)
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

.PHONY: test-integration
test-integration: $(STAMP) ## Integration tests (real Postgres and in-process servers, no Envoy)
	$(BIN)/pytest -q tests/integration $(PYTEST_ARGS)

.PHONY: test-e2e
test-e2e: $(STAMP) ## End-to-end tests through the real Envoy binary
	$(BIN)/pytest -q tests/e2e $(PYTEST_ARGS)

.PHONY: lint
lint: $(STAMP) ## ruff
	$(BIN)/ruff check authz backends tests

.PHONY: typecheck
typecheck: $(STAMP) ## mypy --strict on the packages
	$(BIN)/mypy

.PHONY: bench
bench: $(STAMP) ## Envoy alone against the full gateway, side by side
	$(BIN)/python -m tests.bench

.PHONY: envoy-examples
envoy-examples: $(STAMP) ## Re-render envoy/*.yaml from tests/fixtures/config
	$(BIN)/python -m authz.envoy_render tests/fixtures/config/example.yaml > envoy/example.yaml
	$(BIN)/python -m authz.envoy_render tests/fixtures/config/dev.yaml > envoy/dev.yaml

.PHONY: clean
clean: ## Remove the virtual environment and run state
	rm -rf $(VENV) .run
