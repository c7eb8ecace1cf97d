//! Test and dev scaffolding for Grizzly: a fake Anthropic Messages API.
//!
//! The real Claude Code CLI is pointed at it with `ANTHROPIC_BASE_URL` (see
//! [`FakeApiHandle::claude_env`]), so worker tests and the offline demo run the
//! genuine CLI — process management, stream-json framing, MCP tool calls —
//! without network, cost or nondeterminism.
//!
//! What it serves:
//! - `POST /v1/messages` (streaming SSE or plain JSON). Replies are derived
//!   from the request alone (no per-session state), so they are deterministic:
//!   - by default `fake reply: <first 200 chars of the last user text>`
//!     ([`ReplyMode`]);
//!   - a marker `[[tool:NAME {json input}]]` in the prompt makes the fake call
//!     the tool whose name is NAME or ends with NAME (`emit_event` matches
//!     `mcp__grizzly__emit_event`), one call per marker and request; once all
//!     results are back it answers `fake reply: tool <name> done: <result text>`
//!     (`failed` instead of `done` for error results).
//! - `POST /v1/messages/count_tokens`.
//! - anything else: `404` with an Anthropic-style error, logged at `warn`.
//!
//! Knobs (latency, [`FailureMode`], [`ReplyMode`]) change at runtime through
//! [`FakeApiHandle`] or over HTTP, so another process can drive it:
//! `POST /_fake/config` with e.g. `{"latency_ms":200,"failure":"hang"}`,
//! `GET /_fake/config`, `GET /_fake/stats`, `GET|DELETE /_fake/requests`.
//!
//! It never prints to stdout (tests and the CLI own stdout); it logs via
//! `tracing`.

mod config;
mod reply;
mod server;

use std::path::PathBuf;

pub use config::{
    ConfigPatch, FailureMode, FakeApiConfig, FakeApiStats, RecordedRequest, ReplyMode,
};
pub use server::{FakeApiHandle, FakeMessagesApi};

/// Runs the fake until Ctrl-C or SIGTERM (for `grizzly fake-api --port N`).
pub async fn serve_forever(config: FakeApiConfig) -> anyhow::Result<()> {
    let handle = FakeMessagesApi::start(config).await?;
    tracing::info!(base_url = %handle.base_url(), "fake Anthropic API ready");
    shutdown_signal().await?;
    handle.shutdown().await
}

async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// Locates the Claude Code CLI: `$GRIZZLY_CLAUDE_BIN`, then the workspace's
/// `.tools/bin/claude` (installed by `scripts/install-tools.sh`), then `PATH`.
pub fn find_claude_cli() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GRIZZLY_CLAUDE_BIN") {
        return Some(PathBuf::from(p));
    }
    let tools = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/claude");
    if tools.is_file() {
        return Some(tools);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("claude"))
        .find(|p| p.is_file())
}
