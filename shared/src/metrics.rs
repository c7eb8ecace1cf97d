//! Prometheus metrics: one process-wide registry ([`metrics()`]) that every component in the
//! process writes to, served as `/metrics` by [`crate::http`]. The metric names are a contract
//! (the Kubernetes alert rules use them); add metrics, never rename one.
//!
//! Counters are exact: each is incremented once where the thing it counts happens. Gauges that
//! mirror state elsewhere are refreshed either at scrape time ([`Metrics::on_scrape`] hooks, e.g.
//! pool sizes) or by [`poll_broker`] (DLQ depth, consumer lag), every few seconds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::nats::{DLQ_STREAM, EVENTS_STREAM, TASKS_STREAM};

/// How often [`poll_broker`] refreshes the broker-side gauges.
pub const BROKER_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Handler latency buckets (seconds): script handlers take milliseconds, agent turns minutes.
const DURATION_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandlerLabels {
    pub handler: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub handler: String,
    /// `succeeded` or `failed`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandlerKindLabels {
    pub handler: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub handler: String,
    /// `busy` or `idle`.
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    pub consumer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

/// What `grizzly_events_out_total{kind}` counts.
#[derive(Clone, Copy, Debug)]
pub enum EventsOut {
    /// `handler_succeeded` / `handler_failed` events.
    Outcome,
    /// Events a handler emitted (script output or the MCP tool).
    Emitted,
    /// Dead letters (ingest failures and exhausted retries).
    DeadLetter,
}

impl EventsOut {
    fn label(self) -> &'static str {
        match self {
            Self::Outcome => "outcome",
            Self::Emitted => "emitted",
            Self::DeadLetter => "dead_letter",
        }
    }
}

type ScrapeHook = Arc<dyn Fn() + Send + Sync>;

/// Every Grizzly metric. Fields are public so a component can reach a family directly; the
/// methods are the usual way in.
pub struct Metrics {
    registry: Registry,
    pub handler_invocations: Family<OutcomeLabels, Counter>,
    pub handler_duration: Family<HandlerLabels, Histogram, fn() -> Histogram>,
    pub events_routed: Family<HandlerLabels, Counter>,
    pub events_in: Counter,
    pub events_out: Family<KindLabels, Counter>,
    pub handler_retries: Family<HandlerLabels, Counter>,
    pub dlq_messages: Gauge,
    pub consumer_pending: Family<ConsumerLabels, Gauge>,
    pub breaker_open: Family<HandlerLabels, Gauge>,
    pub pool_instances: Family<PoolLabels, Gauge>,
    pub pool_max: Family<HandlerLabels, Gauge>,
    pub workflow_instances: Family<StateLabels, Gauge>,
    pub tokens: Family<HandlerKindLabels, Counter>,
    pub cost_usd: Family<HandlerLabels, Counter<f64, AtomicU64>>,
    hooks: Mutex<Vec<(u64, ScrapeHook)>>,
    next_hook: AtomicU64,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

impl Metrics {
    fn new() -> Self {
        let mut m = Self {
            registry: Registry::default(),
            handler_invocations: Family::default(),
            handler_duration: Family::new_with_constructor(duration_histogram),
            events_routed: Family::default(),
            events_in: Counter::default(),
            events_out: Family::default(),
            handler_retries: Family::default(),
            dlq_messages: Gauge::default(),
            consumer_pending: Family::default(),
            breaker_open: Family::default(),
            pool_instances: Family::default(),
            pool_max: Family::default(),
            workflow_instances: Family::default(),
            tokens: Family::default(),
            cost_usd: Family::default(),
            hooks: Mutex::new(Vec::new()),
            next_hook: AtomicU64::new(0),
        };
        // Counters get `_total` appended by the encoder.
        let r = &mut m.registry;
        r.register(
            "grizzly_handler_invocations",
            "Handler attempts by outcome (succeeded|failed)",
            m.handler_invocations.clone(),
        );
        r.register(
            "grizzly_handler_duration_seconds",
            "Time one handler attempt took",
            m.handler_duration.clone(),
        );
        r.register(
            "grizzly_events_routed",
            "Tasks the listener wrote, by handler",
            m.events_routed.clone(),
        );
        r.register(
            "grizzly_events_in",
            "Messages the listener consumed from EVENTS",
            m.events_in.clone(),
        );
        r.register(
            "grizzly_events_out",
            "Events and dead letters written by kind (outcome|emitted|dead_letter)",
            m.events_out.clone(),
        );
        r.register(
            "grizzly_handler_retries",
            "Failed attempts that will be retried",
            m.handler_retries.clone(),
        );
        r.register(
            "grizzly_dlq_messages",
            "Messages in the DLQ stream",
            m.dlq_messages.clone(),
        );
        r.register(
            "grizzly_consumer_pending",
            "Consumer lag: messages not yet delivered plus delivered but unacked",
            m.consumer_pending.clone(),
        );
        r.register(
            "grizzly_breaker_open",
            "1 while the handler's circuit breaker is open in this process",
            m.breaker_open.clone(),
        );
        r.register(
            "grizzly_pool_instances",
            "Warm handler instances by state (busy|idle)",
            m.pool_instances.clone(),
        );
        r.register(
            "grizzly_pool_max",
            "Largest size of the handler's instance pool",
            m.pool_max.clone(),
        );
        r.register(
            "grizzly_workflow_instances",
            "Workflow instances by state",
            m.workflow_instances.clone(),
        );
        r.register(
            "grizzly_tokens",
            "Model tokens used by handler and kind (input|output)",
            m.tokens.clone(),
        );
        r.register(
            "grizzly_cost_usd",
            "Model spend reported by handlers, in US dollars",
            m.cost_usd.clone(),
        );
        m
    }

    /// Creates a handler's series at zero, so rates and alerts see it before its first event.
    pub fn register_handler(&self, handler: &str) {
        for outcome in ["succeeded", "failed"] {
            self.handler_invocations
                .get_or_create(&OutcomeLabels {
                    handler: handler.to_string(),
                    outcome,
                })
                .inc_by(0);
        }
        self.handler_retries
            .get_or_create(&handler_labels(handler))
            .inc_by(0);
        self.breaker_open
            .get_or_create(&handler_labels(handler))
            .set(0);
    }

    /// One handler attempt finished.
    pub fn handler_attempt(&self, handler: &str, succeeded: bool, took: Duration) {
        let outcome = if succeeded { "succeeded" } else { "failed" };
        self.handler_invocations
            .get_or_create(&OutcomeLabels {
                handler: handler.to_string(),
                outcome,
            })
            .inc();
        self.handler_duration
            .get_or_create(&handler_labels(handler))
            .observe(took.as_secs_f64());
    }

    pub fn handler_retry(&self, handler: &str) {
        self.handler_retries
            .get_or_create(&handler_labels(handler))
            .inc();
    }

    /// The listener consumed one message from `EVENTS`.
    pub fn event_in(&self) {
        self.events_in.inc();
    }

    /// The listener wrote a task for `handler`.
    pub fn event_routed(&self, handler: &str) {
        self.events_routed
            .get_or_create(&handler_labels(handler))
            .inc();
    }

    pub fn events_out(&self, kind: EventsOut, n: u64) {
        if n > 0 {
            self.events_out
                .get_or_create(&KindLabels { kind: kind.label() })
                .inc_by(n);
        }
    }

    pub fn set_breaker_open(&self, handler: &str, open: bool) {
        self.breaker_open
            .get_or_create(&handler_labels(handler))
            .set(i64::from(open));
    }

    pub fn set_pool(&self, handler: &str, busy: u64, idle: u64, max: u64) {
        for (state, n) in [("busy", busy), ("idle", idle)] {
            self.pool_instances
                .get_or_create(&PoolLabels {
                    handler: handler.to_string(),
                    state,
                })
                .set(n as i64);
        }
        self.pool_max
            .get_or_create(&handler_labels(handler))
            .set(max as i64);
    }

    /// Sets `grizzly_workflow_instances{state}` (for the coordinator).
    pub fn set_workflow_instances(&self, state: &str, count: u64) {
        self.workflow_instances
            .get_or_create(&StateLabels {
                state: state.to_string(),
            })
            .set(count as i64);
    }

    /// Model usage of one handler run: `input` counts every prompt token (fresh, cache write
    /// and cache read), `output` the generated ones.
    pub fn model_usage(&self, handler: &str, input: u64, output: u64, cost_usd: f64) {
        for (kind, n) in [("input", input), ("output", output)] {
            if n > 0 {
                self.tokens
                    .get_or_create(&HandlerKindLabels {
                        handler: handler.to_string(),
                        kind,
                    })
                    .inc_by(n);
            }
        }
        if cost_usd > 0.0 && cost_usd.is_finite() {
            self.cost_usd
                .get_or_create(&handler_labels(handler))
                .inc_by(cost_usd);
        }
    }

    /// Runs `hook` before every scrape (to refresh gauges that mirror live state) until the
    /// returned guard is dropped.
    pub fn on_scrape(&self, hook: impl Fn() + Send + Sync + 'static) -> ScrapeHookGuard {
        let id = self.next_hook.fetch_add(1, Ordering::Relaxed);
        self.hooks
            .lock()
            .expect("hooks lock")
            .push((id, Arc::new(hook)));
        ScrapeHookGuard { id }
    }

    /// The registry in the Prometheus/OpenMetrics text format, after running the scrape hooks.
    pub fn encode(&self) -> String {
        let hooks: Vec<ScrapeHook> = self
            .hooks
            .lock()
            .expect("hooks lock")
            .iter()
            .map(|(_, h)| h.clone())
            .collect();
        for hook in hooks {
            hook();
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

fn handler_labels(handler: &str) -> HandlerLabels {
    HandlerLabels {
        handler: handler.to_string(),
    }
}

/// Unregisters a scrape hook when dropped.
pub struct ScrapeHookGuard {
    id: u64,
}

impl Drop for ScrapeHookGuard {
    fn drop(&mut self) {
        if let Ok(mut hooks) = metrics().hooks.lock() {
            hooks.retain(|(id, _)| *id != self.id);
        }
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide registry.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Refreshes the broker-side gauges every [`BROKER_POLL_INTERVAL`] until `shutdown`:
/// `grizzly_dlq_messages` from the DLQ stream and `grizzly_consumer_pending` for every durable
/// consumer of `EVENTS` and `TASKS` (every pod may report them; alert rules take the max).
pub async fn poll_broker(js: jetstream::Context, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(BROKER_POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = refresh_broker_gauges(&js).await {
            tracing::debug!(error = %e, "cannot read broker state for metrics");
        }
    }
}

/// One refresh of the broker-side gauges (see [`poll_broker`]).
pub async fn refresh_broker_gauges(
    js: &jetstream::Context,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let m = metrics();
    let dlq = js.get_stream(DLQ_STREAM).await?.get_info().await?;
    m.dlq_messages.set(dlq.state.messages as i64);
    let mut pending: HashMap<String, i64> = HashMap::new();
    for name in [EVENTS_STREAM, TASKS_STREAM] {
        let stream = js.get_stream(name).await?;
        let mut consumers = stream.consumers();
        while let Some(info) = consumers.next().await {
            let info = info?;
            // Ephemeral readers (`events tail`, ordered consumers) are not lag.
            if info.config.durable_name.is_none() {
                continue;
            }
            let lag = info.num_pending as i64 + info.num_ack_pending as i64;
            pending.insert(info.name.clone(), lag);
        }
    }
    // The listeners read the log without a durable consumer: their lag is how far the
    // slowest partition's cursor is behind the end of the log.
    let mut events = js.get_stream(EVENTS_STREAM).await?;
    let last = events.info().await?.state.last_sequence;
    if let Some(slowest) = crate::nats::listener_cursors(js).await?.values().min() {
        pending.insert(
            crate::nats::LISTENER_CONSUMER.to_string(),
            (last + 1).saturating_sub(*slowest) as i64,
        );
    }
    // Consumers come and go with partition ownership: report exactly the current set.
    static REPORTED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut reported = REPORTED.lock().expect("reported lock");
    for gone in reported.iter().filter(|c| !pending.contains_key(*c)) {
        m.consumer_pending.remove(&ConsumerLabels {
            consumer: gone.clone(),
        });
    }
    reported.clear();
    for (consumer, lag) in pending {
        m.consumer_pending
            .get_or_create(&ConsumerLabels {
                consumer: consumer.clone(),
            })
            .set(lag);
        reported.push(consumer);
    }
    Ok(())
}
