# runcap developer and CI entry points. `make` (or `make help`) lists the targets.
#
# Every recipe runs as one bash script with -euo pipefail (.ONESHELL), so a failing
# command anywhere in a recipe fails the target.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.ONESHELL:
.DEFAULT_GOAL := help
# Targets share the venv and the generated files: never run them in parallel.
.NOTPARALLEL:
MAKEFLAGS += --no-print-directory

PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# Rebuilt when pyproject.toml changes; lives inside the venv so `rm -rf .venv` resets it.
VENV_STAMP := $(VENV)/.runcap-installed
GEN_PY := clients/python/runcap/v1
GEN_GO := clients/go/runcap/v1
# TypeScript stubs (buf.gen.ts.yaml); the folder holds nothing hand-written.
GEN_TS := clients/ts/src/gen
# The web dashboard's front end: TypeScript in web/src, compiled by `make dashboard` into
# this folder (committed, shipped in the wheel); the folder holds nothing hand-written.
DASHBOARD_STATIC := server/runcap_server/dashboard/static
# The Go protoc plugins, pinned; `make go-plugins` installs them into .bin/ (gitignored).
# Keep PROTOC_GEN_GO_VERSION equal to google.golang.org/protobuf in clients/go/go.mod.
GO_BIN := $(CURDIR)/.bin
PROTOC_GEN_GO_VERSION := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2
GO_PLUGINS_STAMP := .bin/.go-plugins-$(PROTOC_GEN_GO_VERSION)-$(PROTOC_GEN_GO_GRPC_VERSION)
# Hand-written Python checked by mypy (generated folders are excluded in pyproject).
MYPY_DIRS := server clients/python/runcap tests
# Extension-less Python scripts that ruff would not discover on its own.
PY_SCRIPTS := tools/protoc-gen-grpc_python
# Extra arguments for tools/build_price_table.py, e.g. PRICES_ARGS='--as-of 2026-11-22'.
PRICES_ARGS ?=
# What `make ci` runs, in order.
CI_STEPS := lint breaking check-gen test
# The Python tests take about 8 minutes; past this bound they hung: stop them.
PYTEST_LIMIT ?= 40m
# The git revision `make breaking` compares the protos against.
BREAKING_AGAINST ?= HEAD~1

.PHONY: help venv serve gen check-gen prove-check-gen lint breaking test ci bench prices clean

help: ## Show this help.
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

venv: $(VENV_STAMP) ## Create .venv and install runcap with the dev, litellm and demo extras (re-runs when pyproject.toml changes).

$(VENV_STAMP): pyproject.toml
	@if ! $(VENV)/bin/python -c '' 2>/dev/null; then
	  echo "creating $(VENV) with $(PYTHON)"
	  rm -rf $(VENV)
	  $(PYTHON) -m venv $(VENV)
	  $(VENV)/bin/python -m pip install -q --upgrade pip
	fi
	echo "installing runcap[dev,litellm,demo] into $(VENV)"
	$(VENV)/bin/python -m pip install -q -e '.[dev,litellm,demo]'
	touch $@

serve: venv ## Run the server without authentication (--insecure-dev; settings from RUNCAP_* env; default 127.0.0.1:50051, ./runcap.db).
	exec $(BIN)/runcap serve --insecure-dev

gen: venv go-plugins ts-deps ## Regenerate the committed client stubs from proto/ with buf.
	@echo "removing old generated files in $(GEN_PY) $(GEN_GO)"
	if [ -d $(GEN_PY) ]; then
	  find $(GEN_PY) -maxdepth 1 -type f \( -name '*_pb2*.py' -o -name '*_pb2*.pyi' \) -delete
	fi
	if [ -d $(GEN_GO) ]; then
	  find $(GEN_GO) -maxdepth 1 -type f -name '*.pb.go' -delete
	fi
	PATH="$(BIN):$$PATH" buf generate
	echo "removing old generated files in $(GEN_TS)"
	rm -rf $(GEN_TS)
	PATH="$(BIN):$$PATH" buf generate --template buf.gen.ts.yaml

.PHONY: ts-deps
ts-deps: ## Install clients/ts's pinned npm packages (npm ci) when node_modules is missing or stale.
	@lock=clients/ts/package-lock.json; installed=clients/ts/node_modules/.package-lock.json
	if [ ! -f "$$installed" ] || [ "$$lock" -nt "$$installed" ]; then
	  echo "npm ci in clients/ts"
	  npm ci --prefix clients/ts --no-audit --no-fund
	fi

.PHONY: go-plugins
go-plugins: $(GO_PLUGINS_STAMP) ## Install the pinned protoc-gen-go and protoc-gen-go-grpc into .bin/.

$(GO_PLUGINS_STAMP):
	@echo "installing protoc-gen-go $(PROTOC_GEN_GO_VERSION), protoc-gen-go-grpc $(PROTOC_GEN_GO_GRPC_VERSION) into .bin/"
	rm -f .bin/.go-plugins-*
	GOBIN=$(GO_BIN) go install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
	GOBIN=$(GO_BIN) go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)
	touch $@

prove-check-gen: gen ## Prove check-gen fails on a proto change without regeneration (scratch clone).
	@bash tools/prove_check_gen.sh

check-gen: gen dashboard ## Fail if `make gen` or `make dashboard` changes or adds any generated file.
	@generated=(clients/ $(DASHBOARD_STATIC)/)
	if ! git diff --quiet -- "$${generated[@]}" || [ -n "$$(git status --porcelain -- "$${generated[@]}")" ]; then
	  git status --short -- "$${generated[@]}"
	  git --no-pager diff --stat -- "$${generated[@]}"
	  echo "generated code is out of date: run make gen and make dashboard, and commit" >&2
	  exit 1
	fi
	echo "generated code is up to date"

.PHONY: dashboard web-deps
dashboard: web-deps ## Rebuild the web dashboard's static files (server/runcap_server/dashboard/static) from web/src with tsc.
	@echo "building web/src into $(DASHBOARD_STATIC)"
	rm -rf $(DASHBOARD_STATIC)
	mkdir -p $(DASHBOARD_STATIC)
	npm --prefix web run -s build

web-deps: ## Install web/'s pinned npm packages (npm ci) when node_modules is missing or stale.
	@lock=web/package-lock.json; installed=web/node_modules/.package-lock.json
	if [ ! -f "$$installed" ] || [ "$$lock" -nt "$$installed" ]; then
	  echo "npm ci in web"
	  npm ci --prefix web --no-audit --no-fund
	fi

lint: venv ## buf lint, ruff check, ruff format --check and mypy (all run; fails if any fails).
	@export PATH="$(BIN):$$PATH"
	rc=0
	echo "--- buf lint";           buf lint || rc=1
	echo "--- ruff check";         ruff check . $(PY_SCRIPTS) || rc=1
	echo "--- ruff format --check"; ruff format --check . $(PY_SCRIPTS) || rc=1
	# mypy refuses a directory with no Python files, so pass only those that have some.
	dirs=()
	for d in $(MYPY_DIRS); do
	  if [ -n "$$(find "$$d" -name '*.py' -not -path '$(GEN_PY)/*' -print -quit 2>/dev/null)" ]; then
	    dirs+=("$$d")
	  fi
	done
	echo "--- mypy $${dirs[*]}"
	if [ $${#dirs[@]} -gt 0 ]; then mypy "$${dirs[@]}" || rc=1; fi
	echo "--- go vet (clients/go)"; (cd clients/go && go vet ./...) || rc=1
	echo "--- tsc --strict (clients/ts)"; { $(MAKE) ts-deps && npm --prefix clients/ts run -s typecheck; } || rc=1
	exit $$rc

breaking: venv ## buf breaking against the previous commit (BREAKING_AGAINST=<git rev> to change).
	@against='$(BREAKING_AGAINST)'
	if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
	  echo "breaking: skipped: not a git checkout"; exit 0
	fi
	# CI clones may be shallow: try to fetch the missing history once.
	if ! git rev-parse --verify -q "$$against^{commit}" >/dev/null \
	    && [ "$$(git rev-parse --is-shallow-repository)" = true ]; then
	  echo "breaking: shallow clone, fetching more history"
	  timeout 120 git fetch -q --deepen=50 2>/dev/null || true
	fi
	if ! rev=$$(git rev-parse --verify -q "$$against^{commit}"); then
	  echo "breaking: skipped: $$against is not available (first commit or history not fetched)"
	  exit 0
	fi
	if ! git cat-file -e "$$rev:buf.yaml" 2>/dev/null; then
	  echo "breaking: skipped: $$against ($${rev:0:12}) has no buf.yaml"
	  exit 0
	fi
	echo "breaking: comparing against $$against ($${rev:0:12})"
	PATH="$(BIN):$$PATH" buf breaking --against ".git#ref=$$rev"

test: venv ## Run the test suite (installs Debian's redis-server first when missing and root).
	@if ! command -v redis-server >/dev/null; then
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
	    echo "installing redis-server with apt-get"
	    export DEBIAN_FRONTEND=noninteractive
	    { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; } \
	      || echo "warning: could not install redis-server; tests that need it will fail or skip" >&2
	  else
	    echo "warning: redis-server not on PATH (install it: apt-get install redis-server)" >&2
	  fi
	fi
	echo "--- python tests"
	# A hang ends the run with where it hung (SIGINT: pytest prints it) instead of CI's limit.
	timeout -s INT -k 60 $(PYTEST_LIMIT) $(BIN)/pytest -q -rs || { rc=$$?
	  [ $$rc -lt 124 ] || echo "python tests: stopped after $(PYTEST_LIMIT) (a hang?)" >&2
	  exit $$rc; }
	echo "--- go client tests (clients/go)"
	(cd clients/go && go vet ./... && RUNCAP_PYTHON="$(BIN)/python" go test ./...)
	echo "--- typescript client tests (clients/ts)"
	$(MAKE) ts-deps
	(cd clients/ts && RUNCAP_PYTHON="$(BIN)/python" npm test)
	echo "--- the three conformance drivers against one server on the Redis cluster backend"
	$(BIN)/python tools/with_cluster_server.py -- bash -c \
	  '$(BIN)/pytest -q -p no:cacheprovider tests/conformance -k external \
	   && (cd clients/go && go test -count=1 ./conformance/) \
	   && (cd clients/ts && node --test dist/test/conformance.test.js)'

ci: venv ## Everything CI runs: lint, breaking, check-gen, test (all run; fails if any fails).
	@failed=()
	for step in $(CI_STEPS); do
	  echo "===== make $$step ====="
	  $(MAKE) $$step || failed+=("$$step")
	done
	if [ $${#failed[@]} -gt 0 ]; then echo "===== ci FAILED: $${failed[*]} =====" >&2; exit 1; fi
	echo "===== ci passed ====="

bench: venv ## Run every bench/*.py benchmark (BENCH_QUICK=1: about 20 s each, a smoke run).
	@shopt -s nullglob
	scripts=(bench/*.py)
	if [ $${#scripts[@]} -eq 0 ]; then echo "no benchmarks yet"; exit 0; fi
	for s in "$${scripts[@]}"; do
	  # The benchmarks' shared helpers, not a benchmark.
	  if [ "$$s" = bench/common.py ]; then continue; fi
	  echo "--- $$s"
	  $(BIN)/python "$$s"
	done

# Hostile requests per RPC and backend in `make fuzz` (`make test` runs 25).
FUZZ_EXAMPLES ?= 2000

.PHONY: fuzz
fuzz: venv ## The fuzz suite's long form (tests/fuzz, FUZZ_EXAMPLES=2000 per RPC and backend; about an hour).
	@RUNCAP_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -q -rs -o timeout=0 tests/fuzz

# `make chaos CHAOS=short` is CI's form of the fault suite (under 3 minutes).
CHAOS ?=
# How long `make soak` runs (CI: 60), and where it records its output (empty: print only).
SOAK_SECONDS ?= 600
SOAK_RECORD ?= bench/results/soak.md

.PHONY: chaos soak
chaos: venv ## The fault suite (tests/chaos, not in make test; docs/testing.md). CHAOS=short: CI's form.
	@RUNCAP_CHAOS=$(CHAOS) $(BIN)/pytest -q -rs -m chaos tests/chaos

soak: venv ## The soak: SOAK_SECONDS=600 of mixed load on a Redis cluster, then a hunt for leaks.
	@$(BIN)/python -m tests.chaos.soak --seconds $(SOAK_SECONDS) $(if $(SOAK_RECORD),--record $(SOAK_RECORD))

prices: venv ## Rebuild the committed server/runcap_server/price_table.json (needs PyPI; CI never runs it).
	@$(BIN)/python -m pip install -q -e '.[tools]'
	$(BIN)/python tools/build_price_table.py $(PRICES_ARGS)

clean: ## Remove the venv, caches and build outputs (keeps runcap.db).
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -path ./.git -prune -o -type d \( -name __pycache__ -o -name '*.egg-info' \) \
	  -prune -exec rm -rf {} +
