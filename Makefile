# Set-up and everyday commands. Each target does all the set-up it needs, so on a fresh
# machine `make demo` and `make test` work as the first command.

LOUPE := target/release/loupe
export CARGO_TERM_COLOR ?= never

.PHONY: setup setup-test build services demo test bench-cpu fixtures

# The project-local venv: libtorch for `make demo`; with --test, what the tests and
# tools/export.py use as well (see tools/setup-venv.sh).
setup:
	tools/setup-venv.sh

setup-test:
	tools/setup-venv.sh --test

build: setup
	cargo build --release --bin loupe

# Redis and the S3 server, which the cluster tests start on loopback ports.
services:
	tools/setup-services.sh

# Renders the demo model's complete atlas (every layer, every unit) on the CPU.
demo: build
	$(LOUPE) render --model models/demo/demo.pt --out atlas/demo --size 64 --device cpu \
	  --dataset tests/fixtures/dataset/images --examples 4
	@echo "demo atlas: $(CURDIR)/atlas/demo; to browse it: $(LOUPE) serve atlas/demo"

# Everything the README's test command runs. The end-to-end tests run the binaries.
test: setup-test services
	cargo build --release --bins
	cargo test --release --workspace
	.venv/bin/python -m pytest -q tests/python
	LOUPE_VIEWER_SERVE='target/release/loupe serve {dir} --listen 127.0.0.1:{port}' \
	  .venv/bin/python -m pytest -q tests/browser
	tools/check-chart.sh

bench-cpu: build
	bench/cpu.sh

# Regenerates the committed models (demo and test fixtures).
fixtures: setup-test
	.venv/bin/python tools/make_demo_model.py
	.venv/bin/python tools/make_test_models.py
