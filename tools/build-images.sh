#!/usr/bin/env bash
# Builds the coordinator, worker and CLI images from this repository with buildah, on a
# Debian base bootstrapped here from the Debian mirror: no registry is needed. Prints
# each image's size at the end.
#
#   tools/build-images.sh [coordinator] [worker] [cli]     (default: all three)
#
# The images are localhost/loupe-coordinator, localhost/loupe-worker and localhost/loupe,
# tagged with the chart's appVersion. The Dockerfiles are the ones `docker build` uses
# where a registry is reachable; this script only sets their build arguments:
#   RUST_IMAGE    a builder made here: the base, a C++ compiler, Python and this machine's
#                 Rust toolchain (no Rust image can be pulled);
#   DEBIAN_IMAGE  the bootstrapped base;
#   TORCH_INDEX   PyPI, whose torch 2.11.0 for Linux x86_64 is the CUDA 13.0 build.
# Builds reach crates.io and PyPI through the host's network and trust the host's CA
# bundle (HOST_CA, mounted over the builder's for the RUN steps only): where HTTPS goes
# through an inspecting proxy, its CA is in that bundle and nowhere in the images.
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/tools/images/containers.conf}
SUITE=trixie
BASE=localhost/loupe-base/debian:$SUITE
RUST_VERSION=$(rustc --version | cut -d' ' -f2)
RUST=localhost/loupe-base/rust:$RUST_VERSION-$SUITE
TAG=${TAG:-$(sed -n 's/^appVersion: "\(.*\)"/\1/p' helm/loupe/Chart.yaml)}
HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
TORCH_INDEX=${TORCH_INDEX:-https://pypi.org/simple}

# netavark sets up bridge networks with iptables, which a minimal host may lack.
if ! command -v buildah >/dev/null || ! command -v mmdebstrap >/dev/null || ! command -v podman >/dev/null \
    || ! command -v iptables >/dev/null; then
  echo "installing mmdebstrap, buildah, podman, iptables (Debian)" >&2
  apt-get update -qq
  apt-get install -y -qq mmdebstrap buildah podman runc netavark aardvark-dns uidmap iptables >/dev/null
fi

have_image() { [ -n "$(buildah images -q "$1" 2>/dev/null)" ]; }

if ! have_image "$BASE"; then
  echo "bootstrapping $BASE (mmdebstrap, about a minute)" >&2
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  # What the debian:SUITE-slim image does: no recommended packages, no apt caches kept
  # in a layer, no manuals, documentation (but the copyright files) or translations.
  mmdebstrap --quiet --variant=apt --include=passwd,ca-certificates \
    --aptopt='APT::Install-Recommends "false"' \
    --aptopt='Dir::Cache::pkgcache ""' --aptopt='Dir::Cache::srcpkgcache ""' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    "$SUITE" "$rootfs/rootfs.tar"
  c=$(buildah from scratch)
  buildah add --quiet "$c" "$rootfs/rootfs.tar" /
  buildah config --cmd /bin/bash "$c"
  buildah commit --quiet "$c" "$BASE" >/dev/null
  buildah rm "$c" >/dev/null
fi

if ! have_image "$RUST"; then
  echo "making $RUST from $BASE and this machine's Rust $RUST_VERSION" >&2
  sysroot=$(rustc --print sysroot)
  c=$(buildah from "$BASE")
  buildah run --isolation chroot --network host "$c" -- sh -c \
    'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc g++ libc6-dev make pkg-config python3 python3-venv >/dev/null && rm -rf /var/lib/apt/lists/*'
  for dir in bin lib libexec; do buildah copy --quiet "$c" "$sysroot/$dir" "/usr/local/rust/$dir"; done
  # As in the official rust images: CARGO_HOME is /usr/local/cargo, which the
  # Dockerfiles' registry cache mounts. PIP_CERT: pip trusts the system's bundle, the
  # one the builds mount from the host.
  buildah config --env CARGO_HOME=/usr/local/cargo \
    --env PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt "$c"
  buildah commit --quiet "$c" "$RUST" >/dev/null
  buildah rm "$c" >/dev/null
fi

declare -A NAME=([coordinator]=loupe-coordinator [worker]=loupe-worker [cli]=loupe)
images=("$@")
[ ${#images[@]} -gt 0 ] || images=(worker cli coordinator)
for image in "${images[@]}"; do
  [ -n "${NAME[$image]:-}" ] || { echo "unknown image '$image' (coordinator, worker or cli)" >&2; exit 2; }
  echo "building localhost/${NAME[$image]}:$TAG (deploy/$image.Dockerfile)" >&2
  buildah bud --quiet --isolation chroot --network host --pull=never --layers \
    --volume "$HOST_CA:/etc/ssl/certs/ca-certificates.crt:ro" \
    --build-arg RUST_IMAGE="$RUST" --build-arg DEBIAN_IMAGE="$BASE" \
    --build-arg TORCH_INDEX="$TORCH_INDEX" \
    -f "deploy/$image.Dockerfile" -t "localhost/${NAME[$image]}:$TAG" . >/dev/null
done

echo "image sizes (uncompressed, as stored locally):"
for image in "${images[@]}"; do
  bytes=$(podman image inspect --format '{{.Size}}' "localhost/${NAME[$image]}:$TAG")
  printf '  %-32s %6d MB\n' "localhost/${NAME[$image]}:$TAG" $((bytes / 1000000))
done
