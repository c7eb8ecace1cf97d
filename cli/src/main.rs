//! `grizzly`: the command line — dev mode, emit, events, dead letters, MCP server, benchmarks.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = grizzly_cli::Cli::parse();
    match grizzly_cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
