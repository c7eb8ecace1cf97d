//! Batching (`batch: {max_size, max_wait, max_bytes?, key?}`): the partition runner hands the
//! tasks it holds to a [`Collector`], which groups them into batches, and runs each batch as one
//! invocation with [`execute_batch`].
//!
//! Forming: every lane whose next task is ready (best priority first) puts it into the open batch
//! of its key (`batch.key` rendered over the event; without a key, one per partition), followed
//! by that lane's further ready tasks of the same key, in log order. A batch closes when it holds
//! `max_size` events, when the next event would take it over `max_bytes` (that event starts the
//! next batch — overflow is never dropped), or `max_wait` after it opened. A closed batch waits
//! for a handler slot and a worker slot like a single task does.
//!
//! Order: a lane with a task in a batch counts as running until the batch is finished, so an
//! aggregate's tasks are never in two batches in flight, and within a batch they keep log order.
//!
//! Outcome: one invocation per attempt; on success every event gets its own `handler_succeeded`
//! (with `batch_id`, `batch_size`, `batch_index`), on failure its own `handler_failed`; the batch
//! retries as a whole and after `retry.max_attempts` every event is dead-lettered. Each task is
//! acked only after its outcome is confirmed.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use backon::BackoffBuilder;
use grizzly_shared::Task;
use grizzly_shared::dlq::AttemptError;
use grizzly_shared::envelope::now_rfc3339;
use grizzly_shared::flowspec::{BatchSpec, KeyTemplate};
use grizzly_shared::ids::derived_id;
use grizzly_shared::metrics::{EventsOut, metrics};
use serde_json::{Value, json};
use tokio::time::Instant;
use tracing::{Instrument as _, info, warn};

use crate::delivery::Delivery;
use crate::executor::{
    ExecutionEnv, HandlerContext, Slots, count_success, emitted_envelopes, note_transition,
    outcome_subject, publish_events, scheduled_at, source, write_dead_letter, write_failure,
};
use crate::partition::{Schedule, rank};
use crate::runtime::{BatchInput, Invocation, InvokeError};

/// A batch being formed or waiting for a slot.
pub(crate) struct Batch {
    key: String,
    members: Vec<(Delivery, Task)>,
    /// Distinct lanes of the members, in the order they joined.
    lanes: Vec<String>,
    bytes: usize,
    closes_at: Instant,
}

impl Batch {
    pub(crate) fn lanes(&self) -> &[String] {
        &self.lanes
    }
}

/// Forms the batches of one partition.
pub(crate) struct Collector {
    max_size: usize,
    max_bytes: usize,
    max_wait: Duration,
    key: Option<KeyTemplate>,
    open: HashMap<String, Batch>,
    closed: VecDeque<Batch>,
}

/// What an event counts for `max_bytes`: the size of its envelope as the handler receives it.
fn event_bytes(task: &Task) -> usize {
    serde_json::to_vec(&task.event).map_or(0, |b| b.len())
}

impl Collector {
    pub(crate) fn new(spec: &BatchSpec) -> anyhow::Result<Self> {
        Ok(Self {
            max_size: spec.max_size.max(1),
            max_bytes: spec.max_bytes.unwrap_or(usize::MAX),
            max_wait: spec.max_wait,
            key: spec.key.as_deref().map(KeyTemplate::new).transpose()?,
            open: HashMap::new(),
            closed: VecDeque::new(),
        })
    }

    /// The batch a task joins: its key, within the handler version it was routed to (a batch
    /// runs on one version, so tasks of two live versions never share one).
    fn key_of(&self, task: &Task) -> String {
        let key = KeyTemplate::render_opt(self.key.as_ref(), &task.event).unwrap_or_else(|e| {
            warn!(event = %task.event.id, error = %e, "batch.key does not render; using the default batch");
            String::new()
        });
        format!("v{}/{key}", task.handler_version)
    }

    /// Moves every ready task of `schedule` into a batch (see the module docs).
    pub(crate) fn absorb(&mut self, schedule: &mut Schedule) {
        // Lanes already in an open batch: their newly arrived (or now due) tasks follow.
        let open: Vec<(String, Vec<String>)> = self
            .open
            .iter()
            .map(|(k, b)| (k.clone(), b.lanes.clone()))
            .collect();
        for (key, lanes) in open {
            for lane in lanes {
                self.extend(&key, &lane, schedule);
            }
        }
        while let Some(lane) = schedule.pick() {
            let Some(head) = schedule.head(&lane) else {
                continue;
            };
            let (msg, task) = (head.msg.clone(), head.task.clone());
            let key = self.key_of(&task);
            let bytes = event_bytes(&task);
            if self.open.get(&key).is_some_and(|b| !self.fits(b, bytes)) {
                self.close(&key);
            }
            let closes_at = Instant::now() + self.max_wait;
            let batch = self.open.entry(key.clone()).or_insert_with(|| Batch {
                key: key.clone(),
                members: Vec::new(),
                lanes: Vec::new(),
                bytes: 0,
                closes_at,
            });
            batch.members.push((msg, task));
            batch.lanes.push(lane.clone());
            batch.bytes += bytes;
            if self.is_full(&key) {
                self.close(&key);
            } else {
                self.extend(&key, &lane, schedule);
            }
        }
    }

    /// Adds `lane`'s next ready tasks to the open batch of `key` while they have that key and fit.
    fn extend(&mut self, key: &str, lane: &str, schedule: &mut Schedule) {
        loop {
            if !self
                .open
                .get(key)
                .is_some_and(|b| b.lanes.iter().any(|l| l == lane))
            {
                return;
            }
            let Some(next) = schedule.next_of(lane) else {
                return;
            };
            if self.key_of(&next.task) != key {
                return;
            }
            let (msg, task) = (next.msg.clone(), next.task.clone());
            let bytes = event_bytes(&task);
            let batch = self.open.get_mut(key).expect("checked above");
            if batch.members.len() >= self.max_size || batch.bytes + bytes > self.max_bytes {
                // Overflow: this task waits for the batch to finish (its lane is in it).
                self.close(key);
                return;
            }
            batch.members.push((msg, task));
            batch.bytes += bytes;
            schedule.take_next(lane);
            if self.is_full(key) {
                self.close(key);
                return;
            }
        }
    }

    fn fits(&self, batch: &Batch, bytes: usize) -> bool {
        batch.members.is_empty()
            || (batch.members.len() < self.max_size && batch.bytes + bytes <= self.max_bytes)
    }

    fn is_full(&self, key: &str) -> bool {
        self.open
            .get(key)
            .is_some_and(|b| b.members.len() >= self.max_size || b.bytes >= self.max_bytes)
    }

    fn close(&mut self, key: &str) {
        if let Some(batch) = self.open.remove(key) {
            self.closed.push_back(batch);
        }
    }

    /// Closes the batches whose window ended; returns when the next open one closes.
    pub(crate) fn close_due(&mut self) -> Option<Instant> {
        let now = Instant::now();
        let due: Vec<String> = self
            .open
            .values()
            .filter(|b| b.closes_at <= now)
            .map(|b| b.key.clone())
            .collect();
        for key in due {
            self.close(&key);
        }
        self.open.values().map(|b| b.closes_at).min()
    }

    /// The best priority rank in the next closed batch and when the batch opened: its claim
    /// on a slot.
    pub(crate) fn urgency(&self) -> Option<(usize, Instant)> {
        let batch = self.closed.front()?;
        let best = batch.members.iter().map(|(_, t)| rank(t.priority)).min()?;
        let opened = batch.closes_at.checked_sub(self.max_wait);
        Some((best, opened.unwrap_or(batch.closes_at)))
    }

    /// No batch open or waiting.
    pub(crate) fn is_idle(&self) -> bool {
        self.open.is_empty() && self.closed.is_empty()
    }

    pub(crate) fn has_closed(&self) -> bool {
        !self.closed.is_empty()
    }

    pub(crate) fn next_closed(&mut self) -> Option<Batch> {
        self.closed.pop_front()
    }

    /// Forgets every batch not yet started (the consumer was recreated and delivers their tasks
    /// again); their lanes stop counting as running.
    pub(crate) fn abandon(&mut self, schedule: &mut Schedule) {
        for batch in self
            .open
            .drain()
            .map(|(_, b)| b)
            .chain(self.closed.drain(..))
        {
            for lane in &batch.lanes {
                schedule.release(lane);
            }
        }
    }
}

/// Runs a closed batch to durable outcomes for all its events, then acks each of its tasks.
pub(crate) async fn execute_batch(
    ctx: &HandlerContext,
    env: &ExecutionEnv,
    batch: Batch,
    _slots: Slots,
) {
    let (msgs, tasks): (Vec<_>, Vec<_>) = batch.members.into_iter().unzip();
    // The version its tasks were routed to (all the same, see `Collector::key_of`).
    let version = tasks[0].handler_version;
    let resolved;
    let ctx = if version == ctx.handler.spec.version {
        ctx
    } else {
        match env.versions.resolve(ctx.name(), version).await {
            Ok(c) => {
                resolved = c;
                &*resolved
            }
            Err(reason) => {
                warn!(handler = %ctx.name(), version, %reason, "batch cannot run; dead-lettering its events");
                let error = InvokeError::Start(reason);
                let history = vec![AttemptError {
                    attempt: 1,
                    error: error.to_string(),
                    at: now_rfc3339(),
                }];
                for (msg, task) in msgs.iter().zip(&tasks) {
                    let delivery = msg.info().map(|i| i.delivered).unwrap_or(1).max(1) as u32;
                    write_failure(
                        ctx,
                        env,
                        task,
                        delivery,
                        1,
                        0,
                        &error,
                        false,
                        Default::default(),
                    )
                    .await;
                    write_dead_letter(ctx, env, msg, task, &error, history.clone()).await;
                }
                ack_all(&msgs).await;
                return;
            }
        }
    };
    let spec = &ctx.handler.spec;
    let mut parts = vec!["batch", ctx.name()];
    parts.extend(tasks.iter().map(|t| t.event.id.as_str()));
    let input = BatchInput {
        id: derived_id(&parts),
        tasks,
    };
    let size = input.tasks.len();
    let first = &input.tasks[0];
    let span = tracing::debug_span!("handle_batch", handler = %ctx.name(), batch.id = %input.id, batch.size = size);
    let fields = |index: Option<usize>| {
        let mut m = serde_json::Map::new();
        m.insert("batch_id".into(), json!(input.id));
        m.insert("batch_size".into(), json!(size));
        if let Some(i) = index {
            m.insert("batch_index".into(), json!(i));
        }
        m
    };
    let mut delays = backon::ExponentialBuilder::default()
        .with_min_delay(spec.retry.initial_backoff)
        .with_max_delay(spec.retry.max_backoff)
        .with_jitter()
        .without_max_times()
        .build();
    let deliveries: Vec<u32> = msgs
        .iter()
        .map(|m| m.info().map(|i| i.delivered).unwrap_or(1).max(1) as u32)
        .collect();
    let max_attempts = spec.retry.max_attempts.max(1);
    let mut history = Vec::new();
    for attempt in 1..=max_attempts {
        ctx.breaker.admit().await;
        let crate::executor::Start {
            at: started,
            unix_ms: started_at_ms,
        } = ctx.throttle_gate().await;
        let invocation = Invocation {
            task: first,
            attempt,
            timeout: spec.timeout,
            batch: Some(&input),
        };
        let outcome = match tokio::time::timeout(
            spec.timeout + Duration::from_secs(15),
            ctx.runtime.invoke(invocation).instrument(span.clone()),
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(_) => Err(InvokeError::Timeout(spec.timeout)),
        };
        let duration_ms = started.elapsed().as_millis() as u64;
        // What the batch emits is caused by its first event.
        let outcome = outcome.and_then(|result| {
            let emitted = emitted_envelopes(ctx, first, &result).map_err(InvokeError::Failed)?;
            Ok((result, emitted))
        });
        metrics().handler_attempt(ctx.name(), outcome.is_ok(), started.elapsed());
        match outcome {
            Ok((result, mut events)) => {
                note_transition(ctx, env, first, ctx.breaker.record(true)).await;
                count_success(ctx, &result, events.len());
                metrics().events_out(EventsOut::Outcome, size as u64 - 1);
                let emitted: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
                for (i, task) in input.tasks.iter().enumerate() {
                    let mut data = json!({
                        "handler": ctx.name(),
                        "handler_version": task.handler_version,
                        "event_id": task.event.id,
                        "attempt": attempt,
                        "duration_ms": duration_ms,
                        "output": result.output,
                        "emitted": emitted,
                        "worker": env.worker_id,
                        "started_at_ms": started_at_ms,
                    });
                    if let Value::Object(map) = &mut data {
                        map.extend(result.details.clone());
                        map.extend(fields(Some(i)));
                        map.extend(scheduled_at(&msgs[i]));
                    }
                    events.push(task.event.caused(
                        &outcome_subject(task, "handler_succeeded"),
                        &source(ctx),
                        data,
                        &[ctx.name(), "succeeded"],
                    ));
                }
                publish_events(&env.nats, &events).await;
                ack_all(&msgs).await;
                return;
            }
            Err(error) => {
                note_transition(ctx, env, first, ctx.breaker.record(false)).await;
                let will_retry = attempt < max_attempts;
                metrics().events_out(EventsOut::Outcome, size as u64);
                if will_retry {
                    metrics().handler_retry(ctx.name());
                }
                warn!(handler = %ctx.name(), batch = %input.id, size, attempt, %error, will_retry, "batch attempt failed");
                history.push(AttemptError {
                    attempt,
                    error: error.to_string(),
                    at: now_rfc3339(),
                });
                futures::future::join_all(input.tasks.iter().enumerate().map(|(i, task)| {
                    write_failure(
                        ctx,
                        env,
                        task,
                        deliveries[i],
                        attempt,
                        duration_ms,
                        &error,
                        will_retry,
                        fields(Some(i))
                            .into_iter()
                            .chain(scheduled_at(&msgs[i]))
                            .collect(),
                    )
                }))
                .await;
                if will_retry {
                    tokio::time::sleep(delays.next().unwrap_or(spec.retry.max_backoff)).await;
                } else {
                    info!(handler = %ctx.name(), batch = %input.id, size, "dead-lettering every event of the batch");
                    futures::future::join_all(input.tasks.iter().enumerate().map(|(i, task)| {
                        write_dead_letter(ctx, env, &msgs[i], task, &error, history.clone())
                    }))
                    .await;
                }
            }
        }
    }
    ack_all(&msgs).await;
}

async fn ack_all(msgs: &[Delivery]) {
    for msg in msgs {
        if let Err(e) = msg.ack().await {
            warn!(error = %e, "task ack failed; a redelivery will be de-duplicated");
        }
    }
}
