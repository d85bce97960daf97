# dslaunch developer commands. README and .ci/run call these targets, so they never drift apart.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?=
DEEPSPEED_VERSION := 0.19.8
# Byte-compile the package as a wheel install would: an editable install under
# PYTHONDONTWRITEBYTECODE=1 would otherwise compile every module at every start (~15 ms).
BYTECODE = $(PY) -m compileall -q python/dslaunch

.PHONY: help
help: ## show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# The native host dslaunch execs for a job (rust/src/host.rs), beside the extension it comes with.
# pip builds it through build_host.py; `maturin develop` does not, so build-dev does it here.
HOST_BIN := python/dslaunch/dslaunch-host
define BUILD_HOST
	cargo build -q --release --bin dslaunch-host
	install -m 755 target/release/dslaunch-host $(HOST_BIN)
endef

.PHONY: install
install: $(PY) ## create .venv and install dslaunch (built from source) with its dev/test deps (torch, pytest, ...)
	$(PIP) install -q -e '.[dev]'
	@# DeepSpeed itself, for the tests that run real DeepSpeed training scripts under dslaunch and
	@# under DeepSpeed's own runner. An sdist whose setup.py imports torch: no build isolation, no
	@# prebuilt ops (the tests' CPU collectives are compiled on first use, with ninja).
	$(PIP) install -q packaging ninja hjson py-cpuinfo pydantic tqdm msgpack einops
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation 'deepspeed==$(DEEPSPEED_VERSION)'
	$(BYTECODE)

.PHONY: build-dev
build-dev: $(PY) ## rebuild the Rust extension into .venv after a Rust change (optimised)
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/maturin develop --release
	$(BUILD_HOST)
	$(BYTECODE)

.PHONY: demo
demo: install ## set up, then run the example: 4 ranks of real DDP training over gloo
	$(VENV)/bin/dslaunch --num_gpus 4 examples/train.py

.PHONY: test-rust
test-rust: ## cargo tests (pure-Rust units and real-process tests)
	cargo test

.PHONY: test-python
test-python: ## pytest (real processes); no test collected counts as a failure
	@set +e; $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

.PHONY: test
test: install system-deps test-rust test-python ## set up (dev deps; as root also the multi-node engines) and run every test

.PHONY: lint
lint: ## rustfmt, clippy, ruff, mypy, stubtest
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	$(PY) -m ruff check python tests benches examples build_host.py
	$(PY) -m mypy
	$(PY) -m mypy.stubtest dslaunch._core --allowlist .mypy-stubtest-allowlist

.PHONY: format
format: ## format Rust and Python
	cargo fmt
	$(PY) -m ruff format python tests benches examples

.PHONY: bench
bench: install ## benchmarks against the peers, side by side (sets up .bench-venv; see docs/benchmarks.md)
	bash benches/setup_peers.sh
	$(PY) benches/bench.py $(BENCH_ARGS)

.PHONY: bench-quick
bench-quick: install ## a quick smoke run of the benchmark harness (N<=64, 1 rep; peers used if installed)
	$(PY) benches/bench.py --quick $(BENCH_ARGS)

.PHONY: bench-multinode
bench-multinode: install ## scenario 7: 2 test hosts x 2 ranks over pdsh, dslaunch vs DeepSpeed's runner (root; system-deps)
	bash tests/infra/system-deps.sh
	$(PY) benches/bench_multinode.py $(BENCH_ARGS)

.PHONY: bench-peers
bench-peers: ## set up .bench-venv only: torch, deepspeed==0.19.8, matplotlib, py-spy
	bash benches/setup_peers.sh

# ---- multi-node test engines (tests/infra/, tests/multinode/) ---------------------------------------
# The multi-node tests bring hosts and Slurm up and down themselves; these targets are for working by hand.
IMPI_VENV ?= .impi-venv
HOSTS ?= 2

.PHONY: system-deps
system-deps: ## root, Debian 12: install the multi-node test engines (ssh, pdsh, MPIs, Slurm; Intel MPI into $(IMPI_VENV))
	bash tests/infra/system-deps.sh
	bash tests/infra/impi-venv.sh $(IMPI_VENV)

.PHONY: test-multinode
test-multinode: ## only the multi-node engine tests (root; they start and stop their own hosts and Slurm)
	$(PY) -m pytest tests/multinode $(PYTEST_ARGS)

.PHONY: hosts-up
hosts-up: ## start $(HOSTS) test hosts (network namespaces with sshd) and Slurm on them; then: tests/infra/onhost h1 CMD
	bash tests/infra/hosts-up.sh $(HOSTS)
	bash tests/infra/slurm-up.sh

.PHONY: hosts-down
hosts-down: ## stop Slurm and the test hosts
	bash tests/infra/hosts-down.sh
