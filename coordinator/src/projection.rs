//! The read model of `grizzly workflow list|status`: one KV entry per instance in
//! `grizzly_wf_view`, kept up to date from `events.workflow.>` by one projector (the holder of
//! lease `wf.projection`) and rebuildable by replaying the log.
//!
//! Each entry remembers the last sequence it applied, so a replayed event changes nothing.
//! A rebuild is itself an event (`events.workflow._view.rebuild_requested`): the projector
//! purges the bucket and consumes the log again from the start.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use grizzly_shared::envelope::{EventEnvelope, StoredMessage};
use grizzly_shared::nats::{EVENTS_STREAM, LeaseFence, Nats};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::engine::{consumers_of_line, recreate_from_ack_floor};
use crate::instance::{AGGREGATE, SOURCE};
use crate::machine::{Status, Transition};

pub const VIEW_BUCKET: &str = "grizzly_wf_view";
pub const PROJECTOR_CONSUMER: &str = "coordinator-view";
/// Pseudo-instance whose `rebuild_requested` events rebuild the view.
pub const VIEW_AGGREGATE_ID: &str = "_view";
/// Key (not an instance) holding the sequence of the last rebuild done.
const REBUILT_KEY: &str = "_rebuilt";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepView {
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceView {
    pub id: String,
    pub workflow: String,
    pub version: u32,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub output: Value,
    #[serde(default)]
    pub steps: BTreeMap<String, StepView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rejection: Option<String>,
    pub created: String,
    pub updated: String,
    pub events: u64,
    pub last_seq: u64,
}

impl InstanceView {
    pub fn status(&self) -> Option<Status> {
        Status::parse(&self.status)
    }

    /// Applies one event of this instance (`events.workflow.<id>.<type>`).
    pub fn apply(&mut self, event: &EventEnvelope, seq: u64) {
        if seq <= self.last_seq {
            return;
        }
        self.last_seq = seq;
        self.events += 1;
        self.id = event.aggregateid.clone();
        self.updated = event.time.clone();
        let d = &event.data;
        let s = |k: &str| d.get(k).and_then(Value::as_str).map(str::to_string);
        let is_transition = Transition::ALL
            .iter()
            .any(|t| t.event_type() == event.event_type);
        if event.source == SOURCE {
            if let Some(w) = s("workflow") {
                self.workflow = w;
            }
            if let Some(v) = d.get("version").and_then(Value::as_u64) {
                self.version = v as u32;
            }
        }
        match event.event_type.as_str() {
            "created" => {
                self.status = Status::Pending.to_string();
                self.created = event.time.clone();
                self.parent = d.get("parent").filter(|p| !p.is_null()).cloned();
            }
            _ if is_transition && event.source == SOURCE => {
                if let Some(st) = s("status") {
                    self.status = st;
                }
                if let Some(e) = s("error") {
                    self.error = Some(e);
                }
                if event.event_type == "completed" {
                    self.output = d.get("output").cloned().unwrap_or_default();
                }
            }
            "step_started" => {
                let meta = d.get("_step").cloned().unwrap_or_default();
                let key = meta
                    .get("step")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .or_else(|| s("step"))
                    .unwrap_or_default();
                let step = self.steps.entry(key).or_default();
                step.status = if matches!(s("kind").as_deref(), Some("wait" | "sleep")) {
                    "waiting".into()
                } else {
                    "running".into()
                };
                step.kind = meta.get("kind").and_then(Value::as_str).map(str::to_string);
                step.handler = meta
                    .get("handler")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                step.event_id = Some(event.id.clone());
                step.started = Some(event.time.clone());
            }
            "step_completed" | "step_failed" | "step_skipped" => {
                let key = s("step").unwrap_or_default();
                let step = self.steps.entry(key).or_default();
                step.status = match event.event_type.as_str() {
                    "step_failed" => "failed".into(),
                    "step_skipped" => "skipped".into(),
                    _ => s("status").unwrap_or_else(|| "succeeded".into()),
                };
                step.kind = step.kind.clone().or_else(|| s("kind"));
                step.error = s("error");
                step.finished = Some(event.time.clone());
            }
            "handler_succeeded" | "handler_failed" => {
                let cause = s("event_id");
                if let Some(step) = self
                    .steps
                    .values_mut()
                    .find(|st| st.event_id.is_some() && st.event_id == cause)
                {
                    step.attempts = d
                        .get("attempt")
                        .and_then(Value::as_u64)
                        .unwrap_or(1)
                        .max(u64::from(step.attempts)) as u32;
                    if event.event_type == "handler_failed" {
                        step.error = s("error");
                    }
                }
            }
            "transition_rejected" => self.last_rejection = s("error"),
            "start_rejected" => {
                self.status = "rejected".into();
                self.error = s("error");
            }
            _ => {}
        }
    }
}

pub async fn ensure_bucket(js: &jetstream::Context, replicas: usize) -> anyhow::Result<kv::Store> {
    Ok(grizzly_shared::nats::ensure_bucket(
        js,
        VIEW_BUCKET,
        "Grizzly workflow instances read model (rebuildable from the log)",
        Duration::ZERO,
        replicas,
    )
    .await?)
}

/// Reads one instance's view.
pub async fn get(view: &kv::Store, instance: &str) -> anyhow::Result<Option<InstanceView>> {
    Ok(match view.get(instance).await? {
        Some(b) => Some(serde_json::from_slice(&b)?),
        None => None,
    })
}

/// Every instance's view.
pub async fn list(view: &kv::Store) -> anyhow::Result<Vec<InstanceView>> {
    let mut keys = view.keys().await?;
    let mut out = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key?;
        if key.starts_with('_') {
            continue;
        }
        if let Some(v) = get(view, &key).await? {
            out.push(v);
        }
    }
    out.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
    Ok(out)
}

/// Keeps the view up to date until `stop`, while `fence` holds.
pub async fn run_projector(
    nats: Nats,
    replicas: usize,
    fence: LeaseFence,
    stop: CancellationToken,
) {
    loop {
        match project(&nats, replicas, &fence, &stop).await {
            Ok(()) => return,
            Err(e) => {
                warn!(error = %e, "projector interrupted; restarting");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
}

/// The projector's consumer: resuming at the ack floor (in log order, at once), or from the
/// start of the log for a rebuild (the old one deleted first: nothing acked yet, so recreating
/// it at its ack floor then starts from the start too).
async fn consumer(
    js: &jetstream::Context,
    rebuild: bool,
) -> anyhow::Result<jetstream::consumer::Consumer<pull::Config>> {
    if rebuild {
        let stream = js.get_stream(EVENTS_STREAM).await?;
        for info in consumers_of_line(&stream, PROJECTOR_CONSUMER).await? {
            stream.delete_consumer(&info.name).await?;
        }
    }
    recreate_from_ack_floor(
        js,
        PROJECTOR_CONSUMER,
        pull::Config {
            description: Some("workflow instances read model".into()),
            filter_subject: format!("events.{AGGREGATE}.>"),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 512,
            ..Default::default()
        },
    )
    .await
}

/// Projects until `stop` or an error. Every (re)start of the pull — taking the lease over,
/// an interrupted pull, the lease renewed after it lapsed — recreates the consumer at its ack
/// floor: an entry that applied a newer event skips older ones as covered (`last_seq`), so
/// the view must see each instance's events in log order.
async fn project(
    nats: &Nats,
    replicas: usize,
    fence: &LeaseFence,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let view = ensure_bucket(&nats.js, replicas).await?;
    info!("workflow projector running");
    'pull: loop {
        // Another coordinator may be projecting now; pull nothing until renewed.
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = fence.renewed() => {}
        }
        let consumer = consumer(&nats.js, false).await?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(256)
            .heartbeat(Duration::from_secs(2))
            .expires(Duration::from_secs(5))
            .messages()
            .await?;
        loop {
            let msg = tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                _ = fence.lapsed() => continue 'pull,
                next = messages.next() => match next {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        warn!(error = %e, "projector pull interrupted; resuming");
                        continue 'pull;
                    }
                    None => continue 'pull,
                },
            };
            let stored = StoredMessage::from_jetstream(&msg).map_err(anyhow::Error::msg)?;
            let seq = stored.stream_sequence;
            if let Ok(event) = EventEnvelope::from_stored(&stored, usize::MAX) {
                if event.aggregateid == VIEW_AGGREGATE_ID {
                    if event.event_type == "rebuild_requested" {
                        let done: u64 = view
                            .get(REBUILT_KEY)
                            .await?
                            .and_then(|b| String::from_utf8_lossy(&b).parse().ok())
                            .unwrap_or(0);
                        if seq > done {
                            info!(seq, "rebuilding the workflow view from the log");
                            nats.js
                                .get_stream(format!("KV_{VIEW_BUCKET}"))
                                .await?
                                .purge()
                                .await?;
                            // From the start of the log, and only then marked done: a failure
                            // in between replays this request, which rebuilds again.
                            self::consumer(&nats.js, true).await?;
                            view.put(REBUILT_KEY, seq.to_string().into()).await?;
                            continue 'pull;
                        }
                    }
                } else {
                    apply_to_view(&view, &event, seq).await?;
                }
            }
            let _ = msg.ack().await;
        }
    }
}

async fn apply_to_view(view: &kv::Store, event: &EventEnvelope, seq: u64) -> anyhow::Result<()> {
    let key = &event.aggregateid;
    loop {
        let entry = view.entry(key).await?;
        let (mut current, revision) = match entry {
            Some(e) if e.operation == kv::Operation::Put => (
                serde_json::from_slice::<InstanceView>(&e.value).unwrap_or_default(),
                Some(e.revision),
            ),
            Some(e) => (InstanceView::default(), Some(e.revision)),
            None => (InstanceView::default(), None),
        };
        if seq <= current.last_seq {
            return Ok(());
        }
        current.apply(event, seq);
        let bytes: bytes::Bytes = serde_json::to_vec(&current)?.into();
        let written = match revision {
            Some(r) => view
                .update(key, bytes, r)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            None => view
                .create(key, bytes)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        match written {
            Ok(()) => return Ok(()),
            Err(e) => warn!(instance = %key, error = %e, "view write conflict; retrying"),
        }
    }
}
