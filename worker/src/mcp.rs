//! MCP stdio server exposing `emit_event` to agents (in progress).

pub async fn serve_stdio() -> anyhow::Result<()> {
    anyhow::bail!("the MCP server is not built yet")
}
