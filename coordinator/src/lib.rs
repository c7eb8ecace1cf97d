//! The coordinator: runs declarative YAML workflows as durable state machines.
//!
//! - [`dsl`]: the workflow language (types, parsing, validation, JSON Schema).
//! - [`expr`]: CEL expressions and `${ }` templates.
//! - [`machine`]: instance statuses and the transition table.
//! - [`instance`]: instance state and the (pure) interpreter.
//! - [`engine`]: one partition of instances: consume, checkpoint, publish, timers.
//! - [`registry`]: workflow versions, pinned once an instance ran them.
//! - [`projection`]: the read model behind `grizzly workflow list|status`.
//! - [`simulate`]: `grizzly workflow test` (scripted outcomes, no broker); [`docs`]: Markdown.
//!
//! Instances are partitioned by id (`partition_for(id, partitions)`); a coordinator owns a fair
//! share of the partitions through leases `wf.partition.<p>` in KV `grizzly_leases` (renewed
//! every third of `worker.lease_ttl`), so each instance has exactly one owner at a time and a
//! dead coordinator's partitions move to the survivors within one lease TTL. Lease `wf.projection`
//! picks the replica that maintains the read model.

pub mod docs;
pub mod dsl;
pub mod engine;
pub mod expr;
pub mod instance;
pub mod machine;
pub mod projection;
pub mod reader;
pub mod registry;
pub mod restore;
pub mod simulate;

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;
use async_nats::jetstream::kv;
use futures::StreamExt;
use grizzly_shared::Settings;
use grizzly_shared::handler::load_handlers;
use grizzly_shared::nats::{self, LeaseFence, Nats};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::dsl::Catalog;
use crate::engine::{PartitionEngine, Shared};
use crate::registry::Registry;

const PROJECTION_LEASE: &str = "wf.projection";

/// The lease key of workflow partition `p`.
pub fn partition_lease(p: u16) -> String {
    format!("wf.partition.{p}")
}

struct Owned {
    revision: u64,
    /// Moved on with every confirmed renewal; workflow partitions stop pulling past it.
    fence: LeaseFence,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

pub struct Coordinator {
    nats: Nats,
    settings: Settings,
    id: String,
}

impl Coordinator {
    pub fn new(nats: Nats, settings: Settings) -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
        let id = format!(
            "{host}-{}-{}",
            std::process::id(),
            grizzly_shared::ids::new_event_id()
        )
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
        Self { nats, settings, id }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Loads handlers and workflows (refusing invalid files), then runs owned partitions and,
    /// when it holds that lease, the projector, until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let (shared, handler_registry, snapshot) = open(&self.nats, &self.settings).await?;
        let leases = nats::ensure_lease_bucket(
            &self.nats.js,
            self.settings.worker.lease_ttl,
            self.settings.streams.replicas,
        )
        .await?;
        projection::ensure_bucket(&self.nats.js, self.settings.streams.replicas).await?;
        info!(
            coordinator = %self.id,
            workflows = shared.registry.latest().count(),
            "coordinator started"
        );
        let reader = reader::Reader::spawn(shared.clone(), shutdown.clone());
        let (registry_tx, mut registry_rx) = tokio::sync::watch::channel(snapshot);
        tokio::spawn(grizzly_shared::registry::follow(
            handler_registry,
            registry_tx,
            shutdown.clone(),
        ));
        let following = shared.clone();
        tokio::spawn(async move {
            while registry_rx.changed().await.is_ok() {
                let now = registry_rx.borrow_and_update().clone();
                let handlers = routed_handlers(&now, &following.settings.handlers_dir);
                following.registry.set_handlers(&handlers);
                info!(
                    handlers = handlers.len(),
                    "steps follow the handler registry"
                );
            }
        });
        let mut owned: HashMap<String, Owned> = HashMap::new();
        let mut tick = tokio::time::interval(self.settings.worker.lease_ttl / 3);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    if let Err(e) = self.balance(&leases, &shared, &reader, &mut owned).await {
                        warn!(error = %e, "coordinator lease round failed");
                    }
                }
            }
        }
        for o in owned.values() {
            o.stop.cancel();
        }
        for (key, o) in owned.drain() {
            let _ = o.task.await;
            let _ = leases.delete(&key).await;
        }
        let _ = leases.delete(format!("wf.coordinator.{}", self.id)).await;
        info!(coordinator = %self.id, "coordinator stopped");
        Ok(())
    }

    async fn live_coordinators(&self, leases: &kv::Store) -> anyhow::Result<usize> {
        let mut keys = leases.keys().await?;
        let mut n = 0;
        while let Some(key) = keys.next().await {
            if key?.starts_with("wf.coordinator.") {
                n += 1;
            }
        }
        Ok(n.max(1))
    }

    /// One lease round: heartbeat, renew, release surplus, claim up to the fair share.
    async fn balance(
        &self,
        leases: &kv::Store,
        shared: &Arc<Shared>,
        reader: &reader::Reader,
        owned: &mut HashMap<String, Owned>,
    ) -> anyhow::Result<()> {
        leases
            .put(
                format!("wf.coordinator.{}", self.id),
                self.id.clone().into(),
            )
            .await?;
        let mut lost = Vec::new();
        let margin = LeaseFence::margin(self.settings.worker.lease_ttl);
        for (key, o) in owned.iter_mut() {
            let asked = tokio::time::Instant::now();
            match leases.update(key, self.id.clone().into(), o.revision).await {
                Ok(r) => {
                    o.revision = r;
                    o.fence.extend(asked + margin);
                }
                Err(e) => {
                    warn!(lease = %key, error = %e, "lease lost");
                    o.stop.cancel();
                    lost.push(key.clone());
                }
            }
        }
        for key in lost {
            owned.remove(&key);
        }
        let partitions = self.settings.partitions;
        let fair = usize::from(partitions).div_ceil(self.live_coordinators(leases).await?);
        let mine: Vec<String> = owned
            .keys()
            .filter(|k| k.starts_with("wf.partition."))
            .cloned()
            .collect();
        if mine.len() > fair {
            for key in mine.iter().skip(fair) {
                if let Some(o) = owned.remove(key) {
                    info!(lease = %key, "releasing workflow partition to rebalance");
                    o.stop.cancel();
                    let _ = o.task.await;
                    let _ = leases.delete(key).await;
                }
            }
        }
        let mut have = mine.len().min(fair);
        for p in 0..partitions {
            if have >= fair {
                break;
            }
            let key = partition_lease(p);
            if owned.contains_key(&key) {
                continue;
            }
            let asked = tokio::time::Instant::now();
            if let Ok(revision) = leases.create(&key, self.id.clone().into()).await {
                let stop = CancellationToken::new();
                let fence = LeaseFence::new(asked + margin);
                let engine = PartitionEngine::new(shared.clone(), reader.clone(), p, fence.clone());
                let task = tokio::spawn(engine.run(stop.clone()));
                owned.insert(
                    key,
                    Owned {
                        revision,
                        fence,
                        stop,
                        task,
                    },
                );
                have += 1;
            }
        }
        let asked = tokio::time::Instant::now();
        if !owned.contains_key(PROJECTION_LEASE)
            && let Ok(revision) = leases
                .create(PROJECTION_LEASE, self.id.clone().into())
                .await
        {
            let stop = CancellationToken::new();
            let fence = LeaseFence::new(asked + margin);
            let task = tokio::spawn(projection::run_projector(
                self.nats.clone(),
                self.settings.streams.replicas,
                fence.clone(),
                stop.clone(),
            ));
            owned.insert(
                PROJECTION_LEASE.into(),
                Owned {
                    revision,
                    fence,
                    stop,
                    task,
                },
            );
        }
        Ok(())
    }
}

/// What the partitions share, made from the handler files and the handler registry (files
/// registered first, as every component does), the workflow files and the coordinator's KV
/// buckets; also the handler registry and its snapshot, for following its changes.
pub async fn open(
    nats: &Nats,
    settings: &Settings,
) -> anyhow::Result<(
    Arc<Shared>,
    grizzly_shared::registry::HandlerRegistry,
    grizzly_shared::registry::RegistrySnapshot,
)> {
    let js = &nats.js;
    let replicas = settings.streams.replicas;
    nats::ensure_streams(js, &settings.streams).await?;
    let files = load_handlers(&settings.handlers_dir)
        .with_context(|| format!("loading handlers from {}", settings.handlers_dir.display()))?;
    // Steps call the version the handler registry routes new events to.
    let handler_registry = grizzly_shared::registry::HandlerRegistry::open(js, replicas).await?;
    handler_registry
        .register_all(&files)
        .await
        .context("registering handler files")?;
    let snapshot = handler_registry.snapshot().await?;
    let handlers = routed_handlers(&snapshot, &settings.handlers_dir);
    let workflows = dsl::load_dir(&settings.workflows_dir, &handlers).with_context(|| {
        format!(
            "loading workflows from {}",
            settings.workflows_dir.display()
        )
    })?;
    let pinned = registry::ensure_bucket(js, replicas).await?;
    let shared = Arc::new(Shared {
        nats: nats.clone(),
        settings: settings.clone(),
        registry: Registry::new(workflows, Catalog::from_handlers(&handlers), pinned),
        checkpoints: engine::ensure_instances_bucket(js, replicas).await?,
        cursors: reader::ensure_cursors_bucket(js, replicas).await?,
    });
    Ok((shared, handler_registry, snapshot))
}

/// The version of each handler that new events (and new steps) go to; a version that does not
/// load is left out, loudly.
fn routed_handlers(
    snapshot: &grizzly_shared::registry::RegistrySnapshot,
    dir: &std::path::Path,
) -> Vec<grizzly_shared::handler::LoadedHandler> {
    snapshot
        .routed()
        .into_iter()
        .filter_map(|r| match r.handler(dir) {
            Ok(h) => Some(h),
            Err(e) => {
                warn!(handler = %r.name, version = r.version, error = %e, "registered handler does not load; steps do not call it");
                None
            }
        })
        .collect()
}
