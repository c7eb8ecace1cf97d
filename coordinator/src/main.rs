//! `grizzly-coordinator`: runs workflows.

use clap::Parser;
use grizzly_shared::config::ComponentArgs;
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Cli::parse().args.load()?;
    telemetry::init(&settings.log_format, &settings.log);
    let nats = nats::connect(&settings.nats_url, "grizzly-coordinator", true).await?;
    grizzly_coordinator::Coordinator::new(nats, settings)
        .run(shutdown::on_signal())
        .await
}
