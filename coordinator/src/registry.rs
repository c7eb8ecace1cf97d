//! Workflow versions. New instances start on the newest version loaded from `workflows/`; a
//! version is pinned in KV `grizzly_workflows` (key `<name>.v<version>`, the source text and its
//! digest) when its first instance starts, and from then on every coordinator runs that exact
//! text for it — editing or deleting the file changes nothing for instances already started.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::dsl::{Catalog, LoadedWorkflow, digest, parse_workflow};

pub const WORKFLOWS_BUCKET: &str = "grizzly_workflows";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PinnedVersion {
    pub name: String,
    pub version: u32,
    pub digest: String,
    pub path: String,
    pub source: String,
}

pub fn pin_key(name: &str, version: u32) -> String {
    format!("{name}.v{version}")
}

pub async fn ensure_bucket(js: &jetstream::Context, replicas: usize) -> anyhow::Result<kv::Store> {
    Ok(grizzly_shared::nats::ensure_bucket(
        js,
        WORKFLOWS_BUCKET,
        "Grizzly workflow versions, immutable once an instance ran them",
        std::time::Duration::ZERO,
        replicas,
    )
    .await?)
}

pub struct Registry {
    /// Loaded from disk: (name, version) → workflow.
    disk: BTreeMap<(String, u32), Arc<LoadedWorkflow>>,
    /// Replaced whole when the handler registry changes (see [`Registry::set_handlers`]).
    catalog: std::sync::RwLock<Arc<Catalog>>,
    kv: kv::Store,
    pinned: Mutex<HashMap<(String, u32), Arc<LoadedWorkflow>>>,
}

impl Registry {
    pub fn new(workflows: Vec<LoadedWorkflow>, mut catalog: Catalog, kv: kv::Store) -> Self {
        let mut disk = BTreeMap::new();
        for w in workflows {
            catalog.add_workflow(w.name(), w.version());
            disk.insert((w.name().to_string(), w.version()), Arc::new(w));
        }
        Self {
            disk,
            catalog: std::sync::RwLock::new(Arc::new(catalog)),
            kv,
            pinned: Mutex::new(HashMap::new()),
        }
    }

    /// What steps resolve against now: handler versions and capabilities, workflow versions.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.read().expect("catalog lock").clone()
    }

    /// Follows the handler registry: steps started from now on call the versions it routes new
    /// events to (a version registered or pinned at run time included).
    pub fn set_handlers(&self, handlers: &[grizzly_shared::handler::LoadedHandler]) {
        let mut next = Catalog::from_handlers(handlers);
        let mut catalog = self.catalog.write().expect("catalog lock");
        next.workflows = catalog.workflows.clone();
        *catalog = Arc::new(next);
    }

    /// The newest version of each workflow on disk.
    pub fn latest(&self) -> impl Iterator<Item = &Arc<LoadedWorkflow>> {
        let mut newest: BTreeMap<&str, &Arc<LoadedWorkflow>> = BTreeMap::new();
        for ((name, _), w) in &self.disk {
            newest.insert(name, w);
        }
        newest.into_values()
    }

    /// How many versions are pinned here so far. It only grows (the files are read once), and
    /// [`Self::subscriptions`] changes only when it does.
    pub fn pinned_count(&self) -> usize {
        self.pinned.lock().expect("registry lock").len()
    }

    /// Subject patterns of every known version (triggers and waits).
    pub fn subscriptions(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .disk
            .values()
            .flat_map(|w| w.spec.subscriptions())
            .collect();
        for w in self.pinned.lock().expect("registry lock").values() {
            all.extend(w.spec.subscriptions());
        }
        all
    }

    /// The version a new instance of `name` runs (`version` or the newest), pinned.
    pub async fn for_start(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Arc<LoadedWorkflow>, String> {
        let version = match version {
            Some(v) => v,
            None => *self
                .catalog()
                .workflows
                .get(name)
                .ok_or_else(|| format!("unknown workflow `{name}`"))?,
        };
        self.get(name, version).await
    }

    /// The pinned text of a version (pinning it now if it is on disk and not pinned yet).
    pub async fn get(&self, name: &str, version: u32) -> Result<Arc<LoadedWorkflow>, String> {
        let key = (name.to_string(), version);
        if let Some(w) = self.pinned.lock().expect("registry lock").get(&key) {
            return Ok(w.clone());
        }
        let kv_key = pin_key(name, version);
        let mut stored = self
            .kv
            .get(&kv_key)
            .await
            .map_err(|e| format!("reading {WORKFLOWS_BUCKET}: {e}"))?;
        if stored.is_none() {
            let Some(w) = self.disk.get(&key) else {
                return Err(format!("unknown workflow `{name}` version {version}"));
            };
            let record = PinnedVersion {
                name: name.to_string(),
                version,
                digest: w.digest.clone(),
                path: w.path.display().to_string(),
                source: w.source.clone(),
            };
            let bytes = serde_json::to_vec(&record).expect("serializes");
            // Another replica may pin first: then its copy is the one.
            let _ = self.kv.create(&kv_key, bytes.into()).await;
            stored = self
                .kv
                .get(&kv_key)
                .await
                .map_err(|e| format!("reading {WORKFLOWS_BUCKET}: {e}"))?;
        }
        let record: PinnedVersion = stored
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| format!("workflow `{name}` version {version} is not pinned"))?;
        let loaded = match self.disk.get(&key) {
            Some(w) if w.digest == record.digest => w.clone(),
            other => {
                if other.is_some() {
                    warn!(
                        workflow = name,
                        version,
                        "the file differs from the version instances already run; the pinned text is used (bump `version` to change a workflow)"
                    );
                }
                let spec = parse_workflow(std::path::Path::new(&record.path), &record.source)
                    .map_err(|e| format!("pinned workflow `{name}` v{version}: {e:?}"))?;
                Arc::new(LoadedWorkflow {
                    spec,
                    path: record.path.clone().into(),
                    digest: digest(&record.source),
                    source: record.source,
                })
            }
        };
        self.pinned
            .lock()
            .expect("registry lock")
            .insert(key, loaded.clone());
        Ok(loaded)
    }
}
