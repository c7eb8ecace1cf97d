//! Layered settings: defaults → config file (TOML/YAML) → `GRIZZLY_*` environment → flags.
//!
//! Environment names are the keys upper-cased with `GRIZZLY_` in front; nested keys use `__`
//! (e.g. `GRIZZLY_NATS_URL`, `GRIZZLY_WORKER__MAX_CONCURRENCY`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration: {field}: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
}

/// How the broker's streams are sized and replicated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSettings {
    /// Replicas of every stream (3 in a production cluster).
    pub replicas: usize,
    /// Explicit limits: a full log refuses new writes instead of dropping old events.
    pub events_max_bytes: i64,
    #[serde(with = "humantime_serde")]
    pub events_max_age: Duration,
    pub tasks_max_bytes: i64,
    pub dlq_max_bytes: i64,
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            replicas: 1,
            events_max_bytes: 8 * 1024 * 1024 * 1024,
            events_max_age: Duration::from_secs(30 * 24 * 3600),
            tasks_max_bytes: 2 * 1024 * 1024 * 1024,
            dlq_max_bytes: 1024 * 1024 * 1024,
            duplicate_window: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Stable identity (defaults to host + pid); used for partition leases.
    pub id: Option<String>,
    /// Worker-wide cap on handler invocations running at once, across handlers.
    pub max_concurrency: usize,
    /// Broker redelivers a task not acked (or progress-acked) within this time.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// A partition lease not renewed within this time passes to another worker.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Tasks a partition may have delivered but not yet acked.
    pub max_ack_pending: i64,
    /// Program used by `claude` handlers.
    pub claude_bin: String,
    /// Program used as the MCP server that gives agents `emit_event` (normally `grizzly`).
    pub mcp_bin: Option<String>,
    /// Drain deadline on shutdown.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Environment added to every handler process (e.g. `ANTHROPIC_BASE_URL`).
    pub handler_env: std::collections::BTreeMap<String, String>,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            id: None,
            max_concurrency: 64,
            ack_wait: Duration::from_secs(30),
            lease_ttl: Duration::from_secs(6),
            max_ack_pending: 2048,
            claude_bin: "claude".into(),
            mcp_bin: None,
            drain_timeout: Duration::from_secs(30),
            handler_env: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerSettings {
    /// Stable identity (defaults to host + pid + a random suffix); owns listener partitions.
    pub id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub nats_url: String,
    pub handlers_dir: PathBuf,
    pub workflows_dir: PathBuf,
    /// Task partitions per handler; fixed for the life of a deployment.
    pub partitions: u16,
    /// Largest event body accepted; larger ones are dead-lettered with the reason.
    pub max_event_bytes: usize,
    /// `text` or `json`.
    pub log_format: String,
    /// Log filter (`GRIZZLY_LOG`), `tracing` EnvFilter syntax.
    pub log: String,
    /// Where `/metrics`, `/healthz`, `/readyz` and `/debug/pprof` are served (`host:port`;
    /// port 0 picks a free one). `grizzly dev` uses 127.0.0.1:9090 unless this is changed.
    pub metrics_addr: String,
    pub streams: StreamSettings,
    pub worker: WorkerSettings,
    pub listener: ListenerSettings,
}

/// Default of `metrics_addr` (the port the Kubernetes probes and scrape config use).
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9090";

impl Default for Settings {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            handlers_dir: "handlers".into(),
            workflows_dir: "workflows".into(),
            partitions: 8,
            max_event_bytes: 256 * 1024,
            log_format: "text".into(),
            log: "info".into(),
            metrics_addr: DEFAULT_METRICS_ADDR.into(),
            streams: StreamSettings::default(),
            worker: WorkerSettings::default(),
            listener: ListenerSettings::default(),
        }
    }
}

impl Settings {
    /// Loads defaults → `file` (or `$GRIZZLY_CONFIG`) → `GRIZZLY_*` env → `overrides`
    /// (`(key, value)` pairs from flags, e.g. `("nats_url", "nats://..")`), then validates.
    pub fn load(file: Option<&Path>, overrides: &[(&str, String)]) -> Result<Self, ConfigError> {
        let env_file = std::env::var_os("GRIZZLY_CONFIG").map(PathBuf::from);
        let file = file.map(Path::to_path_buf).or(env_file);
        let mut builder =
            config::Config::builder().add_source(config::Config::try_from(&Settings::default())?);
        if let Some(file) = &file {
            builder = builder.add_source(config::File::from(file.as_path()).required(true));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("GRIZZLY")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(settings_env())),
        );
        for (key, value) in overrides {
            builder = builder.set_override(*key, value.as_str())?;
        }
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, problem: &str| {
            Err(ConfigError::Invalid {
                field,
                problem: problem.to_string(),
            })
        };
        if !(self.nats_url.starts_with("nats://") || self.nats_url.starts_with("tls://")) {
            return invalid("nats_url", "must start with nats:// or tls://");
        }
        if self.partitions == 0 {
            return invalid("partitions", "must be at least 1");
        }
        if self.max_event_bytes == 0 {
            return invalid("max_event_bytes", "must be greater than zero");
        }
        if self.worker.max_concurrency == 0 {
            return invalid("worker.max_concurrency", "must be at least 1");
        }
        if self.worker.ack_wait < Duration::from_secs(1) {
            return invalid("worker.ack_wait", "must be at least 1s");
        }
        if self.worker.lease_ttl < Duration::from_millis(500) {
            return invalid("worker.lease_ttl", "must be at least 500ms");
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return invalid("log_format", "must be `text` or `json`");
        }
        if self.metrics_addr.parse::<std::net::SocketAddr>().is_err() {
            return invalid(
                "metrics_addr",
                "must be an IP address and port, e.g. 0.0.0.0:9090 or 127.0.0.1:0",
            );
        }
        if self.streams.replicas == 0 || self.streams.replicas > 5 {
            return invalid("streams.replicas", "must be between 1 and 5");
        }
        Ok(())
    }

    /// Log filter (`tracing` EnvFilter syntax), e.g. `info` or `info,grizzly_worker=debug`.
    pub fn log_filter(&self) -> &str {
        &self.log
    }

    /// This listener replica's identity. The random part keeps replicas in one process (tests,
    /// `grizzly dev`) and a restarted pod apart.
    pub fn listener_id(&self) -> String {
        self.listener.id.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
            let unique = uuid::Uuid::now_v7().simple().to_string();
            format!(
                "{host}-{}-{}",
                std::process::id(),
                &unique[unique.len() - 6..]
            )
        })
    }

    /// This worker's identity.
    pub fn worker_id(&self) -> String {
        self.worker.id.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

/// `GRIZZLY_*` variables that are not settings (tool locations, per-process plumbing).
const NOT_SETTINGS: &[&str] = &[
    "GRIZZLY_CONFIG",
    "GRIZZLY_NATS_SERVER",
    "GRIZZLY_NATS_SERVER_VERSION",
    "GRIZZLY_CLAUDE_BIN",
    "GRIZZLY_CLAUDE_CODE_VERSION",
    "GRIZZLY_TURN_FILE",
    // Test-suite switches (the fault suite's soak mode), seen by components it starts.
    "GRIZZLY_SOAK",
];

/// The environment as the settings see it: every `GRIZZLY_*` variable except [`NOT_SETTINGS`]
/// (an unknown one is still an error, naming it).
fn settings_env() -> config::Map<String, String> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("GRIZZLY_") && !NOT_SETTINGS.contains(&k.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("grizzly.toml");
        std::fs::write(&file, "partitions = 4\n[worker]\nmax_concurrency = 7\n").unwrap();
        let s = Settings::load(Some(&file), &[("partitions", "3".into())]).unwrap();
        assert_eq!(s.partitions, 3, "flag beats file");
        assert_eq!(s.worker.max_concurrency, 7, "file beats default");
        assert_eq!(s.worker.ack_wait, Duration::from_secs(30), "default kept");
    }

    #[test]
    fn invalid_values_name_the_field() {
        let err = Settings::load(None, &[("partitions", "0".into())]).unwrap_err();
        assert!(err.to_string().contains("partitions"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("grizzly.toml");
        std::fs::write(&file, "bogus = 1\n").unwrap();
        let err = Settings::load(Some(&file), &[]).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }
}

/// Flags every component binary takes; they override file and environment.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ComponentArgs {
    /// Config file (TOML or YAML); also `GRIZZLY_CONFIG`.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Broker URL; also `GRIZZLY_NATS_URL` (default nats://127.0.0.1:4222).
    #[arg(long, value_name = "URL")]
    pub nats_url: Option<String>,
    /// Handler definitions directory (default ./handlers).
    #[arg(long, value_name = "DIR")]
    pub handlers: Option<PathBuf>,
    /// Workflow definitions directory (default ./workflows).
    #[arg(long, value_name = "DIR")]
    pub workflows: Option<PathBuf>,
}

impl ComponentArgs {
    pub fn load(&self) -> Result<Settings, ConfigError> {
        let mut overrides = Vec::new();
        if let Some(url) = &self.nats_url {
            overrides.push(("nats_url", url.clone()));
        }
        if let Some(dir) = &self.handlers {
            overrides.push(("handlers_dir", dir.display().to_string()));
        }
        if let Some(dir) = &self.workflows {
            overrides.push(("workflows_dir", dir.display().to_string()));
        }
        Settings::load(self.config.as_deref(), &overrides)
    }
}
