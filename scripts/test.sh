#!/usr/bin/env bash
# Runs the whole test suite against a real nats-server and the real Claude Code CLI (both
# installed into .tools/ if missing; a missing tool fails the suite, it is never skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-tools.sh
export PATH="$PWD/.tools/bin:$PATH"
# Cross-component tests start the real binaries (crash tests kill them).
cargo build --workspace --bins
cargo test --workspace "$@"
