//! `grizzly-coordinator`: runs workflows.

use clap::Parser;
use grizzly_shared::config::ComponentArgs;
use grizzly_shared::http::ObservabilityServer;
use grizzly_shared::{nats, shutdown, telemetry};

#[derive(Parser)]
#[command(
    name = "grizzly-coordinator",
    version,
    about = "Grizzly coordinator: runs workflows"
)]
struct Cli {
    #[command(flatten)]
    args: ComponentArgs,
}

// Every event allocates small short-lived values (envelopes, JSON, NATS frames); mimalloc spends
// less on them than the system allocator (measured with `grizzly bench throughput`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Cli::parse().args.load()?;
    let _telemetry = telemetry::init(&settings.log_format, &settings.log);
    let ops = ObservabilityServer::start_or_warn(&settings.metrics_addr).await;
    let nats = nats::connect(&settings.nats_url, "grizzly-coordinator", true).await?;
    let shutdown = shutdown::on_signal();
    if let Some(ops) = &ops {
        ops.track("coordinator", &nats, &settings, shutdown.clone());
    }
    grizzly_coordinator::Coordinator::new(nats, settings)
        .run(shutdown)
        .await
}
