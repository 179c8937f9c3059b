# syntax=docker/dockerfile:1
# loupe-worker: renders with libtorch 2.11 on an NVIDIA GPU (CUDA 13.0), or on the CPU.
#
#   docker build -f deploy/worker.Dockerfile -t REGISTRY/loupe-worker:0.1.0 .
#
# The build context is the repository root. tools/build-images.sh builds it without a
# registry, on a Debian base bootstrapped locally, by setting the build arguments below
# (deploy/README.md). Pin the base images by digest in production
# (deploy/coordinator.Dockerfile says how).

ARG RUST_IMAGE=rust:1.95-trixie
ARG DEBIAN_IMAGE=debian:trixie-slim
ARG TORCH_VERSION=2.11.0
# The CUDA 13.0 wheels. Their CUDA, cuDNN, NCCL... libraries come as nvidia-* pip wheels
# that this index also serves. PyPI's own torch 2.11.0 for Linux x86_64 is the same
# CUDA 13.0 build (tools/build-images.sh uses PyPI).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130

FROM ${RUST_IMAGE} AS build
ARG TORCH_VERSION
ARG TORCH_INDEX
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
# libtorch from the PyTorch wheel, as tools/setup-venv.sh does for development.
RUN --mount=type=cache,id=loupe-pip,target=/root/.cache/pip \
    python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION" \
 && ln -s "$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" /opt/site-packages \
 && ln -s /opt/site-packages/torch /opt/libtorch
# LIBTORCH (set here, it wins over .cargo/config.toml's .venv/libtorch) is what the tch
# build and worker/build.rs read. worker/build.rs links libtorch_cuda with
# --no-as-needed (else CUDA is never available) because $LIBTORCH/lib/libtorch_cuda.so
# exists, and sets the binary's rpath to /opt/libtorch/lib, the runtime image's path.
ENV LIBTORCH=/opt/libtorch \
    LIBTORCH_CXX11_ABI=1
WORKDIR /src
COPY . .
RUN --mount=type=cache,id=loupe-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=loupe-cargo-target,target=/src/target \
    cargo build --release --locked -p loupe-worker --bin loupe-worker \
 && install -D -m 0755 target/release/loupe-worker /out/bin/loupe-worker
# The libraries the worker loads, in one flat directory: those it links (libtorch,
# libtorch_cuda and, through them, cudart, cuBLAS, cuDNN, cuFFT, cuRAND, cuSPARSE,
# cuSPARSELt, cuFile, CUPTI, NCCL, NVSHMEM, nvJitLink) and those libtorch opens at run
# time: the CUDA linear algebra (cuSOLVER), NVRTC for kernels compiled at run time, and
# cuDNN's engine libraries. The rest of the wheel (Python, headers, static libraries,
# the profiler's and the toolkit's other libraries) stays behind.
RUN deploy/collect-libs.sh /opt/site-packages /out/bin/loupe-worker /out/libtorch/lib \
      libtorch_cuda_linalg.so libcaffe2_nvrtc.so 'libcudnn_*.so.9' 'libnvrtc-builtins.so.*' \
 && test -e /out/libtorch/lib/libtorch_cuda.so

# A plain Debian: the wheel's libraries above are the CUDA runtime libtorch was built
# against, so a CUDA base image would only add a second copy. The driver (libcuda.so.1)
# comes from the node, mounted by the NVIDIA container toolkit.
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 loupe \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin loupe \
 && install -d -o 10001 -g 10001 /cache/models
COPY --from=build /out/libtorch/lib/ /opt/libtorch/lib/
COPY --from=build /out/bin/loupe-worker /usr/local/bin/loupe-worker
# NVIDIA_DRIVER_CAPABILITIES: the container toolkit mounts the compute libraries (and
# nvidia-smi). NVIDIA_REQUIRE_CUDA: it refuses to start the container on a driver older
# than CUDA 13.0 needs (580), rather than leave a worker that cannot use its GPU.
# The model cache is the worker's own directory, so `docker run` works without a volume
# (the worker refuses to start when it cannot write there); the chart mounts an emptyDir.
ENV LD_LIBRARY_PATH=/opt/libtorch/lib \
    LOUPE_MODEL_CACHE=/cache/models \
    LOUPE_METRICS_LISTEN=0.0.0.0:9600 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA=cuda>=13.0
USER 10001:10001
# 9600: HTTP /metrics, /healthz, /readyz. The worker dials the coordinator; it listens
# for nothing else.
EXPOSE 9600
ENTRYPOINT ["/usr/local/bin/loupe-worker"]
