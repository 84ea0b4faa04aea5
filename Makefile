# Every target installs what it needs: uv (through pip when absent), the Python
# environment (uv sync, which also brings buf), Go modules (go mod download).
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
PY := $(UV) run --project python --locked --no-sync
BUF := $(PY) buf
GO_CONTRACT := go-compat-tests/go-contract
# buf breaking against the Go services: the PACKAGE rules, which compare by package and
# not by file path (our file layout differs from Go's on purpose). WIRE_JSON alone is not
# enough for gRPC: it lets a package, service or RPC vanish, and those are method paths on
# the wire. PROTO_ROOT lets the gate tests point the check at a copy of proto/.
PROTO_ROOT ?= .
GO_BREAKING_CONFIG := {"version":"v2","modules":[{"path":"proto"}],"breaking":{"use":["PACKAGE"]}}
# buf breaking against our own main: file-level rules (buf.yaml).
BREAKING_AGAINST ?= .git\#branch=main
GENERATED := python/src/junjo_backend/_wire go-compat-tests/internal/wire

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

.PHONY: uv
uv:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv

.PHONY: setup
setup: uv ## install the Python environment (with buf) and the Go modules
	$(UV) sync --project python --locked --quiet
	cd go-compat-tests && go mod download

.PHONY: gen
gen: setup ## generate Python (+ .pyi) and Go code from proto/
	rm -rf $(GENERATED)
	$(BUF) generate

.PHONY: gen-check
gen-check: gen ## fail if generation is not deterministic
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	for d in $(GENERATED); do mkdir -p "$$tmp/$$d"; cp -a "$$d/." "$$tmp/$$d/"; done; \
	rm -rf $(GENERATED); $(BUF) generate; \
	for d in $(GENERATED); do diff -r "$$tmp/$$d" "$$d" || { echo "make gen is not deterministic: $$d differs between two runs"; exit 1; }; done; \
	echo "gen-check: two runs of buf generate agree"

.PHONY: lint
lint: gen ## buf lint + buf format + ruff + mypy --strict + go vet
	$(BUF) lint
	$(BUF) format -d --exit-code
	cd python && $(UV) run --locked --no-sync ruff check .
	cd python && $(UV) run --locked --no-sync ruff format --check .
	cd python && $(UV) run --locked --no-sync mypy
	cd go-compat-tests && go vet ./...

.PHONY: breaking
breaking: breaking-go breaking-main ## buf breaking against the Go services' contract and against our main

.PHONY: breaking-go
breaking-go: setup
	cd $(PROTO_ROOT) && $(abspath python/.venv/bin/buf) breaking --against $(abspath $(GO_CONTRACT)) --config '$(GO_BREAKING_CONFIG)'
	@echo "breaking-go: wire- and JSON-compatible with the Go services' contract"

# The live Go repository, for hosted CI with network access (this project's machines have none).
GO_LIVE_CONTRACT ?= https://github.com/mdrideout/junjo-server.git\#subdir=backend/proto
.PHONY: breaking-go-live
breaking-go-live: setup
	$(BUF) breaking --against '$(GO_LIVE_CONTRACT)' --config '$(GO_BREAKING_CONFIG)'

.PHONY: breaking-main
breaking-main: setup
	@if git rev-parse --verify --quiet main >/dev/null; then \
		$(BUF) breaking --against '$(BREAKING_AGAINST)' && echo "breaking-main: compatible with main"; \
	else echo "breaking-main: no main branch in this clone, nothing to compare against"; fi

# pytest runs as two processes with one coverage total. The app tests run whole lifespans
# on per-test event loops; when what they left behind was garbage-collected during a later
# test's loop, the process crashed (SIGSEGV, about 1 run in 3). tests/app/conftest.py now
# collects after each app test (0 crashes in 24 runs since); the native fault itself is not
# traced, so the app tests keep a process of their own, as production has one lifespan per
# process.
.PHONY: test
test: lint breaking gen-check peer ## everything CI runs: gates, Go tests, the Python suite with coverage, the demo
	cd go-compat-tests && go test ./...
	rm -f python/.coverage python/.coverage.*
	cd python && $(UV) run --locked --no-sync pytest tests/app --cov --cov-report= --cov-fail-under=0
	cd python && $(UV) run --locked --no-sync pytest tests --ignore=tests/app --cov --cov-append --cov-report=term-missing
	$(PY) python python/scripts/demo.py --check

# Bounded (at most 10 minutes here); prints the fault table and writes fault-results/faults.json.
.PHONY: faults
faults: gen peer ## the fault suite: real servers and the Go peer under kills, restarts, floods, bad input
	cd python && $(UV) run --locked --no-sync pytest -m faults tests/faults

.PHONY: compat
compat: gen ## the cross-language contract suite: the Go ingestion peer in a container
	cd python && $(UV) run --locked --no-sync pytest -m compat tests/compat

.PHONY: peer
peer: gen ## build the Go ingestion peer and its tools as static binaries in go-compat-tests/bin
	cd go-compat-tests && CGO_ENABLED=0 go build -trimpath -o bin/ ./cmd/...

.PHONY: run
# No settings here: the embedded defaults are local ones, and .env (see .env.example) wins.
run: gen ## run the backend on embedded defaults (SQLite under data/, auth 127.0.0.1:50053, HTTP 127.0.0.1:1323)
	$(PY) junjo-backend serve

.PHONY: demo
# Options go through ARGS (make would read `--peer binary` itself): make demo ARGS="--peer binary"
demo: gen peer ## the whole loop on this machine: Go peer, backend, API key, OTLP spans, drain
	$(PY) python python/scripts/demo.py $(ARGS)

.PHONY: demo-check
demo-check: gen peer
	$(PY) python python/scripts/demo.py --check

.PHONY: bench
bench: gen peer ## benchmarks (bounded); figures printed and written to bench-results/*.json
	$(PY) python python/benchmarks/auth_bench.py
	$(PY) python python/benchmarks/drain_bench.py
