#!/usr/bin/env bash
# Builds, when missing, the images of the services that tools/test-images.sh and
# tools/run-chart.py start beside loupe's, from the Debian base of tools/build-images.sh:
#   localhost/loupe-test/redis:trixie     Debian's redis-server (and redis-cli);
#   localhost/loupe-test/s3s-fs:0.14.1    this machine's s3s-fs (tools/setup-services.sh).
# Test fixtures only: the chart's users run their own Redis image and S3.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/tools/images/containers.conf}
BASE=localhost/loupe-base/debian:trixie
REDIS=localhost/loupe-test/redis:trixie S3FS=localhost/loupe-test/s3s-fs:0.14.1
have_image() { [ -n "$(podman images -q "$1" 2>/dev/null)" ]; }
# The base comes with any loupe image; the coordinator's builds quickest.
have_image "$BASE" || tools/build-images.sh coordinator
if ! have_image "$REDIS"; then
  c=$(buildah from "$BASE")
  buildah run --isolation chroot --network host "$c" -- sh -c \
    'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null && rm -rf /var/lib/apt/lists/*'
  buildah commit --quiet "$c" "$REDIS" >/dev/null && buildah rm "$c" >/dev/null
fi
if ! have_image "$S3FS"; then
  tools/setup-services.sh
  c=$(buildah from "$BASE")
  buildah copy --quiet "$c" "$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")" /usr/local/bin/s3s-fs
  buildah config --cmd '' "$c"
  buildah config --entrypoint '["/usr/local/bin/s3s-fs"]' "$c"
  buildah commit --quiet "$c" "$S3FS" >/dev/null && buildah rm "$c" >/dev/null
fi
