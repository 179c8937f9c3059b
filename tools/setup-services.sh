#!/usr/bin/env bash
# Installs the services the tests start on loopback ports: redis-server (Debian) and the
# s3s-fs S3 server (crates.io), and headless Chromium (Debian) for the viewer's tests. Idempotent: what is already there is left alone.
set -euo pipefail
if ! command -v redis-server >/dev/null; then
  echo "installing redis-server" >&2
  apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
fi
if ! command -v chromium >/dev/null; then
  echo "installing chromium (the viewer's browser tests)" >&2
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
if ! command -v s3s-fs >/dev/null && [ ! -x "$HOME/.cargo/bin/s3s-fs" ]; then
  echo "installing s3s-fs (a few minutes)" >&2
  # Newer versions need a newer rustc than this pin was checked with.
  cargo install -q s3s-fs@0.14.1 --features binary --locked
fi
