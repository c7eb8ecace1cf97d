//! `grizzly-worker`: runs handlers (warm Claude Code pools, persistent processes, exec).
//! `grizzly-worker mcp` is the MCP stdio server its Claude Code instances use to emit events.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use grizzly_shared::config::ComponentArgs;
use grizzly_shared::http::ObservabilityServer;
use grizzly_shared::{handler, nats, shutdown, telemetry};

#[derive(Parser)]
#[command(
    name = "grizzly-worker",
    version,
    about = "Grizzly worker: runs handlers"
)]
struct Cli {
    #[command(flatten)]
    args: ComponentArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// MCP stdio server exposing `emit_event` (started by the worker for each agent).
    Mcp,
}

// Every event allocates small short-lived values (envelopes, JSON, NATS frames); mimalloc spends
// less on them than the system allocator (measured with `grizzly bench throughput`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

// One thread: a quarter less CPU per event than the multi-threaded runtime, and more events/s
// (ARCHITECTURE.md, *Runtimes*). A worker scales by replicas, not threads.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Mcp) = cli.command {
        return grizzly_worker::mcp::serve_stdio().await;
    }
    let settings = cli.args.load()?;
    let _telemetry = telemetry::init(&settings.log_format, &settings.log);
    let ops = ObservabilityServer::start_or_warn(&settings.metrics_addr).await;
    let handlers = handler::load_handlers(&settings.handlers_dir)
        .with_context(|| format!("loading handlers from {}", settings.handlers_dir.display()))?;
    let nats = nats::connect(&settings.nats_url, "grizzly-worker", true).await?;
    let shutdown = shutdown::on_signal();
    if let Some(ops) = &ops {
        ops.track("worker", &nats, &settings, shutdown.clone());
    }
    let worker = grizzly_worker::Worker::new(nats, settings, &handlers)?;
    worker.run(shutdown).await
}
