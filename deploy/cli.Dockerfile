# syntax=docker/dockerfile:1
# The `loupe` CLI (submit, watch, status, jobs, cancel, serve, and local render/inspect).
# It links libtorch: `loupe submit` loads the model to list its layers and their shapes,
# and `loupe render` renders locally. This image carries the CPU build of libtorch only
# (about 1 GB of libraries); render on the cluster, or build from source for a local GPU.
#
#   docker build -f deploy/cli.Dockerfile -t REGISTRY/loupe:0.1.0 .
#   docker run --rm -v $PWD/loupe.token:/token:ro -e LOUPE_TOKEN_FILE=/token \
#     --network host REGISTRY/loupe:0.1.0 jobs --coordinator http://localhost:7600
#
# Base images pinned by tag; pin by digest in production (deploy/coordinator.Dockerfile).

ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM rust:1.95-bookworm AS build
ARG TORCH_VERSION
ARG TORCH_INDEX
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION" \
 && ln -s "$(/opt/venv/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')" /opt/libtorch
# As in deploy/worker.Dockerfile: LIBTORCH for the tch build and the rpath
# (/opt/libtorch/lib). The CPU wheel has no libtorch_cuda, so none is linked.
ENV LIBTORCH=/opt/libtorch \
    LIBTORCH_CXX11_ABI=1
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p loupe-cli --bin loupe \
 && install -D -m 0755 target/release/loupe /out/bin/loupe
RUN set -eu; mkdir -p /out/libtorch/lib; \
    find /opt/libtorch/lib/ -maxdepth 1 -name '*.so*' ! -name 'libtorch_python.so' \
      -exec cp -L {} /out/libtorch/lib/ \; ; \
    test -e /out/libtorch/lib/libtorch_cpu.so

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 loupe \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/loupe \
      --shell /usr/sbin/nologin loupe
COPY --from=build /out/libtorch/lib/ /opt/libtorch/lib/
COPY --from=build /out/bin/loupe /usr/local/bin/loupe
ENV LD_LIBRARY_PATH=/opt/libtorch/lib
USER 10001:10001
WORKDIR /home/loupe
ENTRYPOINT ["/usr/local/bin/loupe"]
CMD ["--help"]
