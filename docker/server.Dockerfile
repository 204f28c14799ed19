# The coordinator: builds without libtorch.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p server --bin trainq-server

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 trainq && mkdir /artifacts && chown trainq /artifacts
COPY --from=build /src/target/release/trainq-server /usr/local/bin/trainq-server
USER trainq
EXPOSE 50051
ENTRYPOINT ["trainq-server"]
