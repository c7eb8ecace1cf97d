#!/usr/bin/env bash
# Starts Grizzly on this machine: installs what is missing (nats-server, Claude Code) into
# .tools/, builds, and runs `grizzly dev` with the example handlers and workflows.
# Without ANTHROPIC_API_KEY it runs the offline demo (--fake-api: canned model replies).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-tools.sh
export PATH="$PWD/.tools/bin:$PWD/target/release:$PATH"
cargo build --release --workspace --bins
args=("$@")
if [ -z "${ANTHROPIC_API_KEY:-}" ] && [[ " ${args[*]-} " != *" --fake-api "* ]]; then
  echo "ANTHROPIC_API_KEY is not set: starting the OFFLINE DEMO (--fake-api, canned replies)" >&2
  args+=(--fake-api)
fi
exec grizzly dev "${args[@]}"
