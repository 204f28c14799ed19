# The worker: libtorch 2.11 with CUDA from the PyPI torch wheel, found through the binary's rpath.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ENV TRAINQ_VENV=/opt/torch
RUN scripts/setup.sh && LIBTORCH="$(readlink -f .tools/libtorch)" cargo build --release -p worker --bin trainq-worker

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends python3 ca-certificates libgomp1 \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 trainq && mkdir /data && chown trainq /data
# The venv's site-packages holds libtorch and the CUDA libraries it loads.
COPY --from=build /opt/torch /opt/torch
COPY --from=build /src/target/release/trainq-worker /usr/local/bin/trainq-worker
USER trainq
ENTRYPOINT ["trainq-worker"]
