//! `grizzly`: the command line — dev mode, emit, events, dead letters, MCP server, benchmarks.

use clap::Parser;

// `grizzly dev` and `grizzly bench` run the listener and worker in this process: the same
// allocator as their own binaries (see `grizzly-listener`), and each on a single-threaded
// runtime of its own thread (`thread::spawn_component`), so the bench measures what ships.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    quiet_on_closed_stdout();
    let cli = grizzly_cli::Cli::parse();
    match grizzly_cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `grizzly events tail | head`: once the reader has gone, `println!` panics (Rust ignores
/// SIGPIPE, and this workspace forbids the `unsafe` it takes to restore it). End the way a
/// process killed by SIGPIPE does instead of printing a panic: status 141, nothing on stderr.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}
