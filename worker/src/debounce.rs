//! The worker's half of `debounce`: when a debounced task is due (the listener set its
//! `not_before_ms`), it runs only if its event is still the newest of its burst in KV
//! `grizzly_debounce`; otherwise it is recorded as `handler_skipped` (`reason: debounced`,
//! `superseded_by`: the newer event) and acked.
//!
//! When the state cannot be read (no bucket yet, broker trouble) the task runs: an extra run is
//! better than an event that silently never runs.

use async_nats::jetstream::{self, kv};
use grizzly_shared::Task;
use grizzly_shared::flowspec::{self, DEBOUNCE_BUCKET, DebounceState, KeyTemplate};
use grizzly_shared::metrics::{EventsOut, metrics};
use serde_json::json;
use tokio::sync::OnceCell;
use tracing::{debug, warn};

use crate::delivery::Delivery;
use crate::executor::{ExecutionEnv, HandlerContext, outcome_subject, publish_events, source};

pub(crate) struct DebounceGate {
    key: Option<KeyTemplate>,
    js: jetstream::Context,
    bucket: OnceCell<kv::Store>,
}

impl DebounceGate {
    /// The gate of a debounced handler (`None` for the others).
    pub(crate) fn new(ctx: &HandlerContext, js: &jetstream::Context) -> Option<Self> {
        let spec = ctx.handler.spec.debounce.as_ref()?;
        let key = match spec.key.as_deref().map(KeyTemplate::new).transpose() {
            Ok(key) => key,
            Err(e) => {
                warn!(handler = %ctx.name(), error = %e, "debounce.key is invalid; not debouncing");
                return None;
            }
        };
        Some(Self {
            key,
            js: js.clone(),
            bucket: OnceCell::new(),
        })
    }

    /// The id of the newer event that supersedes `task`, if any.
    pub(crate) async fn superseded_by(&self, task: &Task) -> Option<String> {
        let key = KeyTemplate::render_opt(self.key.as_ref(), &task.event).ok()?;
        let bucket = self
            .bucket
            .get_or_try_init(|| self.js.get_key_value(DEBOUNCE_BUCKET))
            .await
            .inspect_err(|e| warn!(error = %e, "debounce state unavailable; running the task"))
            .ok()?;
        let entry = bucket
            .get(flowspec::kv_key(&task.handler, &key))
            .await
            .inspect_err(|e| warn!(error = %e, "debounce state unreadable; running the task"))
            .ok()??;
        let state: DebounceState = serde_json::from_slice(&entry).ok()?;
        (state.latest_seq > task.event_seq).then_some(state.latest)
    }
}

/// Records that `task` was superseded, then acks it.
pub(crate) async fn skip(
    ctx: &HandlerContext,
    env: &ExecutionEnv,
    msg: &Delivery,
    task: &Task,
    superseded_by: String,
) {
    debug!(handler = %ctx.name(), event = %task.event.id, %superseded_by, "debounced");
    let skipped = task.event.caused(
        &outcome_subject(task, "handler_skipped"),
        &source(ctx),
        json!({
            "handler": ctx.name(),
            "handler_version": task.handler_version,
            "event_id": task.event.id,
            "reason": "debounced",
            "superseded_by": superseded_by,
            "worker": env.worker_id,
        }),
        &[ctx.name(), "skipped"],
    );
    publish_events(&env.nats, &[skipped]).await;
    metrics().events_out(EventsOut::Outcome, 1);
    if let Err(e) = msg.ack().await {
        warn!(error = %e, "task ack failed; a redelivery will be de-duplicated");
    }
}
