# syntax=docker/dockerfile:1
# loupe-coordinator: the gRPC coordinator. It never links libtorch, so the image is a
# slim Debian with the binary and CA certificates (for S3 over TLS) and nothing else.
#
#   docker build -f deploy/coordinator.Dockerfile -t REGISTRY/loupe-coordinator:0.1.0 .
#
# The build context is the repository root (see deploy/README.md and .dockerignore).
# tools/build-images.sh builds it without a registry by setting the two image arguments.
#
# Base images are named by tag here. In production pin them by digest as well
# (--build-arg RUST_IMAGE=rust:1.95-trixie@sha256:...), so a rebuild cannot pick up a
# re-pushed tag. Get the digest with `docker buildx imagetools inspect rust:1.95-trixie`
# (the top-level "Digest:", the multi-platform index) or `crane digest rust:1.95-trixie`.

ARG RUST_IMAGE=rust:1.95-trixie
ARG DEBIAN_IMAGE=debian:trixie-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# protoc comes from the protoc-bin-vendored crate: no apt protoc. --locked: exactly the
# versions in Cargo.lock. The caches keep the registry and target/ across builds (the
# three Dockerfiles share them); the binary is copied out of the cache mount.
RUN --mount=type=cache,id=loupe-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=loupe-cargo-target,target=/src/target \
    cargo build --release --locked -p loupe-coordinator --bin loupe-coordinator \
 && install -D -m 0755 target/release/loupe-coordinator /out/loupe-coordinator

FROM ${DEBIAN_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 loupe \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin loupe
COPY --from=build /out/loupe-coordinator /usr/local/bin/loupe-coordinator
USER 10001:10001
# 7600: gRPC (Jobs, Workers, grpc.health.v1). 9600: HTTP /metrics, /healthz, /readyz.
EXPOSE 7600 9600
ENV LOUPE_LISTEN=0.0.0.0:7600 \
    LOUPE_METRICS_LISTEN=0.0.0.0:9600
ENTRYPOINT ["/usr/local/bin/loupe-coordinator"]
