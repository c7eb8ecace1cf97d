//! Which handlers can run right now, from the workers' heartbeats in KV `grizzly_leases`
//! (`worker.<id>` → handlers served, open breakers). Refreshed every second; used to send
//! capability requests to healthy handlers.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::debug;

#[derive(Debug, Default, Clone)]
pub struct HandlerHealth {
    /// handler → (live workers serving it, of which with the breaker open)
    handlers: HashMap<String, (usize, usize)>,
}

impl HandlerHealth {
    /// At least one live worker serves it with its breaker closed.
    pub fn is_healthy(&self, handler: &str) -> bool {
        self.handlers
            .get(handler)
            .is_some_and(|(live, open)| live > open)
    }

    /// (live workers serving `handler`, of which with its breaker open)
    pub fn workers(&self, handler: &str) -> (usize, usize) {
        self.handlers.get(handler).copied().unwrap_or_default()
    }

    pub async fn read(leases: &kv::Store) -> anyhow::Result<Self> {
        let mut handlers: HashMap<String, (usize, usize)> = HashMap::new();
        let mut keys = leases.keys().await?;
        while let Some(key) = keys.next().await {
            let key = key?;
            if !key.starts_with("worker.") {
                continue;
            }
            let Some(value) = leases.get(&key).await? else {
                continue;
            };
            let beat: serde_json::Value = serde_json::from_slice(&value).unwrap_or_default();
            let open: Vec<&str> = beat["open_breakers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str())
                .collect();
            for h in beat["handlers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str())
            {
                let entry = handlers.entry(h.to_string()).or_default();
                entry.0 += 1;
                if open.contains(&h) {
                    entry.1 += 1;
                }
            }
        }
        Ok(Self { handlers })
    }
}

pub async fn watch(leases: kv::Store, health: Arc<RwLock<HandlerHealth>>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => match HandlerHealth::read(&leases).await {
                Ok(now) => *health.write().expect("health lock") = now,
                Err(e) => debug!(error = %e, "cannot read worker heartbeats"),
            },
        }
    }
}
