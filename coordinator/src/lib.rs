//! The coordinator: runs declarative YAML workflows as durable state machines.
//! (The workflow engine is being built; today the coordinator connects, sets up the streams and
//! waits, so the three components start the same way everywhere.)

use grizzly_shared::Settings;
use grizzly_shared::nats::{self, Nats};
use tokio_util::sync::CancellationToken;
use tracing::info;

pub struct Coordinator {
    nats: Nats,
    settings: Settings,
}

impl Coordinator {
    pub fn new(nats: Nats, settings: Settings) -> Self {
        Self { nats, settings }
    }

    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        nats::ensure_streams(&self.nats.js, &self.settings.streams).await?;
        info!("coordinator idle: no workflow engine yet");
        shutdown.cancelled().await;
        Ok(())
    }
}
