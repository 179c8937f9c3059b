# syntax=docker/dockerfile:1
# The `loupe` CLI (submit, watch, status, jobs, cancel, serve, and local render/inspect).
# It links libtorch: `loupe submit` loads the model to list its layers and their shapes,
# and `loupe render` renders locally. This image is CPU-only: render on the cluster, or
# build from source for a local GPU.
#
#   docker build -f deploy/cli.Dockerfile -t REGISTRY/loupe:0.1.0 .
#   docker run --rm -v $PWD/loupe.token:/token:ro -e LOUPE_TOKEN_FILE=/token \
#     --network host REGISTRY/loupe:0.1.0 jobs --coordinator http://localhost:7600
#
# Base images by tag; pin by digest in production (deploy/coordinator.Dockerfile).
# tools/build-images.sh builds it without a registry (deploy/README.md).

ARG RUST_IMAGE=rust:1.95-trixie
ARG DEBIAN_IMAGE=debian:trixie-slim
ARG TORCH_VERSION=2.11.0
# The CPU wheel. With a CUDA wheel (PyPI's, as tools/build-images.sh uses) the image is
# the same: LOUPE_LINK_CUDA=0 below keeps libtorch_cuda, and so every CUDA library, out.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM ${RUST_IMAGE} AS build
ARG TORCH_VERSION
ARG TORCH_INDEX
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN --mount=type=cache,id=loupe-pip,target=/root/.cache/pip \
    python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION" \
 && ln -s "$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" /opt/site-packages \
 && ln -s /opt/site-packages/torch /opt/libtorch
# As in deploy/worker.Dockerfile: LIBTORCH for the tch build and the rpath
# (/opt/libtorch/lib); LOUPE_LINK_CUDA=0: worker/build.rs does not force libtorch_cuda.
ENV LIBTORCH=/opt/libtorch \
    LIBTORCH_CXX11_ABI=1 \
    LOUPE_LINK_CUDA=0
WORKDIR /src
COPY . .
RUN --mount=type=cache,id=loupe-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=loupe-cargo-target,target=/src/target \
    cargo build --release --locked -p loupe-cli --bin loupe \
 && install -D -m 0755 target/release/loupe /out/bin/loupe
RUN deploy/collect-libs.sh /opt/site-packages /out/bin/loupe /out/libtorch/lib \
 && test -e /out/libtorch/lib/libtorch_cpu.so && test ! -e /out/libtorch/lib/libtorch_cuda.so

FROM ${DEBIAN_IMAGE}
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
