//! The worker: runs handlers. It serves every handler it loads, owns a fair share of each
//! handler's task partitions (leases in KV `grizzly_leases`), and for each owned partition runs a
//! [`partition::PartitionRunner`]. Outcomes are written back to the log by the [`executor`].
//!
//! Leases: key `task.<handler>.<partition>` holds the owner's id and expires unless renewed every
//! third of `worker.lease_ttl`; a dead worker's partitions are free again within `lease_ttl`.
//! Each worker also heartbeats `worker.<id>` with the handlers it serves; the fair share of a
//! handler is `ceil(partitions / live workers serving it)`, so adding a replica moves partitions
//! to it and removing one moves them back.

mod batch;
pub mod breaker;
mod debounce;
mod delivery;
pub mod executor;
pub mod mcp;
pub mod partition;
pub mod pool;
pub mod runtime;
pub mod slots;
pub mod versions;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::kv;
use futures::StreamExt;
use grizzly_shared::Settings;
use grizzly_shared::handler::{HandlerKind, LoadedHandler};
use grizzly_shared::nats::{self, Nats};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::executor::ExecutionEnv;
use crate::partition::PartitionRunner;
use crate::runtime::Runtime;
use crate::versions::{VersionTable, context_for};
use grizzly_shared::nats::LeaseFence;
use grizzly_shared::registry::{self, HandlerRegistry};

/// Builds the runtime for a handler's `kind`.
pub fn runtime_for(
    handler: &LoadedHandler,
    settings: &Settings,
) -> anyhow::Result<Arc<dyn Runtime>> {
    Ok(match handler.spec.kind {
        HandlerKind::Exec => Arc::new(runtime::exec::ExecRuntime::new(&handler.spec)),
        HandlerKind::Process => Arc::new(runtime::process::ProcessRuntime::new(&handler.spec)),
        HandlerKind::Claude => Arc::new(runtime::claude::ClaudeRuntime::new(handler, settings)?),
    })
}

struct Owned {
    revision: u64,
    /// Moved on with each confirmed renewal; the runner stops acting once it passes.
    fence: LeaseFence,
    stop: CancellationToken,
    task: JoinHandle<()>,
    /// Released partitions keep their lease until running tasks finish.
    releasing: bool,
}

pub struct Worker {
    nats: Nats,
    settings: Settings,
    id: String,
    /// The handler files given at start; registered in the handler registry by `run`.
    files: Vec<LoadedHandler>,
    versions: Arc<VersionTable>,
}

impl Worker {
    pub fn new(nats: Nats, settings: Settings, handlers: &[LoadedHandler]) -> anyhow::Result<Self> {
        let id = sanitize(&settings.worker_id());
        // A batch must close well before the broker would redeliver its tasks.
        let problems: Vec<String> = handlers
            .iter()
            .flat_map(|h| h.settings_errors(settings.worker.ack_wait))
            .map(|e| e.to_string())
            .collect();
        if !problems.is_empty() {
            anyhow::bail!("{}", problems.join("\n"));
        }
        let contexts = handlers
            .iter()
            .map(|h| context_for(h, &settings))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            versions: Arc::new(VersionTable::new(settings.clone(), contexts)),
            files: handlers.to_vec(),
            nats,
            settings,
            id,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Runtime state per handler (pool sizes, breaker).
    pub fn state(&self) -> serde_json::Value {
        json!(
            self.versions
                .all()
                .iter()
                .map(|h| (
                    format!("{}@{}", h.name(), h.handler.spec.version),
                    json!({"breaker": h.breaker.state().name(), "runtime": h.runtime.state()})
                ))
                .collect::<serde_json::Map<_, _>>()
        )
    }

    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        nats::ensure_streams(&self.nats.js, &self.settings.streams).await?;
        let leases = nats::ensure_lease_bucket(
            &self.nats.js,
            self.settings.worker.lease_ttl,
            self.settings.streams.replicas,
        )
        .await?;
        // Run every live version in the registry (ours registered first), and keep up with it.
        let registry = HandlerRegistry::open(&self.nats.js, self.settings.streams.replicas).await?;
        registry
            .register_all(&self.files)
            .await
            .context("registering handler files")?;
        self.versions.sync(&registry.snapshot().await?).await;
        self.versions.set_registry(registry.clone());
        let (registry_tx, mut registry_rx) = tokio::sync::watch::channel(Default::default());
        tokio::spawn(registry::follow(registry, registry_tx, shutdown.clone()));
        let versions = self.versions.clone();
        tokio::spawn(async move {
            while registry_rx.changed().await.is_ok() {
                let now = registry_rx.borrow_and_update().clone();
                versions.sync(&now).await;
            }
        });
        let done = nats::ensure_done_bucket(&self.nats.js, self.settings.streams.replicas).await?;
        let env = ExecutionEnv {
            done,
            nats: self.nats.clone(),
            worker_id: self.id.clone(),
            worker_limit: slots::PriorityGate::new(self.settings.worker.max_concurrency),
            ack_wait: self.settings.worker.ack_wait,
            versions: self.versions.clone(),
        };
        info!(worker = %self.id, handlers = self.versions.newest().len(), "worker started");
        let _gauges =
            grizzly_shared::metrics::metrics().on_scrape(handler_gauges(self.versions.clone()));
        let mut owned: HashMap<(String, u16), Owned> = HashMap::new();
        let mut tick = tokio::time::interval(self.settings.worker.lease_ttl / 3);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    if let Err(e) = self.balance(&leases, &env, &mut owned).await {
                        warn!(error = %e, "lease round failed");
                    }
                }
            }
        }
        // Drain: stop pulling, finish running tasks and started bundles (bounded), freeing each
        // partition as its runner is done. The leases are renewed meanwhile: a runner acts only
        // while its lease is surely its own, and one finishing a bundle can take longer than
        // a lease lives (its successor would run the bundle's done tasks again).
        info!(worker = %self.id, "draining");
        for o in owned.values() {
            o.stop.cancel();
        }
        let deadline = tokio::time::Instant::now() + self.settings.worker.drain_timeout;
        while !owned.is_empty() {
            let keys: Vec<(String, u16)> = owned.keys().cloned().collect();
            let finished = tokio::select! {
                (_, i, _) = futures::future::select_all(owned.values_mut().map(|o| &mut o.task)) => Some(i),
                _ = tick.tick() => None,
                _ = tokio::time::sleep_until(deadline) => {
                    warn!("drain deadline passed; unfinished tasks will be redelivered");
                    break;
                }
            };
            match finished {
                Some(i) => {
                    let (handler, partition) = &keys[i];
                    owned.remove(&keys[i]);
                    let _ = leases.delete(lease_key(handler, *partition)).await;
                }
                None => self.renew(&leases, &mut owned).await,
            }
        }
        let _ = leases.delete(format!("worker.{}", self.id)).await;
        for h in self.versions.all() {
            h.runtime.shutdown().await;
        }
        info!(worker = %self.id, "worker stopped");
        Ok(())
    }

    /// One lease round: heartbeat, renew, release surplus, claim up to the fair share.
    async fn balance(
        &self,
        leases: &kv::Store,
        env: &ExecutionEnv,
        owned: &mut HashMap<(String, u16), Owned>,
    ) -> anyhow::Result<()> {
        let newest = self.versions.newest();
        leases
            .put(
                format!("worker.{}", self.id),
                serde_json::to_vec(&self.heartbeat())?.into(),
            )
            .await?;
        let (live, held) = self.census(leases).await?;

        self.renew(leases, owned).await;
        // Released partitions whose tasks finished: give the lease back.
        let done: Vec<_> = owned
            .iter()
            .filter(|(_, o)| o.releasing && o.task.is_finished())
            .map(|(k, _)| k.clone())
            .collect();
        for (handler, partition) in done {
            owned.remove(&(handler.clone(), partition));
            let _ = leases.delete(lease_key(&handler, partition)).await;
        }

        let partitions = self.settings.partitions;
        for ctx in &newest {
            let name = ctx.name();
            let serving = live.get(name).map(Vec::as_slice).unwrap_or_default();
            let mine: Vec<u16> = owned
                .iter()
                .filter(|((h, _), o)| h == name && !o.releasing)
                .map(|((_, p), _)| *p)
                .collect();
            let (keep, fair) = grizzly_shared::task::fair_share(
                partitions,
                mine.len(),
                serving.iter().map(|w| {
                    held.get(&(name.to_string(), w.clone()))
                        .copied()
                        .unwrap_or(0)
                }),
                serving.len(),
            );
            if mine.len() > keep {
                for partition in mine.iter().skip(keep) {
                    if let Some(o) = owned.get_mut(&(name.to_string(), *partition)) {
                        info!(
                            handler = name,
                            partition, "releasing partition to rebalance"
                        );
                        o.releasing = true;
                        o.stop.cancel();
                    }
                }
                continue;
            }
            let mut have = mine.len();
            for partition in 0..partitions {
                if have >= fair {
                    break;
                }
                if owned.contains_key(&(name.to_string(), partition)) {
                    continue;
                }
                let asked = tokio::time::Instant::now();
                if let Ok(revision) = leases
                    .create(lease_key(name, partition), self.id.clone().into())
                    .await
                {
                    let stop = CancellationToken::new();
                    let fence = LeaseFence::new(asked + self.lease_margin());
                    let runner = PartitionRunner {
                        ctx: ctx.clone(),
                        env: env.clone(),
                        partition,
                        max_ack_pending: self.settings.worker.max_ack_pending,
                        fence: fence.clone(),
                    };
                    let task = tokio::spawn(runner.run(stop.clone()));
                    owned.insert(
                        (name.to_string(), partition),
                        Owned {
                            revision,
                            fence,
                            stop,
                            task,
                            releasing: false,
                        },
                    );
                    have += 1;
                }
            }
        }
        Ok(())
    }

    /// Renews every lease held; a failed renewal means someone else owns the partition now:
    /// its runner stops at once.
    async fn renew(&self, leases: &kv::Store, owned: &mut HashMap<(String, u16), Owned>) {
        let mut lost = Vec::new();
        for ((handler, partition), o) in owned.iter_mut() {
            let asked = tokio::time::Instant::now();
            match leases
                .update(
                    lease_key(handler, *partition),
                    self.id.clone().into(),
                    o.revision,
                )
                .await
            {
                Ok(rev) => {
                    o.revision = rev;
                    o.fence.extend(asked + self.lease_margin());
                }
                Err(e) => {
                    warn!(%handler, partition, error = %e, "lease lost");
                    o.stop.cancel();
                    lost.push((handler.clone(), *partition));
                }
            }
        }
        for key in lost {
            owned.remove(&key);
        }
    }

    fn lease_margin(&self) -> Duration {
        LeaseFence::margin(self.settings.worker.lease_ttl)
    }

    /// What other components learn about this worker: the handlers (and versions) it serves and
    /// which of them have an open circuit breaker.
    fn heartbeat(&self) -> serde_json::Value {
        let all = self.versions.all();
        let mut names: Vec<&str> = all.iter().map(|h| h.name()).collect();
        names.dedup();
        // A handler's breaker counts as open when every version's is.
        let open: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| {
                all.iter()
                    .filter(|h| h.name() == *n)
                    .all(|h| h.breaker.state().name() == "open")
            })
            .collect();
        let mut versions: serde_json::Map<String, serde_json::Value> = Default::default();
        for h in &all {
            let entry = versions
                .entry(h.name().to_string())
                .or_insert_with(|| json!([]));
            if let Some(list) = entry.as_array_mut() {
                list.push(json!(h.handler.spec.version));
            }
        }
        json!({"handlers": names, "versions": versions, "open_breakers": open})
    }

    /// The live workers serving each handler (from their heartbeats), and how many of the
    /// handler's partitions each worker holds (from the leases).
    async fn census(&self, leases: &kv::Store) -> anyhow::Result<(Serving, Held)> {
        let mut serving: Serving = HashMap::new();
        let mut held: Held = HashMap::new();
        let mut keys = leases.keys().await?;
        while let Some(key) = keys.next().await {
            let key = key?;
            if let Some(worker) = key.strip_prefix("worker.") {
                let Some(value) = leases.get(&key).await? else {
                    continue;
                };
                let beat: serde_json::Value = serde_json::from_slice(&value).unwrap_or_default();
                for h in beat["handlers"].as_array().into_iter().flatten() {
                    if let Some(h) = h.as_str() {
                        serving
                            .entry(h.to_string())
                            .or_default()
                            .push(worker.to_string());
                    }
                }
            } else if let Some(lease) = key.strip_prefix("task.")
                && let Some((handler, _)) = lease.rsplit_once('.')
                && let Some(owner) = leases.get(&key).await?
            {
                *held
                    .entry((
                        handler.to_string(),
                        String::from_utf8_lossy(&owner).into_owned(),
                    ))
                    .or_default() += 1;
            }
        }
        Ok((serving, held))
    }
}

/// Refreshes the per-handler gauges (breaker, pool) at scrape time.
fn handler_gauges(versions: Arc<VersionTable>) -> impl Fn() + Send + Sync + 'static {
    for h in versions.newest() {
        grizzly_shared::metrics::metrics().register_handler(h.name());
    }
    move || {
        let m = grizzly_shared::metrics::metrics();
        // Gauges are per handler: the newest version's runtime stands for it.
        for h in &versions.newest() {
            m.set_breaker_open(h.name(), h.breaker.state().name() == "open");
            let pool = h.runtime.state();
            let n = |key: &str| pool[key].as_u64().unwrap_or(0);
            if pool.is_object() {
                m.set_pool(h.name(), n("busy"), n("idle"), n("max"));
            }
        }
    }
}

/// Handler → the live workers serving it.
type Serving = HashMap<String, Vec<String>>;
/// (handler, worker) → partitions of the handler the worker holds.
type Held = HashMap<(String, String), usize>;

fn lease_key(handler: &str, partition: u16) -> String {
    format!("task.{handler}.{partition}")
}

/// KV keys allow `[-/_=.a-zA-Z0-9]`.
fn sanitize(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Lease timing in one place for tests and docs.
pub fn lease_renewal(settings: &Settings) -> Duration {
    settings.worker.lease_ttl / 3
}
