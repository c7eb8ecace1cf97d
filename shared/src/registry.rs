//! The handler registry: every registered version of every handler, in KV bucket
//! `grizzly_handlers`. Listeners route from it and workers run from it, so a version registered
//! at run time (`grizzly handler register`) is picked up by every replica without a restart.
//!
//! - `<handler>.v<version>` → [`HandlerRecord`]: the handler file's text, its prompt, its state.
//! - `<handler>.pin` → the version new events go to (default: the newest active version).
//!
//! A version is immutable: registering it again with other content is refused (give the changed
//! file a new `version`). Components register their handler files at start; the same content
//! again changes nothing, so a restart does not revive a retired version.
//!
//! States: `active` (routed, run) → `draining` (not routed; tasks already routed to it still
//! run on it) → `retired` (workers drop it). `grizzly handler retire` drains first and waits
//! until no task of the version is left in `TASKS`.

use crate::clock::now_ms;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_nats::jetstream::{self, kv};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::handler::{HandlerFileError, HandlerSpec, LoadedHandler, yaml_message};

pub const HANDLERS_BUCKET: &str = "grizzly_handlers";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionState {
    Active,
    Draining,
    Retired,
}

impl std::fmt::Display for VersionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Active => "active",
            Self::Draining => "draining",
            Self::Retired => "retired",
        })
    }
}

/// One registered handler version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandlerRecord {
    pub name: String,
    pub version: u32,
    pub state: VersionState,
    /// Where it was registered from; relative `command` paths resolve against its directory
    /// when that exists on the worker, else against the worker's handlers directory.
    pub path: PathBuf,
    /// The handler file's text.
    pub source: String,
    pub prompt_template: Option<String>,
    /// SHA-256 of `source` and `prompt_template`: what makes two registrations the same.
    pub digest: String,
    pub registered_at_ms: u64,
    pub changed_at_ms: u64,
}

impl HandlerRecord {
    pub fn from_loaded(h: &LoadedHandler) -> Self {
        let now = now_ms();
        Self {
            name: h.spec.name.clone(),
            version: h.spec.version,
            state: VersionState::Active,
            path: h.path.clone(),
            source: h.source.clone(),
            prompt_template: h.prompt_template.clone(),
            digest: digest(&h.source, h.prompt_template.as_deref()),
            registered_at_ms: now,
            changed_at_ms: now,
        }
    }

    /// The handler this record describes, as a worker or listener runs it.
    pub fn handler(&self, handlers_dir: &Path) -> Result<LoadedHandler, HandlerFileError> {
        let error = |line, column, message| HandlerFileError {
            path: self.path.clone(),
            line,
            column,
            message,
        };
        let spec: HandlerSpec = serde_saphyr::from_str(&self.source).map_err(|e| {
            let loc = e.location();
            error(
                loc.map(|l| l.line()),
                loc.map(|l| l.column()),
                yaml_message(&e.to_string()),
            )
        })?;
        if let Some(problem) = spec.validate().into_iter().next() {
            return Err(error(None, None, problem));
        }
        let local = self.path.parent().is_some_and(Path::is_dir);
        let path = if local {
            self.path.clone()
        } else {
            handlers_dir.join(self.path.file_name().unwrap_or_default())
        };
        Ok(LoadedHandler {
            spec,
            path,
            prompt_template: self.prompt_template.clone(),
            source: self.source.clone(),
        })
    }

    fn key(&self) -> String {
        version_key(&self.name, self.version)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "handler `{name}` version {version} is already registered with different content; \
         give the changed handler a new `version` (versions are immutable)"
    )]
    Conflict { name: String, version: u32 },
    #[error("handler `{name}` is not registered")]
    UnknownHandler { name: String },
    #[error("handler `{name}` has no version {version} (registered: {registered})")]
    UnknownVersion {
        name: String,
        version: u32,
        registered: String,
    },
    #[error("handler `{name}` version {version} is {from}: cannot {action} it")]
    IllegalState {
        name: String,
        version: u32,
        from: VersionState,
        action: &'static str,
    },
    #[error(
        "handler `{name}` version {version} is its only active version: draining it would leave \
         its events without a handler (register a newer version first, or pass --force)"
    )]
    LastActive { name: String, version: u32 },
    #[error("handler registry (KV {HANDLERS_BUCKET}): {0}")]
    Kv(String),
}

fn kv_error(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Kv(e.to_string())
}

/// What a registration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    New,
    /// The same content was registered before; its state is kept.
    Unchanged(VersionState),
}

/// Everything registered, read at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RegistrySnapshot {
    pub handlers: BTreeMap<String, BTreeMap<u32, HandlerRecord>>,
    pub pins: BTreeMap<String, u32>,
}

impl RegistrySnapshot {
    /// The version new events of `name` go to: the pinned one while it is active, else the
    /// newest active one.
    pub fn routing_version(&self, name: &str) -> Option<&HandlerRecord> {
        let versions = self.handlers.get(name)?;
        let active = |r: &&HandlerRecord| r.state == VersionState::Active;
        self.pins
            .get(name)
            .and_then(|v| versions.get(v))
            .filter(active)
            .or_else(|| versions.values().rev().find(active))
    }

    /// One record per routed handler.
    pub fn routed(&self) -> Vec<&HandlerRecord> {
        self.handlers
            .keys()
            .filter_map(|name| self.routing_version(name))
            .collect()
    }

    /// Every version that may still have tasks to run (active or draining).
    pub fn live(&self) -> impl Iterator<Item = &HandlerRecord> {
        self.handlers
            .values()
            .flat_map(|vs| vs.values())
            .filter(|r| r.state != VersionState::Retired)
    }

    pub fn get(&self, name: &str, version: u32) -> Option<&HandlerRecord> {
        self.handlers.get(name)?.get(&version)
    }
}

/// The registry bucket and the operations on it.
#[derive(Clone)]
pub struct HandlerRegistry {
    store: kv::Store,
}

impl HandlerRegistry {
    /// Opens (creating if needed) the bucket.
    pub async fn open(js: &jetstream::Context, replicas: usize) -> Result<Self, RegistryError> {
        let store = js
            .create_or_update_key_value(kv::Config {
                bucket: HANDLERS_BUCKET.into(),
                description: "Grizzly handler registry: versions and their state".into(),
                history: 5,
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(kv_error)?;
        Ok(Self { store })
    }

    /// Registers a handler version; the same content again is a no-op that keeps its state.
    pub async fn register(&self, h: &LoadedHandler) -> Result<Registered, RegistryError> {
        let record = HandlerRecord::from_loaded(h);
        let bytes = serde_json::to_vec(&record).expect("record serializes");
        loop {
            match self.store.create(record.key(), bytes.clone().into()).await {
                Ok(_) => return Ok(Registered::New),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    let Some((existing, _)) = self.read(&record.name, record.version).await? else {
                        continue; // deleted in between: create again
                    };
                    return if existing.digest == record.digest {
                        Ok(Registered::Unchanged(existing.state))
                    } else {
                        Err(RegistryError::Conflict {
                            name: record.name,
                            version: record.version,
                        })
                    };
                }
                Err(e) => return Err(kv_error(e)),
            }
        }
    }

    /// Registers every handler; stops at the first conflict.
    pub async fn register_all(&self, handlers: &[LoadedHandler]) -> Result<(), RegistryError> {
        for h in handlers {
            self.register(h).await?;
        }
        Ok(())
    }

    async fn read(
        &self,
        name: &str,
        version: u32,
    ) -> Result<Option<(HandlerRecord, u64)>, RegistryError> {
        match self
            .store
            .entry(version_key(name, version))
            .await
            .map_err(kv_error)?
        {
            Some(e) if e.operation == kv::Operation::Put => {
                let record = serde_json::from_slice(&e.value).map_err(kv_error)?;
                Ok(Some((record, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Reads the whole registry.
    pub async fn snapshot(&self) -> Result<RegistrySnapshot, RegistryError> {
        let mut snapshot = RegistrySnapshot::default();
        let mut keys = self.store.keys().await.map_err(kv_error)?;
        while let Some(key) = keys.next().await {
            let key = key.map_err(kv_error)?;
            let Some(value) = self.store.get(&key).await.map_err(kv_error)? else {
                continue;
            };
            if let Some(name) = key.strip_suffix(".pin") {
                if let Ok(v) = std::str::from_utf8(&value).unwrap_or("").parse() {
                    snapshot.pins.insert(name.to_string(), v);
                }
            } else if let Ok(record) = serde_json::from_slice::<HandlerRecord>(&value) {
                snapshot
                    .handlers
                    .entry(record.name.clone())
                    .or_default()
                    .insert(record.version, record);
            }
        }
        Ok(snapshot)
    }

    /// One record, or why there is none.
    pub async fn record(&self, name: &str, version: u32) -> Result<HandlerRecord, RegistryError> {
        match self.read(name, version).await? {
            Some((r, _)) => Ok(r),
            None => Err(self.unknown(name, version).await),
        }
    }

    async fn unknown(&self, name: &str, version: u32) -> RegistryError {
        let registered: Vec<String> = match self.snapshot().await {
            Ok(s) => s
                .handlers
                .get(name)
                .map(|vs| vs.keys().map(u32::to_string).collect())
                .unwrap_or_default(),
            Err(e) => return e,
        };
        if registered.is_empty() {
            RegistryError::UnknownHandler { name: name.into() }
        } else {
            RegistryError::UnknownVersion {
                name: name.into(),
                version,
                registered: registered.join(", "),
            }
        }
    }

    /// Stops routing new events to a version; tasks already routed to it still run on it.
    /// Refused for the only active version unless `force`.
    pub async fn drain(
        &self,
        name: &str,
        version: u32,
        force: bool,
    ) -> Result<HandlerRecord, RegistryError> {
        if !force {
            let snapshot = self.snapshot().await?;
            let others_active = snapshot.handlers.get(name).is_some_and(|vs| {
                vs.values()
                    .any(|r| r.version != version && r.state == VersionState::Active)
            });
            let this_active = snapshot
                .get(name, version)
                .is_some_and(|r| r.state == VersionState::Active);
            if this_active && !others_active {
                return Err(RegistryError::LastActive {
                    name: name.into(),
                    version,
                });
            }
        }
        self.transition(name, version, "drain", |s| match s {
            VersionState::Active | VersionState::Draining => Some(VersionState::Draining),
            VersionState::Retired => None,
        })
        .await
    }

    /// Routes new events to a draining version again.
    pub async fn activate(&self, name: &str, version: u32) -> Result<HandlerRecord, RegistryError> {
        self.transition(name, version, "activate", |s| match s {
            VersionState::Active | VersionState::Draining => Some(VersionState::Active),
            VersionState::Retired => None,
        })
        .await
    }

    /// Marks a drained version retired: workers drop it. Callers make sure no task of it is
    /// left first (see `grizzly handler retire`).
    pub async fn mark_retired(
        &self,
        name: &str,
        version: u32,
    ) -> Result<HandlerRecord, RegistryError> {
        self.transition(name, version, "retire", |s| match s {
            VersionState::Draining | VersionState::Retired => Some(VersionState::Retired),
            VersionState::Active => None,
        })
        .await
    }

    /// Compare-and-set of a version's state.
    async fn transition(
        &self,
        name: &str,
        version: u32,
        action: &'static str,
        next: impl Fn(VersionState) -> Option<VersionState>,
    ) -> Result<HandlerRecord, RegistryError> {
        loop {
            let Some((mut record, revision)) = self.read(name, version).await? else {
                return Err(self.unknown(name, version).await);
            };
            let Some(to) = next(record.state) else {
                return Err(RegistryError::IllegalState {
                    name: name.into(),
                    version,
                    from: record.state,
                    action,
                });
            };
            if to == record.state {
                return Ok(record);
            }
            record.state = to;
            record.changed_at_ms = now_ms();
            let bytes = serde_json::to_vec(&record).expect("record serializes");
            match self
                .store
                .update(record.key(), bytes.into(), revision)
                .await
            {
                Ok(_) => return Ok(record),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(kv_error(e)),
            }
        }
    }

    /// Sends new events of `name` to `version` (`None`: back to the newest active version).
    pub async fn pin(&self, name: &str, version: Option<u32>) -> Result<(), RegistryError> {
        let key = format!("{name}.pin");
        match version {
            Some(v) => {
                let record = self.record(name, v).await?;
                if record.state != VersionState::Active {
                    return Err(RegistryError::IllegalState {
                        name: name.into(),
                        version: v,
                        from: record.state,
                        action: "pin",
                    });
                }
                self.store
                    .put(key, v.to_string().into())
                    .await
                    .map_err(kv_error)?;
            }
            None => {
                self.store.delete(key).await.map_err(kv_error)?;
            }
        }
        Ok(())
    }

    /// Fires (with no payload) whenever anything in the registry changes.
    pub async fn changes(
        &self,
    ) -> Result<impl futures::Stream<Item = ()> + Send + use<>, RegistryError> {
        let watch = self.store.watch_all().await.map_err(kv_error)?;
        Ok(watch.map(|_| ()))
    }
}

/// Keeps `tx` up to date with the registry until `stop`: every replica sees a registration or a
/// state change within moments, without a restart.
pub async fn follow(
    registry: HandlerRegistry,
    tx: tokio::sync::watch::Sender<RegistrySnapshot>,
    stop: tokio_util::sync::CancellationToken,
) {
    use futures::FutureExt as _;
    while !stop.is_cancelled() {
        let mut changes = match registry.changes().await {
            Ok(c) => Box::pin(c),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the handler registry; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                }
            }
        };
        // The watch reports changes from now on: read once first, so a change made between the
        // caller's snapshot and this watch is not missed.
        let mut read = true;
        loop {
            if !read {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    next = changes.next() => {
                        if next.is_none() {
                            break; // the watch ended (e.g. reconnect): open a new one
                        }
                    }
                }
            }
            read = false;
            // One read for a burst of changes.
            while let Some(Some(())) = changes.next().now_or_never() {}
            match registry.snapshot().await {
                Ok(now) => {
                    tx.send_if_modified(|current| {
                        let changed = *current != now;
                        *current = now;
                        changed
                    });
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the handler registry"),
            }
        }
    }
}

fn version_key(name: &str, version: u32) -> String {
    format!("{name}.v{version}")
}

fn digest(source: &str, prompt: Option<&str>) -> String {
    let mut h = Sha256::new();
    h.update(source.as_bytes());
    h.update([0]);
    h.update(prompt.unwrap_or("").as_bytes());
    h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, version: u32, state: VersionState) -> HandlerRecord {
        HandlerRecord {
            name: name.into(),
            version,
            state,
            path: PathBuf::from("h.yaml"),
            source: String::new(),
            prompt_template: None,
            digest: String::new(),
            registered_at_ms: 0,
            changed_at_ms: 0,
        }
    }

    #[test]
    fn new_events_go_to_the_pinned_or_else_the_newest_active_version() {
        let mut s = RegistrySnapshot::default();
        let vs = s.handlers.entry("h".into()).or_default();
        vs.insert(1, record("h", 1, VersionState::Active));
        vs.insert(2, record("h", 2, VersionState::Active));
        vs.insert(3, record("h", 3, VersionState::Draining));
        assert_eq!(s.routing_version("h").unwrap().version, 2);
        s.pins.insert("h".into(), 1);
        assert_eq!(s.routing_version("h").unwrap().version, 1);
        // A pin to a version that is not active is ignored.
        s.pins.insert("h".into(), 3);
        assert_eq!(s.routing_version("h").unwrap().version, 2);
        assert_eq!(s.live().count(), 3);
        s.handlers.get_mut("h").unwrap().get_mut(&2).unwrap().state = VersionState::Retired;
        s.handlers.get_mut("h").unwrap().get_mut(&1).unwrap().state = VersionState::Draining;
        assert!(s.routing_version("h").is_none());
        assert!(s.routing_version("other").is_none());
    }
}
