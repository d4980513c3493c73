# querygate — every target is .PHONY unless it builds a file; CI calls the same targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
OPA_VERSION ?= v1.22.0
OPA         := bin/opa
# Set OPA_BIN to reuse an opa binary you already have (must be $(OPA_VERSION)).
OPA_BIN     ?=

.PHONY: help
help: ## list targets
	@grep -E '^[a-zA-Z_/-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

.PHONY: venv
venv: $(VENV)/.installed ## create the virtualenv and install querygate with its dev tools

# OPA: a given OPA_BIN, else an opa of the pinned version on PATH, else go install, else the
# release binary. Cached in bin/ so a second run is instant.
$(OPA):
	@mkdir -p bin
	@set -e; \
	if [ -n "$(OPA_BIN)" ] && [ -x "$(OPA_BIN)" ]; then \
	  echo "opa: using $(OPA_BIN)"; cp "$(OPA_BIN)" $@; \
	elif command -v opa >/dev/null && opa version | grep -q "Version: $(OPA_VERSION:v%=%)$$"; then \
	  echo "opa: using $$(command -v opa)"; cp "$$(command -v opa)" $@; \
	elif command -v go >/dev/null; then \
	  echo "opa: building $(OPA_VERSION) with go install (a few minutes the first time)"; \
	  GOBIN=$(CURDIR)/bin GOFLAGS=-buildvcs=false go install github.com/open-policy-agent/opa@$(OPA_VERSION); \
	else \
	  echo "opa: downloading the $(OPA_VERSION) release binary"; \
	  curl -fsSL -o $@ https://openpolicyagent.org/downloads/$(OPA_VERSION)/opa_linux_amd64_static; \
	  chmod +x $@; \
	fi
	@$@ version | head -1

.PHONY: opa
opa: $(OPA) ## obtain the pinned opa binary into bin/

.PHONY: run
run: venv $(OPA) ## start PostgreSQL (embedded, demo data), OPA and the gateway on 127.0.0.1:8080
	$(VENV)/bin/querygate dev --opa-bin $(OPA)

.PHONY: policy-test
policy-test: $(OPA) ## opa fmt, opa check --strict, opa test
	$(OPA) fmt --list --fail rego/
	$(OPA) check --strict rego/
	$(OPA) test rego/ -v

.PHONY: lint
lint: venv ## ruff and mypy
	$(VENV)/bin/ruff check app tests bench
	$(VENV)/bin/mypy

.PHONY: test
test: venv $(OPA) lint policy-test ## install what is needed, lint, and run every test
	QUERYGATE_OPA_BIN=$(CURDIR)/$(OPA) $(VENV)/bin/pytest

.PHONY: bench
bench: venv $(OPA) ## facts (cold/cached), OPA round trip, 1M-row masked NDJSON stream
	QUERYGATE_OPA_BIN=$(CURDIR)/$(OPA) $(PY) bench/facts_bench.py
	QUERYGATE_OPA_BIN=$(CURDIR)/$(OPA) $(PY) bench/opa_decision_bench.py 2000
	QUERYGATE_OPA_BIN=$(CURDIR)/$(OPA) $(PY) bench/stream_bench.py 1000000

.PHONY: clean
clean: ## remove local state (not the OPA build cache)
	rm -rf .querygate .pytest_cache .mypy_cache .ruff_cache
