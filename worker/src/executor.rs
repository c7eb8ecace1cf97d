//! Runs one task to its end: admission (handler and worker concurrency limits, circuit breaker),
//! attempts with timeout and exponential back-off with jitter, and the durable write of every
//! outcome — emitted events, `handler_succeeded` / `handler_failed`, or the dead letter — before
//! the task is acked.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use backon::BackoffBuilder;
use grizzly_shared::dlq::{AttemptError, DeadLetter, headers_to_map};
use grizzly_shared::envelope::{format_time, now_rfc3339};
use grizzly_shared::handler::{LoadedHandler, may_emit};
use grizzly_shared::metrics::{EventsOut, metrics};
use grizzly_shared::nats::{Nats, publish_confirmed};
use grizzly_shared::subject::{EventSubject, dlq_subject};
use grizzly_shared::{EventEnvelope, Task, trace};
use serde_json::{Value, json};
use tracing::{Instrument as _, info, warn};

use crate::breaker::{Breaker, Transition};
use crate::delivery::Delivery;
use crate::runtime::{HandlerResult, Invocation, InvokeError, Runtime};
use crate::slots::{Permit, PriorityGate};

/// Everything the worker keeps per handler.
pub struct HandlerContext {
    pub handler: LoadedHandler,
    pub runtime: Arc<dyn Runtime>,
    pub breaker: Breaker,
    /// The handler's `concurrency` within this worker.
    pub limit: PriorityGate,
    /// Start times of the last `throttle.limit` attempts (this worker's share of the limit; the
    /// listener spaces tasks globally).
    pub recent_starts: tokio::sync::Mutex<std::collections::VecDeque<tokio::time::Instant>>,
}

impl HandlerContext {
    pub fn name(&self) -> &str {
        &self.handler.spec.name
    }

    /// Waits for the handler's throttle (when it has one without a key): at most `limit` starts
    /// in any `period`, by the times of this worker's last `limit` starts. Returns the start it
    /// admitted: the outcome reports that moment, not one read later (under load a task could
    /// be descheduled in between, and the reported starts came closer than the throttle spaced
    /// them).
    pub(crate) async fn throttle_gate(&self) -> Start {
        let Some(t) = self
            .handler
            .spec
            .throttle
            .as_ref()
            .filter(|t| t.key.is_none())
        else {
            return Start::now();
        };
        let mut starts = self.recent_starts.lock().await;
        if starts.len() >= t.limit as usize {
            let oldest = starts.pop_front().expect("non-empty");
            // A millisecond of margin: starts are reported in whole wall-clock milliseconds.
            tokio::time::sleep_until(oldest + t.period + Duration::from_millis(1)).await;
        }
        let start = Start::now();
        starts.push_back(tokio::time::Instant::from_std(start.at));
        start
    }
}

/// When an attempt started, monotonic and as reported (`started_at_ms`, Unix milliseconds).
pub(crate) struct Start {
    pub at: std::time::Instant,
    pub unix_ms: u64,
}

impl Start {
    fn now() -> Self {
        Self {
            at: std::time::Instant::now(),
            unix_ms: crate::partition::now_ms(),
        }
    }
}

/// The concurrency slots a task holds while it runs: its handler's and the worker's.
pub struct Slots {
    pub handler: Permit,
    pub worker: Permit,
}

/// Shared by every task a worker runs.
#[derive(Clone)]
pub struct ExecutionEnv {
    pub nats: Nats,
    pub worker_id: String,
    /// Worker-wide cap across handlers.
    pub worker_limit: PriorityGate,
    pub ack_wait: Duration,
    /// Every handler version this worker runs: a task runs on the version it was routed to.
    pub versions: Arc<crate::versions::VersionTable>,
    /// `grizzly_done`: the done tasks of long-open bundles.
    pub done: async_nats::jetstream::kv::Store,
}

/// Runs `task` (delivered as `msg`) to a durable outcome, then acks it. The partition runner
/// keeps progress-acking `msg` until then.
pub(crate) async fn execute(
    ctx: &HandlerContext,
    env: &ExecutionEnv,
    msg: Delivery,
    mut task: Task,
    _slots: Slots,
) {
    let delivery = msg.info().map(|i| i.delivered).unwrap_or(1).max(1) as u32;
    let scheduled = scheduled_at(&msg);
    // The version it was routed to (an older one may be draining, a newer one just registered).
    let resolved;
    let ctx = if task.handler_version == ctx.handler.spec.version {
        ctx
    } else {
        match env.versions.resolve(ctx.name(), task.handler_version).await {
            Ok(c) => {
                resolved = c;
                &*resolved
            }
            Err(reason) => {
                warn!(handler = %ctx.name(), event = %task.event.id, %reason, "task cannot run");
                let error = InvokeError::Start(reason);
                write_failure(ctx, env, &task, delivery, 1, 0, &error, false, scheduled).await;
                let history = vec![AttemptError {
                    attempt: 1,
                    error: error.to_string(),
                    at: now_rfc3339(),
                }];
                write_dead_letter(ctx, env, &msg, &task, &error, history).await;
                if let Err(e) = msg.ack().await {
                    warn!(error = %e, "task ack failed; a redelivery will be de-duplicated");
                }
                return;
            }
        }
    };
    // One span per task, a child per attempt; what an attempt writes carries its context.
    let handle = tracing::debug_span!("handle", otel.kind = "consumer", handler = %ctx.name(), event.id = %task.event.id, event.seq = task.event_seq);
    trace::follow(&handle, &task.event);
    let spec = &ctx.handler.spec;
    let mut delays = backon::ExponentialBuilder::default()
        .with_min_delay(spec.retry.initial_backoff)
        .with_max_delay(spec.retry.max_backoff)
        .with_jitter()
        .without_max_times()
        .build();
    let mut history = Vec::new();
    // A workflow step may override the handler's timeout and attempts for its task.
    let timeout = task
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(spec.timeout);
    let max_attempts = task.max_attempts.unwrap_or(spec.retry.max_attempts).max(1);
    for attempt in 1..=max_attempts {
        let attempt_span = tracing::debug_span!(parent: &handle, "attempt", attempt, handler = %ctx.name(), otel.status_code = tracing::field::Empty);
        trace::stamp(&mut task.event, &attempt_span);
        ctx.breaker.admit().await;
        let Start {
            at: started,
            unix_ms: started_at_ms,
        } = ctx.throttle_gate().await;
        let invocation = Invocation {
            task: &task,
            attempt,
            timeout,
            batch: None,
        };
        // Safety net above the runtime's own deadline handling.
        let outcome = match tokio::time::timeout(
            timeout + Duration::from_secs(15),
            ctx.runtime
                .invoke(invocation)
                .instrument(attempt_span.clone()),
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(_) => Err(InvokeError::Timeout(timeout)),
        };
        let duration_ms = started.elapsed().as_millis() as u64;
        let outcome = outcome.and_then(|result| {
            let emitted = emitted_envelopes(ctx, &task, &result).map_err(InvokeError::Failed)?;
            Ok((result, emitted))
        });
        metrics().handler_attempt(ctx.name(), outcome.is_ok(), started.elapsed());
        match outcome {
            Ok((mut result, emitted)) => {
                result
                    .details
                    .insert("started_at_ms".into(), started_at_ms.into());
                result.details.extend(scheduled);
                note_transition(ctx, env, &task, ctx.breaker.record(true)).await;
                count_success(ctx, &result, emitted.len());
                write_success(ctx, env, &task, attempt, duration_ms, result, emitted).await;
                if let Err(e) = msg.ack().await {
                    warn!(error = %e, "task ack failed; a redelivery will be de-duplicated");
                }
                return;
            }
            Err(error) => {
                attempt_span.record("otel.status_code", "ERROR");
                note_transition(ctx, env, &task, ctx.breaker.record(false)).await;
                let will_retry = attempt < max_attempts;
                metrics().events_out(EventsOut::Outcome, 1);
                if will_retry {
                    metrics().handler_retry(ctx.name());
                }
                warn!(handler = %ctx.name(), event = %task.event.id, attempt, %error, will_retry, "handler attempt failed");
                history.push(AttemptError {
                    attempt,
                    error: error.to_string(),
                    at: now_rfc3339(),
                });
                write_failure(
                    ctx,
                    env,
                    &task,
                    delivery,
                    attempt,
                    duration_ms,
                    &error,
                    will_retry,
                    scheduled.clone(),
                )
                .await;
                drop(attempt_span);
                if will_retry {
                    tokio::time::sleep(delays.next().unwrap_or(spec.retry.max_backoff)).await;
                } else {
                    write_dead_letter(ctx, env, &msg, &task, &error, std::mem::take(&mut history))
                        .await;
                }
            }
        }
    }
    if let Err(e) = msg.ack().await {
        warn!(error = %e, "task ack failed; a redelivery will be de-duplicated");
    }
}

/// `scheduled_at`: when the task's message was stored in `TASKS` (broker time, RFC 3339), for
/// its outcomes. With the cause's `time` and `started_at_ms` it tells where an event waited:
/// routing (listener) or the worker (slots, ordering, flow control).
pub(crate) fn scheduled_at(msg: &jetstream::Message) -> serde_json::Map<String, Value> {
    msg.info()
        .map(|i| {
            serde_json::Map::from_iter([("scheduled_at".into(), format_time(i.published).into())])
        })
        .unwrap_or_default()
}

/// Outcome, emitted events and model usage of a successful attempt.
pub(crate) fn count_success(ctx: &HandlerContext, result: &HandlerResult, emitted: usize) {
    let m = metrics();
    // Events an agent emitted through MCP are already in the log; the runtime lists their ids.
    let via_mcp = result
        .details
        .get("emitted")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    m.events_out(EventsOut::Emitted, (emitted + via_mcp) as u64);
    m.events_out(EventsOut::Outcome, 1);
    let usage = result.details.get("usage");
    let tokens = |key: &str| {
        usage
            .and_then(|u| u.get(key))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let input = tokens("input_tokens")
        + tokens("cache_creation_input_tokens")
        + tokens("cache_read_input_tokens");
    let cost = result
        .details
        .get("total_cost_usd")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    m.model_usage(ctx.name(), input, tokens("output_tokens"), cost);
}

pub(crate) fn source(ctx: &HandlerContext) -> String {
    format!("grizzly/handler/{}", ctx.name())
}

/// Turns the events a handler asked for into envelopes; an invalid one fails the attempt.
pub(crate) fn emitted_envelopes(
    ctx: &HandlerContext,
    task: &Task,
    result: &HandlerResult,
) -> Result<Vec<EventEnvelope>, String> {
    let cause = &task.event;
    result
        .emitted
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let subject = EventSubject::new(
                e.aggregate_type.as_deref().unwrap_or(&cause.aggregatetype),
                e.aggregate_id.as_deref().unwrap_or(&cause.aggregateid),
                &e.event_type,
            )
            .map_err(|err| format!("emitted event #{i} is invalid: {err}"))?;
            may_emit(&ctx.handler.spec.emits, &subject)
                .map_err(|err| format!("emitted event #{i} refused: {err}"))?;
            Ok(cause.caused(
                &subject,
                &source(ctx),
                e.data.clone(),
                &[ctx.name(), "emit", &i.to_string()],
            ))
        })
        .collect()
}

pub(crate) fn outcome_subject(task: &Task, event_type: &str) -> EventSubject {
    EventSubject::new(
        &task.event.aggregatetype,
        &task.event.aggregateid,
        event_type,
    )
    .expect("the handled event's aggregate is valid")
}

/// Publishes envelopes pipelined (all issued, then all confirmed), preserving their order.
pub(crate) async fn publish_events(nats: &Nats, events: &[EventEnvelope]) {
    let mut issued = Vec::with_capacity(events.len());
    for event in events {
        let subject = event
            .subject()
            .expect("built from a valid subject")
            .to_string();
        let publish = PublishMessage::build()
            .payload(event.to_json_bytes())
            .headers(event.headers());
        let first = nats
            .js
            .send_publish(subject.clone(), publish.clone())
            .await
            .ok();
        issued.push((subject, publish, first));
    }
    for (subject, publish, first) in issued {
        publish_confirmed(&nats.js, &subject, publish, first).await;
    }
}

async fn write_success(
    ctx: &HandlerContext,
    env: &ExecutionEnv,
    task: &Task,
    attempt: u32,
    duration_ms: u64,
    result: HandlerResult,
    mut events: Vec<EventEnvelope>,
) {
    let mut data = json!({
        "handler": ctx.name(),
        "handler_version": task.handler_version,
        "event_id": task.event.id,
        "attempt": attempt,
        "duration_ms": duration_ms,
        "output": result.output,
        "emitted": events.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        "worker": env.worker_id,
    });
    if let Value::Object(map) = &mut data {
        map.extend(result.details);
    }
    let outcome = task.event.caused(
        &outcome_subject(task, "handler_succeeded"),
        &source(ctx),
        data,
        &[ctx.name(), "succeeded"],
    );
    events.push(outcome);
    publish_events(&env.nats, &events).await;
}

/// Records one failed attempt; `extra` adds fields (a batch's id and size).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn write_failure(
    ctx: &HandlerContext,
    env: &ExecutionEnv,
    task: &Task,
    delivery: u32,
    attempt: u32,
    duration_ms: u64,
    error: &InvokeError,
    will_retry: bool,
    extra: serde_json::Map<String, Value>,
) {
    let mut data = json!({
        "handler": ctx.name(),
        "handler_version": task.handler_version,
        "event_id": task.event.id,
        "attempt": attempt,
        "delivery": delivery,
        "duration_ms": duration_ms,
        "output": Value::Null,
        "error": error.to_string(),
        "error_kind": error.kind(),
        "will_retry": will_retry,
        "dead_lettered": !will_retry,
        "worker": env.worker_id,
    });
    if let Value::Object(map) = &mut data {
        map.extend(extra);
    }
    let outcome = task.event.caused(
        &outcome_subject(task, "handler_failed"),
        &source(ctx),
        data,
        &[
            ctx.name(),
            "failed",
            &delivery.to_string(),
            &attempt.to_string(),
        ],
    );
    publish_events(&env.nats, &[outcome]).await;
}

pub(crate) async fn write_dead_letter(
    ctx: &HandlerContext,
    env: &ExecutionEnv,
    msg: &Delivery,
    task: &Task,
    error: &InvokeError,
    history: Vec<AttemptError>,
) {
    let mut dead = DeadLetter {
        handler: Some(ctx.name().to_string()),
        handler_version: Some(task.handler_version),
        kind: error.kind().to_string(),
        error: error.to_string(),
        attempts: history.len() as u32,
        history,
        original_subject: task
            .event
            .subject()
            .map(|s| s.to_string())
            .unwrap_or_default(),
        // A bundle's headers describe the bundle, not this task.
        original_headers: match msg.is_bundled() {
            false => headers_to_map(msg.headers.as_ref()),
            true => Default::default(),
        },
        original_payload: None,
        original_payload_base64: None,
        event_seq: Some(task.event_seq),
        event: Some(task.event.clone()),
        dead_lettered_at: now_rfc3339(),
    };
    dead.set_original_payload(&task.event.to_json_bytes());
    info!(handler = %ctx.name(), event = %task.event.id, "dead-lettering after {} attempts", dead.attempts);
    metrics().events_out(EventsOut::DeadLetter, 1);
    let publish = PublishMessage::build()
        .payload(dead.to_json_bytes())
        // One dead letter per task, however often it was delivered: a bundle half done when its
        // worker died is delivered again whole (a redrive has its own task id).
        .message_id(format!("dlq:{}", task.msg_id()));
    publish_confirmed(&env.nats.js, &dlq_subject(ctx.name()), publish, None).await;
}

/// Breaker changes are events on the System aggregate, so operators see them in the log.
pub(crate) async fn note_transition(
    ctx: &HandlerContext,
    env: &ExecutionEnv,
    task: &Task,
    transition: Option<Transition>,
) {
    let Some(transition) = transition else { return };
    let event_type = match transition {
        Transition::Opened => "breaker_opened",
        Transition::Closed => "breaker_closed",
    };
    warn!(handler = %ctx.name(), "circuit breaker {event_type}");
    metrics().set_breaker_open(ctx.name(), matches!(transition, Transition::Opened));
    let Ok(subject) = EventSubject::new("system", ctx.name(), event_type) else {
        return;
    };
    let event = task.event.caused(
        &subject,
        &source(ctx),
        json!({"handler": ctx.name(), "worker": env.worker_id}),
        &[ctx.name(), event_type, &env.worker_id],
    );
    publish_events(&env.nats, &[event]).await;
}
