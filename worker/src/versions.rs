//! The handler versions a worker can run: every live (active or draining) version in the handler
//! registry, each with its own runtime, breaker and concurrency limit. A task runs on the
//! version it was routed to, so in-flight work of a draining version finishes on that version
//! while new events already go to the newest one. Retired versions are dropped (their runtime
//! shut down).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use grizzly_shared::Settings;
use grizzly_shared::handler::LoadedHandler;
use grizzly_shared::registry::{HandlerRegistry, RegistrySnapshot, VersionState};
use tracing::{info, warn};

use crate::breaker::Breaker;
use crate::executor::HandlerContext;
use crate::slots::PriorityGate;

/// Builds what the worker keeps for one handler version.
pub fn context_for(h: &LoadedHandler, settings: &Settings) -> anyhow::Result<Arc<HandlerContext>> {
    Ok(Arc::new(HandlerContext {
        runtime: crate::runtime_for(h, settings)
            .with_context(|| format!("handler {} version {}", h.spec.name, h.spec.version))?,
        breaker: Breaker::new(h.spec.breaker.clone()),
        limit: PriorityGate::new(h.spec.concurrency),
        recent_starts: Default::default(),
        handler: h.clone(),
    }))
}

type Versions = BTreeMap<String, BTreeMap<u32, Arc<HandlerContext>>>;

pub struct VersionTable {
    settings: Settings,
    versions: RwLock<Versions>,
    registry: tokio::sync::OnceCell<HandlerRegistry>,
}

impl VersionTable {
    pub fn new(settings: Settings, contexts: Vec<Arc<HandlerContext>>) -> Self {
        let mut versions = Versions::new();
        for c in contexts {
            versions
                .entry(c.name().to_string())
                .or_default()
                .insert(c.handler.spec.version, c);
        }
        Self {
            settings,
            versions: RwLock::new(versions),
            registry: Default::default(),
        }
    }

    pub fn set_registry(&self, registry: HandlerRegistry) {
        let _ = self.registry.set(registry);
    }

    pub fn get(&self, name: &str, version: u32) -> Option<Arc<HandlerContext>> {
        self.versions
            .read()
            .expect("versions lock")
            .get(name)?
            .get(&version)
            .cloned()
    }

    /// The newest version of each handler: partition runners start with it, and its
    /// `concurrency` bounds the handler's tasks on this worker.
    pub fn newest(&self) -> Vec<Arc<HandlerContext>> {
        self.versions
            .read()
            .expect("versions lock")
            .values()
            .filter_map(|vs| vs.values().next_back().cloned())
            .collect()
    }

    pub fn all(&self) -> Vec<Arc<HandlerContext>> {
        self.versions
            .read()
            .expect("versions lock")
            .values()
            .flat_map(|vs| vs.values().cloned())
            .collect()
    }

    /// The context for a task's version; a version this worker has not loaded yet (registered
    /// moments ago) is read from the registry. `Err` says why it cannot run here.
    pub async fn resolve(&self, name: &str, version: u32) -> Result<Arc<HandlerContext>, String> {
        if let Some(c) = self.get(name, version) {
            return Ok(c);
        }
        let Some(registry) = self.registry.get() else {
            return Err(format!("handler `{name}` version {version} is not loaded"));
        };
        let record = registry
            .record(name, version)
            .await
            .map_err(|e| e.to_string())?;
        if record.state == VersionState::Retired {
            return Err(format!(
                "handler `{name}` version {version} is retired; redrive the task to run it on the current version"
            ));
        }
        let handler = record
            .handler(&self.settings.handlers_dir)
            .map_err(|e| e.to_string())?;
        let ctx = context_for(&handler, &self.settings).map_err(|e| format!("{e:#}"))?;
        Ok(self.insert(ctx))
    }

    /// Inserts unless another task loaded the same version first; returns the one kept.
    fn insert(&self, ctx: Arc<HandlerContext>) -> Arc<HandlerContext> {
        let mut versions = self.versions.write().expect("versions lock");
        versions
            .entry(ctx.name().to_string())
            .or_default()
            .entry(ctx.handler.spec.version)
            .or_insert(ctx)
            .clone()
    }

    /// Loads versions the registry gained and drops the ones it retired.
    pub async fn sync(&self, snapshot: &RegistrySnapshot) {
        for record in snapshot.live() {
            if self.get(&record.name, record.version).is_some() {
                continue;
            }
            let loaded = record
                .handler(&self.settings.handlers_dir)
                .map_err(anyhow::Error::from)
                .and_then(|h| context_for(&h, &self.settings));
            match loaded {
                Ok(ctx) => {
                    info!(handler = %record.name, version = record.version, "handler version loaded");
                    self.insert(ctx);
                }
                Err(e) => {
                    warn!(handler = %record.name, version = record.version, error = %format!("{e:#}"), "handler version does not load")
                }
            }
        }
        let retired: Vec<Arc<HandlerContext>> = {
            let mut versions = self.versions.write().expect("versions lock");
            let mut gone = Vec::new();
            for (name, vs) in versions.iter_mut() {
                vs.retain(|v, ctx| {
                    let keep = snapshot
                        .get(name, *v)
                        .is_none_or(|r| r.state != VersionState::Retired);
                    if !keep {
                        gone.push(ctx.clone());
                    }
                    keep
                });
            }
            versions.retain(|_, vs| !vs.is_empty());
            gone
        };
        for ctx in retired {
            info!(handler = %ctx.name(), version = ctx.handler.spec.version, "handler version retired");
            ctx.runtime.shutdown().await;
        }
    }
}
