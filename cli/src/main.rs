//! `grizzly`: the command line — dev mode, emit, events, dead letters, MCP server, benchmarks.

use clap::Parser;

// `grizzly dev` and `grizzly bench` run the listener and worker in this process: the same
// allocator as their own binaries (see `grizzly-listener`), and each on a single-threaded
// runtime of its own thread (`thread::spawn_component`), so the bench measures what ships.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
