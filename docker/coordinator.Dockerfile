# syntax=docker/dockerfile:1.7
# grizzly-coordinator: runs declarative workflows as durable state machines.
#
# Build from the repository root (the build context must be the workspace):
#   docker build -f docker/coordinator.Dockerfile -t grizzly-coordinator:0.1.0 .
# Run: the binary reads ./handlers and ./workflows relative to /app (mounted from ConfigMaps in
# Kubernetes) and GRIZZLY_* settings from the environment; health and metrics on :9090.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# Registry and target caches survive between builds; the binary is copied out of the cache.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p grizzly-coordinator \
 && install -D -m 0755 target/release/grizzly-coordinator /out/grizzly-coordinator

FROM debian:${DEBIAN_RELEASE}-slim
# tini is PID 1: it forwards SIGTERM to the coordinator (which drains) and reaps orphans.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 grizzly \
 && useradd --system --uid 10001 --gid grizzly --home-dir /home/grizzly --create-home \
      --shell /usr/sbin/nologin grizzly \
 && mkdir -p /app/handlers /app/workflows \
 && chown -R grizzly:grizzly /app
COPY --from=build /out/grizzly-coordinator /usr/local/bin/grizzly-coordinator
WORKDIR /app
USER 10001:10001
ENV HOME=/home/grizzly \
    GRIZZLY_LOG_FORMAT=json
EXPOSE 9090
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/grizzly-coordinator"]
