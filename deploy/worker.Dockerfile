# syntax=docker/dockerfile:1
# loupe-worker: renders with libtorch 2.11 on an NVIDIA GPU (CUDA 13.0), or on the CPU.
#
#   docker build -f deploy/worker.Dockerfile -t REGISTRY/loupe-worker:0.1.0 .
#
# The build context is the repository root. Base images are pinned by tag; pin them by
# digest too in production (`docker buildx imagetools inspect IMAGE:TAG` prints it; see
# deploy/coordinator.Dockerfile). The nvidia/cuda tag below is one NVIDIA publishes
# (13.0.2, Ubuntu 24.04); verify it and take its digest where you can pull it.

ARG TORCH_VERSION=2.11.0
# The CUDA 13.0 wheels. Their CUDA, cuDNN, NCCL... libraries come as nvidia-* and
# cuda-toolkit pip wheels that this index also serves.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130

FROM rust:1.95-bookworm AS build
ARG TORCH_VERSION
ARG TORCH_INDEX
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
# libtorch from the PyTorch wheel, as tools/setup-venv.sh does for development.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION" \
 && ln -s "$(/opt/venv/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')" /opt/libtorch
# LIBTORCH (set here, it wins over .cargo/config.toml's .venv/libtorch) is what the tch
# build and worker/build.rs read; the result is the same libtorch that
# LIBTORCH_USE_PYTORCH=1 would find through the venv's python, but worker/build.rs also
# needs LIBTORCH itself: it links libtorch_cuda with --no-as-needed (else CUDA is never
# available) only when $LIBTORCH/lib/libtorch_cuda.so exists, and it sets the binary's
# rpath to $LIBTORCH/lib, which is /opt/libtorch/lib in the runtime image too.
ENV LIBTORCH=/opt/libtorch \
    LIBTORCH_CXX11_ABI=1
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p loupe-worker --bin loupe-worker \
 && install -D -m 0755 target/release/loupe-worker /out/bin/loupe-worker
# The shared libraries the worker loads, in one flat directory: libtorch's own
# (torch/lib, less libtorch_python which needs a Python) and those of the nvidia-* and
# cuda-toolkit wheels that libtorch_cuda needs (site-packages/nvidia/*/lib: cudart,
# cuBLAS, cuDNN, cuFFT, cuRAND, cuSOLVER, cuSPARSE, cuSPARSELt, cuFile, NCCL, NVSHMEM,
# nvJitLink, NVRTC...). Symbolic links are copied as files.
RUN set -eu; site=$(/opt/venv/bin/python -c 'import site; print(site.getsitepackages()[0])'); \
    mkdir -p /out/libtorch/lib; \
    find "$site/torch/lib" "$site"/nvidia/*/lib -maxdepth 1 -name '*.so*' ! -name 'libtorch_python.so' \
      -exec cp -L {} /out/libtorch/lib/ \; ; \
    test -e /out/libtorch/lib/libtorch_cuda.so; test -e /out/libtorch/lib/libcudnn.so.9; \
    ls /out/libtorch/lib | wc -l

# CUDA's "base" flavour: the container toolkit's settings and nothing else. The wheels'
# libraries above are the CUDA runtime libtorch was built against; a -cudnn-runtime base
# would add a second copy (about 2 GB) that the loader never uses. Only the driver's
# libcuda.so comes from the node, mounted by the NVIDIA container toolkit.
FROM nvidia/cuda:13.0.2-base-ubuntu24.04
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 loupe \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin loupe
COPY --from=build /out/libtorch/lib/ /opt/libtorch/lib/
COPY --from=build /out/bin/loupe-worker /usr/local/bin/loupe-worker
ENV LD_LIBRARY_PATH=/opt/libtorch/lib \
    LOUPE_MODEL_CACHE=/cache/models \
    LOUPE_METRICS_LISTEN=0.0.0.0:9600 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
# 9600: HTTP /metrics, /healthz, /readyz. The worker dials the coordinator; it listens
# for nothing else.
EXPOSE 9600
ENTRYPOINT ["/usr/local/bin/loupe-worker"]
