# pandaguard — two commands on a fresh machine (Rust toolchain + Python 3.11):
#   make run    install what is missing, build in release mode, serve on 0.0.0.0:8080
#   make test   the same setup, then the whole test suite
# Everything fetched is pinned and lives inside this folder (.venv/, models/*.onnx,
# testdata/); a second run re-uses it.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
VENV_PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed
MODEL_FILES := models/efficientnet-lite0.onnx models/efficientnet-lite1.onnx models/efficientnet-lite2.onnx
INT8_FILES := models/efficientnet-lite0-int8.onnx models/efficientnet-lite1-int8.onnx models/efficientnet-lite2-int8.onnx
SAMPLES := testdata/imagenet/labels.csv
BINARY := target/release/pandaguard
PEER_VENV := benches/python_peer/.venv
PEER_STAMP := $(PEER_VENV)/.installed
CARGO ?= cargo

.PHONY: setup models tools nginx browser redis build run test bench lint fmt clean

setup: $(VENV_STAMP) $(MODEL_FILES) $(INT8_FILES) $(SAMPLES)

# Python side: ONNX Runtime (the library the binary loads), the converter's numpy+onnx,
# the model weights and the sample photos. --no-deps: every package is pinned in
# requirements.txt, nothing unpinned gets resolved.
$(VENV_STAMP): requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed (set PYTHON=...)")'
	test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements.txt
	touch $@

# The ONNX files are rebuilt from the pinned weights; --check fails if a file's sha256
# differs from its model card.
$(MODEL_FILES) &: models/convert/convert.py $(VENV_STAMP)
	$(VENV_PY) models/convert/convert.py --check
	touch $(MODEL_FILES)

# Their int8 variants (static QDQ quantization calibrated on images that are not the
# sample photos; models/README.md "int8 variants"), checked against the cards' [int8]
# sha256 the same way. About half a minute for the three.
$(INT8_FILES) &: models/convert/quantize.py models/convert/reference.py $(MODEL_FILES)
	$(VENV_PY) models/convert/quantize.py --check
	touch $(INT8_FILES)

models: $(MODEL_FILES) $(INT8_FILES)

# cmake and nasm build libjpeg-turbo from the turbojpeg crate's bundled source with its
# SIMD code (the JPEG decoder; linked into the binary statically), from Debian's
# packages when missing; through sudo only when not root.
tools:
	@{ command -v cmake && command -v nasm; } >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends cmake nasm; }

# nginx for tests/load_balancer.rs (three replicas behind config/deploy/nginx.conf),
# from Debian's packages when missing; through sudo only when not root. The test runs
# its own nginx in a temporary folder; no system service is configured or started.
nginx:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx; }

# redis-server for tests/query_attacks.rs (replicas sharing one Redis for query-attack
# detection), from Debian's packages when missing; through sudo only when not root. The
# test runs its own redis-server on a free port in a temporary folder; no system
# service is configured or started.
redis:
	@command -v redis-server >/dev/null || test -x /usr/bin/redis-server || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server; }

# Chromium and chromedriver for tests/browser.rs (the web page in a real headless
# browser, driven over WebDriver), from Debian's packages when missing.
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver; }

$(SAMPLES): scripts/fetch_samples.py $(VENV_STAMP)
	$(VENV_PY) scripts/fetch_samples.py --out testdata/imagenet

build: tools
	$(CARGO) build --release --locked

run: setup build
	$(BINARY) serve --config config/default.toml

# The white-box red team's gradients first (parity with ONNX Runtime, finite-difference
# checks: models/gradients/README.md), then every Rust test.
test: setup tools nginx redis browser
	$(VENV_PY) -m unittest models/gradients/test_gradients.py
	$(CARGO) test --release --locked

# The Python peer of the HTTP benchmark (FastAPI + onnxruntime), in a venv of its own.
$(PEER_STAMP): benches/python_peer/requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed (set PYTHON=...)")'
	test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r $<
	touch $@

# In-process inference, then the HTTP load benchmark against the Python peer
# (BENCH_QUICK=1: few requests; BENCH_CONTENTION=1 or both: a busy core beside it).
bench: setup build $(PEER_STAMP)
	$(CARGO) bench --locked --bench throughput
	$(CARGO) bench --locked --bench fingerprint
	$(CARGO) bench --locked --bench int8
	$(CARGO) bench --locked --bench http_load

lint: tools
	$(CARGO) fmt --check
	$(CARGO) clippy --release --locked --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

clean:
	rm -rf target $(VENV) $(PEER_VENV) $(MODEL_FILES) testdata
