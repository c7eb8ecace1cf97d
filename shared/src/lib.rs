//! Grizzly's shared library: the single source of truth for anything two binaries exchange.
//!
//! - [`subject`]: building and parsing NATS subjects (`events.*`, `tasks.*`, `dlq.*`).
//! - [`envelope`]: the CloudEvents 1.0 event envelope and how raw bodies become events.
//! - [`task`], [`dlq`]: the listener → worker task and the dead-letter record.
//! - [`handler`]: handler definitions (YAML) and their validation; [`flowspec`]: their `batch`,
//!   `debounce` and `rate_limit` settings and key templates.
//! - [`clock`]: wall-clock Unix milliseconds.
//! - [`config`]: layered settings (defaults → file → `GRIZZLY_*` env → flags).
//! - [`nats`]: connecting and the idempotent setup of streams, consumers and buckets.
//! - [`nats_server`]: spawning a local `nats-server` child (dev mode and tests).
//! - [`registry`]: the handler registry (versions and their state) in KV.
//! - [`telemetry`]: logging/tracing set-up (OTLP export when configured, tokio-console).
//! - [`trace`]: W3C trace context carried by events across processes.
//! - [`metrics`]: the process-wide Prometheus registry and its fixed metric names.
//! - [`http`]: the `/metrics`, `/healthz`, `/readyz`, `/debug/pprof` endpoint.

pub mod clock;
pub mod config;
pub mod dlq;
pub mod envelope;
pub mod flowspec;
pub mod handler;
pub mod headers;
pub mod http;
pub mod ids;
pub mod metrics;
pub mod nats;
pub mod nats_server;
pub mod registry;
pub mod shutdown;
pub mod subject;
pub mod task;
pub mod telemetry;
pub mod trace;

pub use config::Settings;
pub use envelope::{EventEnvelope, Priority};
pub use handler::{HandlerKind, HandlerSpec};
pub use subject::EventSubject;
pub use task::Task;
