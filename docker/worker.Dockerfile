# syntax=docker/dockerfile:1
# The worker image: trainq-worker linked against the libtorch inside the PyPI torch==2.11.0 wheel
# (the CUDA build; it runs on CPU too). The wheel is installed into a virtualenv at /opt/torch in
# the build stage, and that same virtualenv is copied to the same path in the runtime stage, so
# the rpath that worker/build.rs bakes into the binary (torch/lib) resolves there, and
# libtorch_cuda.so finds the nvidia-* pip libraries through its own $ORIGIN-relative rpaths.
# Needs the NVIDIA container toolkit on the host to use a GPU (docker-compose.yml reserves one),
# and BuildKit (the default builder since Docker 23) for the cache mounts.
#
#   docker build -f docker/worker.Dockerfile -t trainq-worker .

ARG TORCH_VERSION=2.11.0

FROM rust:1-bookworm AS build
ARG TORCH_VERSION
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
# The same interpreter (bookworm's python3, 3.11) as the runtime stage: the venv's path and its
# site-packages folder are identical in both.
# triton (a dependency of the wheel for torch.compile from Python) is dropped: libtorch never
# loads it and it is hundreds of megabytes.
# nvidia-cuda-crt and nvidia-cuda-cccl: the CUDA headers (crt/, nv/) the worker's C++ shim
# compiles against, beside those of nvidia-cuda-runtime, of the same CUDA version (headers only).
RUN python3 -m venv /opt/torch \
    && /opt/torch/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}" \
    && /opt/torch/bin/pip uninstall --yes triton \
    && cuda="$(/opt/torch/bin/pip show nvidia-cuda-runtime | sed -n 's/^Version: \([0-9]*\.[0-9]*\).*/\1/p')" \
    && /opt/torch/bin/pip install --no-cache-dir "nvidia-cuda-crt==${cuda}.*" "nvidia-cuda-cccl==${cuda}.*"
# torch-sys builds against the wheel's libtorch (C++11 ABI); worker/build.rs adds the rpath to
# $LIBTORCH/lib and links libtorch_cuda.so (which nothing references by symbol) on purpose.
ENV LIBTORCH=/opt/torch/lib/python3.11/site-packages/torch \
    LIBTORCH_CXX11_ABI=1
WORKDIR /src
COPY . .
RUN test -f "$LIBTORCH/lib/libtorch_cpu.so"
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p worker --bin trainq-worker \
    && mkdir -p /out \
    && cp target/release/trainq-worker /out/

FROM debian:bookworm-slim
# python3: the interpreter the copied venv links to (the worker itself never runs Python);
# ca-certificates: data-set downloads over HTTPS; libgomp1: OpenMP for libtorch's CPU ops.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin trainq \
    && mkdir /data /artifacts && chown trainq /data /artifacts
# torch/lib (libtorch) and the nvidia-* CUDA libraries, at the path the binary's rpath names.
COPY --from=build /opt/torch /opt/torch
COPY --from=build /out/trainq-worker /usr/local/bin/trainq-worker
USER trainq
ENV TRAINQ_DATA_DIR=/data \
    TRAINQ_METRICS_LISTEN=0.0.0.0:9092 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# 9092: Prometheus /metrics.
EXPOSE 9092
ENTRYPOINT ["trainq-worker"]
