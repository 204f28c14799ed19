# syntax=docker/dockerfile:1
# The coordinator image: trainq-server plus the trainq CLI (its `trainq health` is the container
# healthcheck). Neither links libtorch (ARCHITECTURE.md invariant 6): building only `-p server
# -p cli` compiles no torch-sys, so the build stage needs no torch. protoc comes from the
# protoc-bin-vendored crate (proto/build.rs), so no system protoc either. Needs BuildKit (the
# default builder since Docker 23) for the cache mounts.
#
#   docker build -f docker/server.Dockerfile -t trainq-server .

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The caches keep the registry and the target folder between builds; the binaries are copied out
# of the cached target folder, which does not outlive the RUN.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p server -p cli --bin trainq-server --bin trainq \
    && mkdir -p /out \
    && cp target/release/trainq-server target/release/trainq /out/

FROM debian:bookworm-slim
# ca-certificates: TLS to S3-compatible artifact stores (TRAINQ_ARTIFACTS=s3://...).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin trainq \
    && mkdir /artifacts && chown trainq /artifacts
COPY --from=build /out/trainq-server /out/trainq /usr/local/bin/
USER trainq
ENV TRAINQ_LISTEN=0.0.0.0:50051 \
    TRAINQ_METRICS_LISTEN=0.0.0.0:9091 \
    TRAINQ_ARTIFACTS=file:///artifacts
# 50051: gRPC (JobService, WorkerService, health, reflection); 9091: Prometheus /metrics.
EXPOSE 50051 9091
HEALTHCHECK --interval=5s --timeout=5s --start-period=30s --retries=5 \
    CMD ["trainq", "health", "--server", "http://localhost:50051", "--timeout", "3"]
ENTRYPOINT ["trainq-server"]
