# Every target installs what it needs: uv (through pip when absent), the Python
# environment (uv sync, which also brings buf), Go modules (go mod download).
# Targets that need Go: lint (go vet, actionlint), test, gen, gen-check, peer, compat, demo,
# bench. The rest (run, breaking, contract-snapshot) need only Python.
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
# the wire. PROTO_ROOT lets the gate tests point the checks at a copy of proto/.
PROTO_ROOT ?= .
GO_BREAKING_CONFIG := {"version":"v2","modules":[{"path":"proto"}],"breaking":{"use":["PACKAGE"]}}
# breaking-main's baseline: a buf image of the last released contract, committed, and
# refreshed only by a deliberate `make contract-snapshot`.
CONTRACT_SNAPSHOT ?= contract-snapshot.binpb
# A git ref to compare with as well (hosted CI passes a pull request's base commit).
BREAKING_BASE ?=
# Generated code is committed. Python comes from proto/ (buf.gen.yaml), the Go peer's code
# from go-contract/ (its own template), never from proto/.
PY_GENERATED := python/src/junjo_backend/_wire
GO_GENERATED := go-compat-tests/internal/wire
GENERATED := $(PY_GENERATED) $(GO_GENERATED)
GO_GEN_TEMPLATE := go-compat-tests/buf.gen.yaml
WORKFLOWS ?= .github/workflows
# The backend image (python/Dockerfile). BASE_IMAGE empty: a Debian bookworm base made here
# from Debian's packages (python/image/base-image.sh, cached by a hash of its inputs; needs
# root and debootstrap); hosted CI and users: BASE_IMAGE=python:3.12-slim.
BACKEND_IMAGE ?= junjo-backend:local
BASE_IMAGE ?=
# CA certificates the image build's downloads must trust besides the public ones (a
# TLS-intercepting proxy's); the host's local additions by default, often none.
EXTRA_CA_CERTS ?= $(wildcard /usr/local/share/ca-certificates/*.crt)

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

.PHONY: uv
uv:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv

.PHONY: setup
setup: setup-python setup-go ## install the Python environment (with buf) and the Go modules

.PHONY: setup-python
setup-python: uv
	$(UV) sync --project python --locked --quiet

.PHONY: setup-go
setup-go:
	cd go-compat-tests && go mod download
	cd tools && go mod download

.PHONY: gen
gen: setup ## regenerate the committed code: Python (+ .pyi) from proto/, the peer's Go from go-contract/
	rm -rf $(GENERATED)
	$(BUF) generate
	$(BUF) generate $(GO_CONTRACT) --template $(GO_GEN_TEMPLATE)

# Generates into a temporary folder and compares with what is committed (HEAD): a generated
# file that is new, changed or gone fails the check, whatever the reason (a proto edit not
# regenerated, a hand edit, a plugin upgrade). It writes nothing in the working tree; only
# `make gen` does.
.PHONY: gen-check
gen-check: setup ## fail if the committed generated code is not what `make gen` makes
	@git rev-parse --git-dir >/dev/null 2>&1 || { echo "gen-check: not a git checkout; it compares make gen's output with the committed code" >&2; exit 1; }
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(BUF) generate -o "$$tmp/made"; \
	$(BUF) generate $(GO_CONTRACT) --template $(GO_GEN_TEMPLATE) -o "$$tmp/made"; \
	mkdir -p "$$tmp/committed"; \
	git archive HEAD -- $(GENERATED) | tar -x -C "$$tmp/committed"; \
	for side in made committed; do \
		(cd "$$tmp/$$side" && { find $(GENERATED) -type f 2>/dev/null || true; } | LC_ALL=C sort) >"$$tmp/$$side.list"; \
	done; \
	changed=$$( \
		LC_ALL=C comm -13 "$$tmp/committed.list" "$$tmp/made.list" | sed 's/^/?? /'; \
		LC_ALL=C comm -23 "$$tmp/committed.list" "$$tmp/made.list" | sed 's/^/ D /'; \
		LC_ALL=C comm -12 "$$tmp/committed.list" "$$tmp/made.list" | while read -r file; do \
			cmp -s "$$tmp/made/$$file" "$$tmp/committed/$$file" || echo " M $$file"; \
		done); \
	if [[ -n $$changed ]]; then \
		echo "gen-check: the committed generated code is not what make gen makes (?? new, M changed, D gone):" >&2; \
		echo "$$changed" >&2; \
		(cd "$$tmp" && diff -ru committed made | head -n 200) >&2 || true; \
		echo "gen-check: run make gen and commit the result (generated files are never edited by hand)" >&2; \
		exit 1; \
	fi; \
	echo "gen-check: the committed generated code is what make gen makes"

.PHONY: lint
lint: setup actionlint ## buf lint + buf format + ruff + mypy --strict + go vet + actionlint
	$(BUF) lint
	$(BUF) format -d --exit-code
	cd python && $(UV) run --locked --no-sync ruff check .
	cd python && $(UV) run --locked --no-sync ruff format --check .
	cd python && $(UV) run --locked --no-sync mypy
	cd go-compat-tests && go vet ./...

# shellcheck and pyflakes are off: actionlint would use them only where they happen to be
# installed, and a gate must judge the same on every machine.
.PHONY: actionlint
actionlint: setup-go ## lint the hosted CI workflows (actionlint, pinned in tools/go.mod)
	go -C tools tool actionlint -shellcheck= -pyflakes= $(abspath $(wildcard $(WORKFLOWS)/*.yml))
	@echo "actionlint: $(WORKFLOWS) is valid"

.PHONY: breaking
breaking: breaking-go breaking-main ## buf breaking against the Go services' contract and the released contract

.PHONY: breaking-go
breaking-go: setup-python
	cd $(PROTO_ROOT) && $(abspath python/.venv/bin/buf) breaking --against $(abspath $(GO_CONTRACT)) --config '$(GO_BREAKING_CONFIG)'
	@echo "breaking-go: wire- and JSON-compatible with the Go services' contract"

# The live Go repository (needs network: hosted CI). Any buf input works, a local folder
# too (the gate's tests use one). On failure it prints a diff of the upstream protos against
# go-contract/: what changed upstream since the pin.
GO_LIVE_CONTRACT ?= https://github.com/mdrideout/junjo-server.git\#subdir=backend/proto
.PHONY: breaking-go-live
breaking-go-live: setup-python ## buf breaking against the live Go repository's protos
	$(PY) python python/scripts/breaking_live.py --upstream '$(GO_LIVE_CONTRACT)' \
		--pinned $(abspath $(GO_CONTRACT)) --proto-root $(PROTO_ROOT) --config '$(GO_BREAKING_CONFIG)'

# File-level rules (buf.yaml) against the committed snapshot of the last released contract,
# so a break fails however many commits carry it; with BREAKING_BASE, also against that ref.
.PHONY: breaking-main
breaking-main: setup-python ## buf breaking against the released contract snapshot (and BREAKING_BASE)
	@if [[ ! -f '$(abspath $(CONTRACT_SNAPSHOT))' ]]; then \
		echo "breaking-main: no baseline: $(CONTRACT_SNAPSHOT) does not exist. It is the last released contract;" >&2; \
		echo "breaking-main: restore it from git, or make it deliberately with make contract-snapshot" >&2; \
		exit 1; \
	fi
	cd $(PROTO_ROOT) && $(abspath python/.venv/bin/buf) breaking --against '$(abspath $(CONTRACT_SNAPSHOT))'
	@echo "breaking-main: compatible with the released contract ($(CONTRACT_SNAPSHOT))"
ifneq ($(strip $(BREAKING_BASE)),)
	cd $(PROTO_ROOT) && $(abspath python/.venv/bin/buf) breaking --against '.git#ref=$(BREAKING_BASE)'
	@echo "breaking-main: compatible with $(BREAKING_BASE)"
endif

# Only when a release is cut: this moves the baseline breaking-main compares with.
.PHONY: contract-snapshot
contract-snapshot: setup-python ## refresh the released-contract snapshot from proto/ (deliberate, at a release)
	cd $(PROTO_ROOT) && $(abspath python/.venv/bin/buf) build --exclude-source-info -o '$(abspath $(CONTRACT_SNAPSHOT))'
	@echo "contract-snapshot: wrote $(CONTRACT_SNAPSHOT); commit it with the release"

# One pytest process on one event loop (pyproject's session loop scope), as production runs
# one lifespan on one loop per process.
.PHONY: test
test: lint breaking gen-check peer image ## everything CI runs: gates, Go tests, the Python suite with coverage, the demo
	cd go-compat-tests && go test ./...
	rm -f python/.coverage python/.coverage.*
	cd python && $(UV) run --locked --no-sync pytest tests --cov --cov-report=term-missing
	$(PY) python python/scripts/demo.py --check --backend container --peer container

# Bounded (at most 10 minutes here); prints the fault table and writes fault-results/faults.json.
.PHONY: faults
faults: setup-python peer ## the fault suite: real servers and the Go peer under kills, restarts, floods, bad input
	cd python && $(UV) run --locked --no-sync pytest -m faults tests/faults

.PHONY: compat
compat: setup-python ## the cross-language contract suite: the Go ingestion peer in a container
	cd python && $(UV) run --locked --no-sync pytest -m compat tests/compat

.PHONY: peer
peer: setup-go ## build the Go ingestion peer and its tools as static binaries in go-compat-tests/bin
	cd go-compat-tests && CGO_ENABLED=0 go build -trimpath -o bin/ ./cmd/...

# The generated code is committed: running needs neither buf nor Go.
.PHONY: run
# No settings here: the embedded defaults are local ones, and .env (see .env.example) wins.
run: setup-python ## run the backend on embedded defaults (SQLite under data/, auth 127.0.0.1:50053, HTTP 127.0.0.1:1323)
	$(PY) junjo-backend serve

.PHONY: demo
# Options go through ARGS (make would read `--peer binary` itself): make demo ARGS="--peer binary";
# ARGS="--backend container" runs the backend image (make image builds it).
demo: setup-python peer ## the whole loop on this machine: Go peer, backend, API key, OTLP spans, drain
	$(PY) python python/scripts/demo.py $(ARGS)

.PHONY: demo-check
demo-check: setup-python peer image
	$(PY) python python/scripts/demo.py --check --backend container --peer container

# Host networking for the build: its steps download uv and the locked packages. The build
# stage alone sees EXTRA_CA_CERTS; --force-rm: a failed step leaves no container behind.
.PHONY: image
image: ## build the backend image junjo-backend:local (on a Debian base made here unless BASE_IMAGE is set)
	@base='$(BASE_IMAGE)'; \
	if [[ -z $$base ]]; then base=$$(python/image/base-image.sh); fi; \
	echo "image: building $(BACKEND_IMAGE) on $$base"; \
	docker build --quiet --force-rm --network host --build-arg BASE_IMAGE="$$base" \
		--build-arg EXTRA_CA_CERTS="$$(cat /dev/null $(EXTRA_CA_CERTS))" \
		-t '$(BACKEND_IMAGE)' python >/dev/null; \
	echo "image: built $(BACKEND_IMAGE)"

.PHONY: bench
bench: setup-python peer ## benchmarks (bounded); figures printed and written to bench-results/*.json
	$(PY) python python/benchmarks/auth_bench.py
	$(PY) python python/benchmarks/drain_bench.py
	$(PY) python python/benchmarks/span_api_bench.py
	$(PY) python python/benchmarks/store_postgres_bench.py
	$(PY) python python/benchmarks/store_bench.py
