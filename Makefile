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
# Deployment and policy-author tools, built once into bin/ with the machine's Go.
KUSTOMIZE_VERSION ?= v5.8.2
KUSTOMIZE   := bin/kustomize
# Regal's version is pinned in tools/regal/go.mod (v0.39.0).
REGAL       := bin/regal
POLICY_DIRS := rego/ deploy/policy/
# `make policy-test` fails when `opa test --coverage` of a policy directory is lower.
POLICY_COVERAGE_MIN ?= 90
# `make bundle`: BUNDLE_SIGNING_KEY is a PEM private key (RS256); without one a dev key is
# generated in $(BUNDLE_DIR) (gitignored). docs/policies.md says how production keys work.
BUNDLE_DIR  ?= .querygate/bundle
BUNDLE_SIGNING_KEY ?=

.PHONY: help
help: ## list targets
	@grep -E '^[a-zA-Z_/-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

# Every environment is installed from a lock file with hashes (`make lock` writes them from
# pyproject.toml): requirements.lock is the image's (runtime only), requirements-run.lock
# `make run`'s (runtime and the embedded PostgreSQL), requirements-dev.lock the tests'.
LOCKS       := requirements.lock requirements-run.lock requirements-dev.lock
UV_VERSION  ?= 0.13.9
CYCLONEDX_VERSION ?= 7.5.0
UV_COMPILE  = $(VENV)/bin/uv pip compile pyproject.toml -q --universal --python-version 3.11 \
              --generate-hashes --custom-compile-command "make lock"

$(VENV)/.installed: pyproject.toml requirements-dev.lock
	@echo "venv: installing the locked test environment (requirements-dev.lock) into $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --require-hashes -r requirements-dev.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@ $(VENV)/.runtime

# `make run` needs the runtime only: a venv that has the test tools has it too.
$(VENV)/.runtime: pyproject.toml requirements-run.lock
	@echo "run [1/3]: creating $(VENV) and installing querygate's runtime (requirements-run.lock; a minute or two the first time)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --progress-bar off --require-hashes -r requirements-run.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

.PHONY: venv
venv: $(VENV)/.installed ## create the virtualenv and install querygate with its dev tools (locked)

.PHONY: lock
lock: venv ## re-resolve the lock files and the SBOM from pyproject.toml (existing pins kept where they still fit)
	$(PY) -m pip install --quiet "uv==$(UV_VERSION)" "cyclonedx-bom==$(CYCLONEDX_VERSION)"
	@# The test environment first; the others are held to its versions, so every lock agrees.
	$(UV_COMPILE) --extra dev -o requirements-dev.lock
	$(UV_COMPILE) -c requirements-dev.lock -o requirements.lock
	$(UV_COMPILE) -c requirements-dev.lock --extra embedded -o requirements-run.lock
	$(MAKE) --no-print-directory sbom

# The image's software bill of materials, from its lock file (CycloneDX 1.6 JSON);
# tests/deploy/test_supply_chain.py fails when it no longer matches requirements.lock.
.PHONY: sbom
sbom: venv ## write sbom.cdx.json (CycloneDX) from requirements.lock
	$(PY) -m pip install --quiet "cyclonedx-bom==$(CYCLONEDX_VERSION)"
	$(VENV)/bin/cyclonedx-py requirements requirements.lock --pyproject pyproject.toml --output-reproducible --of JSON -o sbom.cdx.json 2>/dev/null

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
	  os=$$(uname -s | tr A-Z a-z); arch=$$(uname -m); \
	  case "$$arch" in x86_64|amd64) arch=amd64;; aarch64|arm64) arch=arm64;; \
	    *) echo "opa: no release binary for $$os/$$arch; install Go or pass OPA_BIN"; exit 1;; esac; \
	  case "$$os" in linux) name=opa_linux_$${arch}_static;; darwin) name=opa_darwin_$$arch;; \
	    *) echo "opa: no release binary for $$os; install Go or pass OPA_BIN"; exit 1;; esac; \
	  url=https://openpolicyagent.org/downloads/$(OPA_VERSION)/$$name; \
	  echo "opa: downloading the $(OPA_VERSION) release binary $$name and checking its SHA-256"; \
	  curl -fsSL -o $@.download $$url; \
	  want=$$(curl -fsSL $$url.sha256 | awk '{print $$1}'); \
	  have=$$( (sha256sum $@.download 2>/dev/null || shasum -a 256 $@.download) | awk '{print $$1}'); \
	  if [ -z "$$want" ] || [ "$$want" != "$$have" ]; then \
	    rm -f $@.download; echo "opa: checksum mismatch for $$name (want $$want, got $$have)"; exit 1; \
	  fi; \
	  chmod +x $@.download; mv $@.download $@; \
	fi
	@$@ version | head -1

.PHONY: opa
opa: $(OPA) ## obtain the pinned opa binary into bin/

# Apache Kafka for the audit tests (a KRaft node run with the machine's Java 17+): the broker's
# jars from Maven Central, version pinned in tools/kafka/pom.xml, cached per version in
# .tools/kafka/<version>/libs so a second run is instant. The test fixture runs this too.
KAFKA_VERSION := $(shell sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' tools/kafka/pom.xml)
KAFKA_LIBS    := .tools/kafka/$(KAFKA_VERSION)/libs

$(KAFKA_LIBS)/.complete: tools/kafka/pom.xml | jdk
	@echo "kafka: copying Apache Kafka $(KAFKA_VERSION) and its dependencies from Maven Central into $(KAFKA_LIBS)"
	@rm -rf $(KAFKA_LIBS)
	mvn -q -B --no-transfer-progress -Dstyle.color=never -f tools/kafka/pom.xml dependency:copy-dependencies \
	  -DincludeScope=runtime -DoutputDirectory=$(CURDIR)/$(KAFKA_LIBS)
	@touch $@

.PHONY: kafka
kafka: $(KAFKA_LIBS)/.complete ## obtain the pinned Apache Kafka broker (jars from Maven Central) into .tools/kafka/

# Java 17 and Maven (Debian's packages) for the Kafka broker and the pgjdbc client test.
.PHONY: jdk
jdk: ## install a JDK 17 and Maven from Debian's packages when they are missing
	@command -v javac >/dev/null && command -v mvn >/dev/null || { \
	  echo "jdk: installing Debian's openjdk-17-jdk-headless and maven"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get install -y -qq openjdk-17-jdk-headless maven >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq openjdk-17-jdk-headless maven; }; }
	@command -v javac >/dev/null && command -v mvn >/dev/null || { echo "jdk: could not be installed (apt-get install openjdk-17-jdk-headless maven)"; exit 1; }

# PostgreSQL's JDBC driver for the wire-protocol client test: the driver's jar from Maven Central,
# version pinned in tools/pgjdbc/pom.xml, and tools/pgjdbc/PgjdbcClient.java compiled against it,
# cached per version in .tools/pgjdbc/<version>/, the classes per version of the source (its
# SHA-256: checkouts that share .tools never run one another's). The test runs it too.
PGJDBC_VERSION := $(shell sed -n 's:.*<pgjdbc.version>\(.*\)</pgjdbc.version>.*:\1:p' tools/pgjdbc/pom.xml)
PGJDBC_DIR     := .tools/pgjdbc/$(PGJDBC_VERSION)
PGJDBC_CLASSES := $(PGJDBC_DIR)/classes-$(shell sha256sum tools/pgjdbc/PgjdbcClient.java | cut -c1-12)

$(PGJDBC_DIR)/libs/.complete: tools/pgjdbc/pom.xml | jdk
	@echo "pgjdbc: copying the PostgreSQL JDBC driver $(PGJDBC_VERSION) from Maven Central into $(PGJDBC_DIR)/libs"
	@rm -rf $(PGJDBC_DIR)/libs
	mvn -q -B --no-transfer-progress -Dstyle.color=never -f tools/pgjdbc/pom.xml dependency:copy-dependencies \
	  -DincludeScope=runtime -DoutputDirectory=$(CURDIR)/$(PGJDBC_DIR)/libs
	@touch $@

$(PGJDBC_CLASSES)/PgjdbcClient.class: tools/pgjdbc/PgjdbcClient.java $(PGJDBC_DIR)/libs/.complete
	@mkdir -p $(PGJDBC_CLASSES)
	javac -Xlint:all -Werror -d $(PGJDBC_CLASSES) -cp '$(PGJDBC_DIR)/libs/*' $<

.PHONY: pgjdbc
pgjdbc: $(PGJDBC_CLASSES)/PgjdbcClient.class ## obtain pgjdbc into .tools/pgjdbc/ and compile the client test's Java program

# psql and pgbench (Debian's postgresql-client) for the wire-protocol client tests.
.PHONY: pg-client
pg-client: ## install psql and pgbench from Debian's packages when they are missing
	@psql --version >/dev/null 2>&1 && pgbench --version >/dev/null 2>&1 || { \
	  echo "pg-client: installing Debian's postgresql-client"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get install -y -qq postgresql-client >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq postgresql-client; }; }
	@psql --version >/dev/null 2>&1 && pgbench --version >/dev/null 2>&1 || { echo "pg-client: could not be installed (apt-get install postgresql-client)"; exit 1; }

# The stamp names the version, so changing KUSTOMIZE_VERSION rebuilds and a second run is instant.
bin/.kustomize-$(KUSTOMIZE_VERSION):
	@mkdir -p bin
	@command -v go >/dev/null || { echo "kustomize: Go is needed to build $(KUSTOMIZE_VERSION)"; exit 1; }
	@echo "kustomize: building $(KUSTOMIZE_VERSION) with go install (a few minutes the first time)"
	GOBIN=$(CURDIR)/bin GOFLAGS=-buildvcs=false go install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION)
	@rm -f bin/.kustomize-*; touch $@

$(KUSTOMIZE): bin/.kustomize-$(KUSTOMIZE_VERSION)

.PHONY: kustomize
kustomize: $(KUSTOMIZE) ## obtain the pinned kustomize into bin/

$(REGAL): tools/regal/go.mod tools/regal/go.sum
	@mkdir -p bin
	@command -v go >/dev/null || { echo "regal: Go is needed to build it"; exit 1; }
	@echo "regal: building the version pinned in tools/regal/go.mod (a few minutes the first time)"
	cd tools/regal && GOFLAGS=-buildvcs=false go build -o $(CURDIR)/$@ \
	  -ldflags "-X github.com/open-policy-agent/regal/pkg/version.Version=$$(go list -m -f '{{.Version}}' github.com/open-policy-agent/regal)" \
	  github.com/open-policy-agent/regal
	@$@ version | head -1

.PHONY: regal
regal: $(REGAL) ## obtain the pinned Regal (Rego linter) into bin/

.PHONY: run
run: $(VENV)/.runtime ## start PostgreSQL (embedded, demo data), OPA and the gateway on 127.0.0.1:8080
	@[ -x $(OPA) ] || echo "run [2/3]: obtaining OPA $(OPA_VERSION) into bin/ (a few minutes the first time, with go install)"
	@$(MAKE) --no-print-directory $(OPA)
	@echo "run [3/3]: starting PostgreSQL, OPA and the gateway"
	$(VENV)/bin/querygate dev --opa-bin $(OPA)

.PHONY: policy-test
policy-test: $(OPA) $(REGAL) ## opa fmt, opa check --strict, opa test (coverage ≥ POLICY_COVERAGE_MIN%), regal lint
	$(OPA) fmt --list --fail $(POLICY_DIRS)
	$(OPA) check --strict $(POLICY_DIRS)
	$(OPA) test $(POLICY_DIRS) -v
	@mkdir -p .querygate
	@set -e; for dir in $(POLICY_DIRS); do \
	  $(OPA) test "$$dir" --coverage --threshold $(POLICY_COVERAGE_MIN) > .querygate/coverage.json; \
	  $(PYTHON) -c 'import json,sys; print("coverage %s: %.1f%% (minimum %s%%)" % (sys.argv[1], json.load(open(sys.argv[2]))["coverage"], sys.argv[3]))' "$$dir" .querygate/coverage.json $(POLICY_COVERAGE_MIN); \
	done
	$(REGAL) lint $(POLICY_DIRS)

.PHONY: bundle
bundle: $(OPA) ## signed policy bundle of rego/ in $(BUNDLE_DIR) (BUNDLE_SIGNING_KEY=key.pem, else a dev key)
	@set -euo pipefail; mkdir -p $(BUNDLE_DIR); \
	key="$(BUNDLE_SIGNING_KEY)"; \
	if [ -z "$$key" ]; then \
	  key=$(BUNDLE_DIR)/dev-signing-key.pem; \
	  if [ ! -f "$$key" ]; then \
	    (umask 077; openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:3072 -out "$$key" 2>/dev/null); \
	  fi; \
	  echo "bundle: signing with the DEV key $$key — never ship it to production"; \
	fi; \
	openssl pkey -in "$$key" -pubout -out $(BUNDLE_DIR)/verification-key.pem; \
	rev=$$(git rev-parse HEAD 2>/dev/null || echo unknown); \
	if [ -n "$$(git status --porcelain -- rego/ 2>/dev/null)" ]; then \
	  rev="$$rev-dirty-$$(find rego -type f ! -name '*_test.rego' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-12)"; fi; \
	$(OPA) build --bundle rego/ --ignore '*_test.rego' --revision "$$rev" \
	  --signing-key "$$key" --signing-alg RS256 -o $(BUNDLE_DIR)/querygate.tar.gz; \
	echo "bundle: $(BUNDLE_DIR)/querygate.tar.gz (revision $$rev), verify with $(BUNDLE_DIR)/verification-key.pem"

.PHONY: manifests
manifests: venv $(OPA) $(KUSTOMIZE) ## render every kustomize layout, validate it offline, check it with deploy/policy/
	QUERYGATE_OPA_BIN=$(CURDIR)/$(OPA) QUERYGATE_KUSTOMIZE_BIN=$(CURDIR)/$(KUSTOMIZE) $(VENV)/bin/pytest tests/deploy -q

.PHONY: lint
lint: venv ## ruff and mypy
	$(VENV)/bin/ruff check app tests bench querygate_client
	$(VENV)/bin/mypy

.PHONY: test
test: test-banner venv $(OPA) $(KUSTOMIZE) kafka pgjdbc pg-client wrk browser lint policy-test ## install what is needed, lint, and run every test (manifests included)
	QUERYGATE_OPA_BIN=$(CURDIR)/$(OPA) QUERYGATE_KUSTOMIZE_BIN=$(CURDIR)/$(KUSTOMIZE) $(VENV)/bin/pytest

.PHONY: test-banner
test-banner:
	@if [ -x $(OPA) ] && [ -f $(VENV)/.installed ] && [ -d .tools/kafka ]; then \
	  echo "make test: the tools are in place; the tests take about 8 minutes on 2 cores"; \
	else \
	  echo "make test: first run: building OPA, kustomize and Regal with Go and fetching Kafka, pgjdbc and Debian packages (about 10 minutes), then about 8 minutes of tests"; \
	fi

.PHONY: test-unit
test-unit: venv ## the unit tests only: no database, OPA or broker (well under a minute)
	$(VENV)/bin/pytest tests/unit -q

# Debian's chromium and chromedriver for the console's browser tests (tests/browser): passed
# by path, so Selenium never downloads a browser or a driver.
.PHONY: browser
browser: ## install Debian's chromium and chromium-driver (headless browser tests) when missing
	@[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || { \
	  echo "browser: installing Debian's chromium and chromium-driver"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver; }; }
	@[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || { echo "browser: could not be installed (apt-get install chromium chromium-driver)"; exit 1; }

# wrk (Debian's package) generates the HTTP load of `make bench` and of its smoke test.
.PHONY: wrk
wrk: ## install the wrk load generator from Debian's packages when it is missing
	@command -v wrk >/dev/null || { \
	  echo "wrk: installing Debian's package"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get install -y -qq wrk >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq wrk; }; }
	@command -v wrk >/dev/null || { echo "wrk: could not be installed (apt-get install wrk)"; exit 1; }

# BENCH_ARGS, e.g. BENCH_ARGS="--duration 20": see `.venv/bin/python -m bench.load_bench -h`.
BENCH_ARGS ?=
# PGWIRE_BENCH_ARGS, e.g. "--clients 8 --duration 10 --rounds 2" (bench/pgwire_bench.py).
PGWIRE_BENCH_ARGS ?=
# CONSOLE_BENCH_ARGS, e.g. "--events 20000 --requests 50" (bench/console_bench.py).
CONSOLE_BENCH_ARGS ?=
.PHONY: bench
bench: venv $(OPA) wrk pgbouncer ## direct vs passthrough vs querygate under load, 1M-row stream, the wire protocol vs PgBouncer, the console's pages over 100k events
	QUERYGATE_OPA_BIN=$(CURDIR)/$(OPA) $(PY) -m bench.load_bench $(BENCH_ARGS)
	QUERYGATE_OPA_BIN=$(CURDIR)/$(OPA) $(PY) -m bench.pgwire_bench $(PGWIRE_BENCH_ARGS)
	QUERYGATE_OPA_BIN=$(CURDIR)/$(OPA) $(PY) -m bench.console_bench $(CONSOLE_BENCH_ARGS)

.PHONY: pgbouncer
pgbouncer: ## install Debian's PgBouncer (the wire-protocol benchmark's comparison) when missing
	@command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || { \
	  echo "pgbouncer: installing Debian's package"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get install -y -qq pgbouncer >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq pgbouncer; }; }

.PHONY: clean
clean: ## remove local state (not the OPA build cache)
	rm -rf .querygate .pytest_cache .mypy_cache .ruff_cache
