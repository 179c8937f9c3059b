# Set-up and everyday commands. Each target does all the set-up it needs, so on a fresh
# machine `make demo` and `make test` work as the first command.

LOUPE := target/release/loupe
export CARGO_TERM_COLOR ?= never

.PHONY: setup setup-test build services demo test bench-cpu fixtures images test-images test-chart-containers

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

# The coordinator, worker and CLI container images, built here with buildah on a Debian
# base bootstrapped from the mirror, no registry (deploy/README.md); prints their sizes.
images:
	tools/build-images.sh

# The images end to end: services, coordinator and workers as containers, a worker killed
# mid-job, the atlas compared with a local render. Builds the images when missing. Not in
# `make test`: building the images takes longer than the rest of CI (deploy/README.md).
test-images:
	tools/test-images.sh

# The Helm chart's pods as podman containers: helm template with the local images, each
# container started as rendered (env, Secrets, volumes, securityContext, Service names as
# network aliases) and probed as the kubelet would. Builds the images when missing.
test-chart-containers:
	tools/setup-k8s-tools.sh
	[ -n "$$(CONTAINERS_CONF=tools/images/containers.conf podman images -q localhost/loupe-worker)" ] || tools/build-images.sh
	tools/images/test-services.sh
	.tools/venv/bin/python tools/run-chart.py

bench-cpu: build
	bench/cpu.sh

# Regenerates the committed models (demo and test fixtures).
fixtures: setup-test
	.venv/bin/python tools/make_demo_model.py
	.venv/bin/python tools/make_test_models.py
