//! Handler runtimes: how one task is turned into a result. Each `kind` of handler registers a
//! [`Runtime`]; the executor does not know which kind it drives.
//!
//! - [`exec`]: one process per event (the legacy path and cold baseline).
//! - [`process`]: a warm pool of persistent processes speaking JSON lines.
//! - [`claude`]: a warm pool of Claude Code processes driven over stream-json.

pub mod claude;
pub mod exec;
pub mod lines;
pub mod process;

use std::time::Duration;

use futures::future::BoxFuture;
use grizzly_shared::Task;
use serde_json::Value;
use thiserror::Error;

/// One attempt at handling a task, or a batch of tasks (`batch` handlers).
pub struct Invocation<'a> {
    /// The task; for a batch, its first task.
    pub task: &'a Task,
    pub attempt: u32,
    /// The handler's `timeout`: the runtime must stop the work (and free its instance) by then.
    pub timeout: Duration,
    /// Set when the handler batches: every task of the batch, in the order they joined it.
    pub batch: Option<&'a BatchInput>,
}

/// The events a batch invocation handles.
pub struct BatchInput {
    /// Derived from the ids of its events, so a replayed batch keeps it.
    pub id: String,
    pub tasks: Vec<Task>,
}

impl Invocation<'_> {
    /// What `exec` and `process` handlers read: the event envelope, or for a batch one object
    /// `{"batch_id": "...", "events": [envelope, ...]}`.
    pub fn request(&self) -> Vec<u8> {
        let body = match self.batch {
            None => serde_json::to_vec(&self.task.event),
            Some(b) => serde_json::to_vec(&serde_json::json!({
                "batch_id": b.id,
                "events": b.tasks.iter().map(|t| &t.event).collect::<Vec<_>>(),
            })),
        };
        body.expect("envelopes serialize")
    }
}

/// An event a handler asked to emit (script output or the MCP tool).
#[derive(Debug, Clone, PartialEq)]
pub struct EmittedEvent {
    pub event_type: String,
    pub data: Value,
    /// Defaults to the handled event's aggregate.
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
}

/// What a successful attempt produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HandlerResult {
    /// The handler's result (e.g. the agent's final text), recorded as `data.output`.
    pub output: Value,
    /// Events to append, in order, with `causationid` = the handled event.
    pub emitted: Vec<EmittedEvent>,
    /// Extra fields for the outcome event (token usage, cost, instance, session...).
    pub details: serde_json::Map<String, Value>,
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum InvokeError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("handler failed: {0}")]
    Failed(String),
    #[error("handler process died: {0}")]
    Crashed(String),
    #[error("cannot start handler: {0}")]
    Start(String),
}

impl InvokeError {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "timeout",
            Self::Failed(_) => "failed",
            Self::Crashed(_) => "crashed",
            Self::Start(_) => "start_failed",
        }
    }
}

/// A handler runtime. Implementations bound their own concurrency (pools) and honour
/// `Invocation::timeout`.
pub trait Runtime: Send + Sync + 'static {
    fn invoke<'a>(
        &'a self,
        invocation: Invocation<'a>,
    ) -> BoxFuture<'a, Result<HandlerResult, InvokeError>>;

    /// Pool/runtime state for `grizzly handler list` and metrics.
    fn state(&self) -> Value {
        Value::Null
    }

    /// Finishes in-flight work and stops every process.
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
