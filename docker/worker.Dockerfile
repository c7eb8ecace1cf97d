# syntax=docker/dockerfile:1.7
# grizzly-worker: runs handlers — warm Claude Code pools, persistent processes, exec.
# The image also carries the `grizzly` CLI (dlq, events tail, emit) for `kubectl exec`.
#
# Build from the repository root (the build context must be the workspace):
#   docker build -f docker/worker.Dockerfile -t grizzly-worker:0.1.0 .
# Runtime: Node.js 22 (Claude Code needs >= 22 to install), Claude Code from npm (pinned),
# python3 for script handlers. Runs as uid 10001; HOME=/home/grizzly must be writable (an
# emptyDir in Kubernetes, where the root filesystem is read-only); each Claude Code instance
# gets its own HOME under $TMPDIR (/tmp), which must be writable too.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm
ARG NODE_MAJOR=22

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p grizzly-worker -p grizzly-cli \
 && install -D -m 0755 target/release/grizzly-worker /out/grizzly-worker \
 && install -D -m 0755 target/release/grizzly /out/grizzly

FROM node:${NODE_MAJOR}-${DEBIAN_RELEASE}-slim
ARG CLAUDE_CODE_VERSION=2.1.331
# tini is PID 1: it forwards SIGTERM to the worker only (not to its process group, so running
# agent turns are drained by the worker, not killed) and reaps orphaned grandchildren (an
# agent's MCP server whose parent died).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 tini \
 && rm -rf /var/lib/apt/lists/*
# The package's postinstall links the platform's native binary; no other download.
RUN npm install --global --no-audit --no-fund "@anthropic-ai/claude-code@${CLAUDE_CODE_VERSION}" \
 && npm cache clean --force \
 && claude --version
RUN groupadd --system --gid 10001 grizzly \
 && useradd --system --uid 10001 --gid grizzly --home-dir /home/grizzly --create-home \
      --shell /usr/sbin/nologin grizzly \
 && mkdir -p /app/handlers /app/workflows \
 && chown -R grizzly:grizzly /app
COPY --from=build /out/grizzly-worker /out/grizzly /usr/local/bin/
WORKDIR /app
USER 10001:10001
ENV HOME=/home/grizzly \
    TMPDIR=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DISABLE_TELEMETRY=1 \
    CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 \
    GRIZZLY_LOG_FORMAT=json
EXPOSE 9090
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/grizzly-worker"]
