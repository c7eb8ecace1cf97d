//! `grizzly-listener`: routes events from the log to handlers' task partitions.

use anyhow::Context as _;
use clap::Parser;
use grizzly_shared::config::ComponentArgs;
use grizzly_shared::http::ObservabilityServer;
use grizzly_shared::{handler, nats, shutdown, telemetry};

#[derive(Parser)]
#[command(
    name = "grizzly-listener",
    version,
    about = "Grizzly listener: routes events to handlers"
)]
struct Cli {
    #[command(flatten)]
    args: ComponentArgs,
}

// Every event allocates small short-lived values (envelopes, JSON, NATS frames); mimalloc spends
// less on them than the system allocator (measured with `grizzly bench throughput`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

// One thread: a quarter less CPU per event than the multi-threaded runtime, and more events/s
// (ARCHITECTURE.md, *Runtimes*). A listener scales by replicas, not threads.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let settings = Cli::parse().args.load()?;
    let _telemetry = telemetry::init(&settings.log_format, &settings.log);
    let ops = ObservabilityServer::start_or_warn(&settings.metrics_addr).await;
    let handlers = handler::load_handlers(&settings.handlers_dir)
        .with_context(|| format!("loading handlers from {}", settings.handlers_dir.display()))?;
    let nats = nats::connect(&settings.nats_url, "grizzly-listener", true).await?;
    let shutdown = shutdown::on_signal();
    if let Some(ops) = &ops {
        ops.track("listener", &nats, &settings, shutdown.clone());
    }
    let listener = grizzly_listener::Listener::new(nats, settings, &handlers)?;
    listener.run(shutdown).await
}
