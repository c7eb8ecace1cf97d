//! The listener: consumes the event log (`EVENTS`), turns each message into an event, matches
//! it against the handlers' `on` patterns and writes one task per matching handler to `TASKS`.
//! Messages that cannot become events go to `dlq._ingest` with the reason.
//!
//! An event is acked on the log only after all its tasks (or its dead letter) are confirmed by
//! the broker, so a crash at any point re-routes it; task ids are derived from the event, so
//! re-routing writes nothing twice. Publishes are pipelined (many in flight, issued in log order)
//! so the broker's write latency is paid once per window, not once per event — across
//! aggregates: within one aggregate an event's tasks are issued only once the previous event's
//! are confirmed ([`Tails`]), so a refused or lost publish that is re-sent never lands behind a
//! newer task of its aggregate.
//!
//! Replicas share one durable consumer with a pinned-client priority group: exactly one replica
//! routes at a time (keeping log order), the others stand by and take over when it stops pulling.
//! A replica that is handed an event while earlier ones are still pending elsewhere (it took
//! over from a dead or stopped replica, or a pull of its own was cut off) first routes those
//! earlier events from the log ([`Listener::catch_up`]), so fail-over keeps per-aggregate order.

pub mod flow;
pub mod health;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{self, AckPolicy, PriorityPolicy, pull};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use grizzly_shared::dlq::{DeadLetter, headers_to_map};
use grizzly_shared::envelope::{EventEnvelope, IngestError, StoredMessage, now_rfc3339};
use grizzly_shared::handler::LoadedHandler;
use grizzly_shared::metrics::{EventsOut, metrics};
use grizzly_shared::nats::{self, EVENTS_STREAM, LISTENER_CONSUMER, Nats};
use grizzly_shared::registry::{self, HandlerRegistry, RegistrySnapshot};
use grizzly_shared::subject::DLQ_INGEST;
use grizzly_shared::{EventSubject, Settings, Task, trace};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Priority group of the listeners' shared consumer.
const LISTENER_GROUP: &str = "listeners";
/// Life of one pull request: the active listener pulls at least this often.
const PULL_EXPIRES: Duration = Duration::from_secs(2);

/// How long a standby listener waits before taking over from a silent one: a few pulls, so a
/// busy active listener keeps its pin. Independent of `ack_wait`: what the silent one was given
/// and may not have routed, the new one reads from the log first ([`Listener::catch_up`]).
const PIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Catching up gives up (and pulls again) when the log sends nothing for this long.
const CATCH_UP_IDLE: Duration = Duration::from_secs(5);
/// Below the JetStream context's in-flight window (see `grizzly_shared::nats::connect`).
const MAX_OUTSTANDING_PUBLISHES: usize = 4096;
/// Outcome event types; a handler never receives the outcomes of its own runs.
const OUTCOME_TYPES: [&str; 3] = ["handler_succeeded", "handler_failed", "handler_skipped"];

/// Per aggregate, the newest event whose tasks are not confirmed yet. The next event of that
/// aggregate issues its tasks only after that one's are confirmed: with everything pipelined, a
/// publish refused by a full `TASKS` (or lost with a broker crash) and re-sent later landed
/// behind the next event's task, and workers ran the aggregate's events out of order.
#[derive(Default)]
struct Tails {
    issued: u64,
    by_aggregate: std::collections::HashMap<String, (u64, tokio::sync::oneshot::Receiver<()>)>,
}

impl Tails {
    /// Makes `aggregate`'s newest event the one being routed now; returns its token, the signal
    /// to send once its tasks are confirmed, and the predecessor to wait for, if still pending.
    fn push(
        &mut self,
        aggregate: String,
    ) -> (
        u64,
        tokio::sync::oneshot::Sender<()>,
        Option<tokio::sync::oneshot::Receiver<()>>,
    ) {
        self.issued += 1;
        let (done, rx) = tokio::sync::oneshot::channel();
        let previous = self
            .by_aggregate
            .insert(aggregate, (self.issued, rx))
            .and_then(|(_, mut prev)| match prev.try_recv() {
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => Some(prev),
                _ => None,
            });
        (self.issued, done, previous)
    }

    /// An event finished: forget its aggregate unless a newer event of it is being routed.
    fn finished(&mut self, aggregate: &str, token: u64) {
        if self
            .by_aggregate
            .get(aggregate)
            .is_some_and(|(t, _)| *t == token)
        {
            self.by_aggregate.remove(aggregate);
        }
    }
}

/// What a routed event's confirmation returns: publishes it confirmed, and its [`Tails`] entry.
type Routed = (usize, Option<(String, u64)>);

/// Routed events whose publishes are not confirmed yet.
#[derive(Default)]
struct Pipeline {
    in_flight: FuturesUnordered<BoxFuture<'static, Routed>>,
    tails: Tails,
    /// Unconfirmed publishes; kept under the context's in-flight window so issuing a publish
    /// never waits on a confirmation that only the routing loop could collect.
    outstanding: usize,
}

impl Pipeline {
    fn has_room(&self) -> bool {
        self.outstanding < MAX_OUTSTANDING_PUBLISHES
    }

    /// An event's publishes are confirmed (and it is acked).
    fn settled(&mut self, (done, tail): Routed) {
        self.outstanding -= done;
        if let Some((aggregate, token)) = tail {
            self.tails.finished(&aggregate, token);
        }
    }
}

/// One routing rule: a handler version and the subjects it consumes.
#[derive(Debug, Clone)]
pub struct Route {
    pub handler: String,
    pub version: u32,
    pub patterns: Vec<String>,
    pub priority: grizzly_shared::Priority,
    pub capabilities: Vec<String>,
}

/// The routing table: for each event, the handlers that must run.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Builds the table; when several versions of a handler are loaded, the newest takes new events.
    pub fn from_handlers(handlers: &[LoadedHandler]) -> Self {
        let mut newest: std::collections::BTreeMap<&str, &LoadedHandler> = Default::default();
        for h in handlers {
            let entry = newest.entry(&h.spec.name).or_insert(h);
            if h.spec.version > entry.spec.version {
                *entry = h;
            }
        }
        Self {
            routes: newest
                .values()
                .map(|h| Route {
                    handler: h.spec.name.clone(),
                    version: h.spec.version,
                    patterns: h.spec.on.clone(),
                    priority: h.spec.priority,
                    capabilities: h.spec.capabilities.clone(),
                })
                .collect(),
        }
    }

    /// The routes an event goes to.
    pub fn matching<'a>(
        &'a self,
        subject: &'a str,
        event: &'a EventEnvelope,
    ) -> impl Iterator<Item = &'a Route> {
        let outcome_of = if OUTCOME_TYPES.contains(&event.event_type.as_str()) {
            event.data.get("handler").and_then(|h| h.as_str())
        } else {
            None
        };
        self.routes.iter().filter(move |r| {
            outcome_of != Some(r.handler.as_str())
                && r.patterns
                    .iter()
                    .any(|p| grizzly_shared::subject::pattern_matches(p, subject))
        })
    }

    /// Every handler that declares `capability`.
    pub fn with_capability<'a>(&'a self, capability: &'a str) -> impl Iterator<Item = &'a Route> {
        self.routes
            .iter()
            .filter(move |r| r.capabilities.iter().any(|c| c == capability))
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

pub struct Listener {
    nats: Nats,
    settings: Settings,
    /// The handler files given at start; registered in the handler registry by `run`.
    files: Vec<LoadedHandler>,
    /// Built from the registry: one route per handler, to the version new events go to.
    routes: RouteTable,
    flow: flow::FlowControl,
    health: Arc<std::sync::RwLock<health::HandlerHealth>>,
    round_robin: std::sync::atomic::AtomicUsize,
}

impl Listener {
    /// Fails when a handler's flow-control template does not compile.
    pub fn new(nats: Nats, settings: Settings, handlers: &[LoadedHandler]) -> anyhow::Result<Self> {
        Ok(Self {
            flow: flow::FlowControl::new(handlers)?,
            nats,
            settings,
            files: handlers.to_vec(),
            routes: RouteTable::from_handlers(handlers),
            health: Default::default(),
            round_robin: Default::default(),
        })
    }

    /// One handler with `capability`: healthy ones first (spreading load round-robin); when
    /// none is healthy, any of them (its tasks wait in `TASKS` until a worker serves it).
    fn pick_capable<'a>(&'a self, capability: &'a str) -> Option<&'a Route> {
        let capable: Vec<&Route> = self.routes.with_capability(capability).collect();
        let health = self.health.read().expect("health lock");
        let healthy: Vec<&Route> = capable
            .iter()
            .copied()
            .filter(|r| health.is_healthy(&r.handler))
            .collect();
        let pool = if healthy.is_empty() {
            &capable
        } else {
            &healthy
        };
        let n = self
            .round_robin
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        pool.get(n % pool.len().max(1)).copied()
    }

    async fn consumer(&self) -> anyhow::Result<consumer::Consumer<pull::Config>> {
        let stream = self
            .nats
            .js
            .get_stream(EVENTS_STREAM)
            .await
            .context("EVENTS stream")?;
        let config = pull::Config {
            durable_name: Some(LISTENER_CONSUMER.into()),
            description: Some("Grizzly listeners: routes events to handlers".into()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.settings.listener.ack_wait,
            max_ack_pending: self.settings.listener.max_ack_pending,
            priority_policy: PriorityPolicy::PinnedClient,
            priority_groups: vec![LISTENER_GROUP.into()],
            priority_timeout: PIN_TIMEOUT,
            ..Default::default()
        };
        // Create or update: a consumer made by an older version takes the current settings
        // (e.g. its longer pin timeout).
        stream
            .create_consumer(config)
            .await
            .context("listener consumer on EVENTS")
    }

    /// Routes to what the registry says now: the version new events go to, per handler. A
    /// version that does not load (or whose templates do not compile) is left out, loudly.
    fn apply_registry(&mut self, snapshot: &RegistrySnapshot) {
        let handlers: Vec<LoadedHandler> = snapshot
            .routed()
            .into_iter()
            .filter_map(|r| match r.handler(&self.settings.handlers_dir) {
                Ok(h) => Some(h),
                Err(e) => {
                    warn!(handler = %r.name, version = r.version, error = %e, "registered handler does not load; not routed");
                    None
                }
            })
            .collect();
        match self.flow.rebuilt(&handlers) {
            Ok(flow) => {
                self.flow = flow;
                self.routes = RouteTable::from_handlers(&handlers);
                info!(
                    routes = self.routes.len(),
                    "routing from the handler registry"
                );
            }
            Err(e) => warn!(error = %e, "handler registry change not applied"),
        }
    }

    /// Routes events until `shutdown`; in-flight events are confirmed before returning.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        nats::ensure_streams(&self.nats.js, &self.settings.streams).await?;
        self.flow
            .connect(&self.nats.js, self.settings.streams.replicas)
            .await?;
        let registry = HandlerRegistry::open(&self.nats.js, self.settings.streams.replicas).await?;
        registry
            .register_all(&self.files)
            .await
            .context("registering handler files")?;
        let (registry_tx, mut registry_rx) =
            tokio::sync::watch::channel(registry.snapshot().await?);
        self.apply_registry(&registry_rx.borrow_and_update().clone());
        tokio::spawn(registry::follow(registry, registry_tx, shutdown.clone()));
        let leases = nats::ensure_lease_bucket(
            &self.nats.js,
            self.settings.worker.lease_ttl,
            self.settings.streams.replicas,
        )
        .await?;
        // Know the workers before the first event, then keep up with their heartbeats.
        match health::HandlerHealth::read(&leases).await {
            Ok(now) => *self.health.write().expect("health lock") = now,
            Err(e) => warn!(error = %e, "cannot read worker heartbeats yet"),
        }
        tokio::spawn(health::watch(leases, self.health.clone(), shutdown.clone()));
        let events = self
            .nats
            .js
            .get_stream(EVENTS_STREAM)
            .await
            .context("EVENTS stream")?;
        let mut consumer = self.consumer().await?;
        info!(routes = self.routes.len(), "listener routing");
        let mut pipeline = Pipeline::default();
        // The newest stream sequence this replica routed; every event between the consumer's
        // ack floor and it was routed by this replica (see [`Listener::catch_up`]).
        let mut cursor: Option<u64> = None;
        'outer: while !shutdown.is_cancelled() {
            let mut messages = match consumer
                .stream()
                .group(LISTENER_GROUP)
                .max_messages_per_batch(512)
                .heartbeat(Duration::from_millis(500))
                // Well under the pin timeout, or the pin would lapse between pulls.
                .expires(PULL_EXPIRES)
                .messages()
                .await
            {
                Ok(m) => m,
                Err(e) => {
                    warn!(error = %e, "cannot pull from EVENTS; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            loop {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break 'outer,
                    Some(routed) = pipeline.in_flight.next(), if !pipeline.in_flight.is_empty() => {
                        pipeline.settled(routed);
                    }
                    next = messages.next(), if pipeline.has_room() => match next {
                        Some(Ok(msg)) => {
                            if registry_rx.has_changed().unwrap_or(false) {
                                let now = registry_rx.borrow_and_update().clone();
                                self.apply_registry(&now);
                            }
                            let seq = msg.info().map(|i| i.stream_sequence).ok();
                            if let Some(seq) = seq.filter(|s| cursor.is_none_or(|c| *s > c + 1)) {
                                // Events before this one went to another replica (or to a pull
                                // of ours that was cut off) and may be unrouted: route them first.
                                let caught_up = tokio::select! {
                                    _ = shutdown.cancelled() => break 'outer,
                                    r = self.catch_up(&events, &mut consumer, cursor, seq, &mut pipeline) => r,
                                };
                                if let Err(e) = caught_up {
                                    warn!(error = %e, "cannot route the events before this one yet; pulling again");
                                    let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                                    tokio::time::sleep(Duration::from_millis(500)).await;
                                    continue 'outer;
                                }
                            }
                            if let Some(seq) = seq {
                                cursor = Some(cursor.map_or(seq, |c| c.max(seq)));
                            }
                            self.route(msg, &mut pipeline, true).await;
                        }
                        Some(Err(e)) => {
                            // e.g. a missed idle heartbeat under load: transient, pull again.
                            // What the cut-off pull was given is caught up when the next pull
                            // skips past it.
                            warn!(error = %e, "EVENTS pull interrupted; resuming");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue 'outer;
                        }
                        None => continue 'outer,
                    },
                }
            }
        }
        while pipeline.in_flight.next().await.is_some() {}
        // Hand the pin over now rather than after the pin timeout: a standby takes over at once
        // (nothing is orphaned: every routed event was confirmed and acked above).
        let _ = events
            .unpin_consumer(LISTENER_CONSUMER, LISTENER_GROUP)
            .await;
        info!("listener stopped");
        Ok(())
    }

    /// Routes, in log order, the events after the consumer's ack floor (or after `cursor`, if
    /// later) and before `next`, reading them straight from the log.
    ///
    /// The consumer hands this replica `next` although earlier events are still pending: they
    /// were delivered to a replica that died or stopped (this one takes over its pin), or to a
    /// pull of ours that was cut off. The broker redelivers them only after `ack_wait`, so
    /// routing `next` first would put an aggregate's newer task ahead of its older one. Routing
    /// them again is idempotent (task ids derive from the event, within the duplicate window),
    /// both for those the other replica did route and for their later redelivery; they are not
    /// acked here — their redelivery is.
    async fn catch_up(
        &self,
        events: &jetstream::stream::Stream,
        consumer: &mut consumer::Consumer<pull::Config>,
        cursor: Option<u64>,
        next: u64,
        pipeline: &mut Pipeline,
    ) -> anyhow::Result<()> {
        let floor = consumer.info().await?.ack_floor.stream_sequence;
        let from = cursor.unwrap_or(0).max(floor) + 1;
        if from >= next {
            return Ok(());
        }
        let log = events
            .create_consumer(pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                ..Default::default()
            })
            .await
            .context("reading the log from the ack floor")?;
        let mut log = log.messages().await?;
        let started = std::time::Instant::now();
        let mut routed = 0u64;
        loop {
            let msg = tokio::time::timeout(CATCH_UP_IDLE, log.next())
                .await
                .context("the log went silent while catching up")?
                .context("the log ended while catching up")??;
            if msg.info().map_err(anyhow::Error::msg)?.stream_sequence >= next {
                break;
            }
            while !pipeline.has_room() {
                if let Some(done) = pipeline.in_flight.next().await {
                    pipeline.settled(done);
                }
            }
            self.route(msg, pipeline, false).await;
            routed += 1;
        }
        info!(
            from,
            to = next - 1,
            routed,
            took_ms = started.elapsed().as_millis() as u64,
            "routed the events pending elsewhere before newer ones"
        );
        Ok(())
    }

    /// Routes one message: issues its publishes now (so tasks are written in log order) and
    /// adds to `pipeline` a future that confirms them and then acks the event (if `ack`).
    /// An event whose aggregate still has an unconfirmed predecessor issues its publishes only
    /// once that one is confirmed (see [`Tails`]).
    async fn route(&self, msg: jetstream::Message, pipeline: &mut Pipeline, ack: bool) {
        let publishes = match self.publishes_for(&msg).await {
            Ok(p) => p,
            Err(e) if ack => {
                warn!(error = %e, subject = %msg.subject, "cannot route; will redeliver");
                let _ = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
                return;
            }
            Err(e) => {
                // Its redelivery (still pending) gets the same treatment as any event.
                warn!(error = %e, subject = %msg.subject, "cannot route while catching up; left to its redelivery");
                return;
            }
        };
        if publishes.is_empty() {
            // Nothing to write (e.g. an outcome event no handler listens to — half of what the
            // listener sees under load): ack at once instead of queueing a confirmation.
            if ack && let Err(e) = msg.ack().await {
                warn!(error = %e, "ack of unrouted event failed; it will be redelivered");
            }
            return;
        }
        // events.<type>.<id>.<event>: tasks are ordered per aggregate (dead letters need no order).
        let mut tokens = msg.subject.split('.');
        let aggregate = match (tokens.next(), tokens.next(), tokens.next(), tokens.next()) {
            (Some(_), Some(t), Some(i), Some(_)) if tokens.next().is_none() => {
                Some(format!("{t}/{i}"))
            }
            _ => None,
        };
        let (tail, done, previous) = match aggregate {
            Some(aggregate) => {
                let (token, done, previous) = pipeline.tails.push(aggregate.clone());
                (Some((aggregate, token)), Some(done), previous)
            }
            None => (None, None, None),
        };
        let mut issued = Vec::with_capacity(publishes.len());
        for (subject, publish) in publishes {
            let ack = match previous {
                Some(_) => None,
                None => self
                    .nats
                    .js
                    .send_publish(subject.clone(), publish.clone())
                    .await
                    .ok(),
            };
            issued.push((subject, publish, ack));
        }
        let count = issued.len();
        let js = self.nats.js.clone();
        let confirm = async move {
            if let Some(previous) = previous {
                // Confirmed (or its routing was abandoned at shutdown): now issue ours.
                let _ = previous.await;
                for (subject, publish, ack) in &mut issued {
                    *ack = js.send_publish(subject.clone(), publish.clone()).await.ok();
                }
            }
            for (subject, publish, ack) in issued {
                nats::publish_confirmed(&js, &subject, publish, ack).await;
            }
            if let Some(done) = done {
                let _ = done.send(());
            }
            if ack && let Err(e) = msg.ack().await {
                warn!(error = %e, "ack of routed event failed; it will be re-routed (idempotent)");
            }
            (count, tail)
        };
        pipeline.outstanding += count;
        pipeline.in_flight.push(Box::pin(confirm));
    }

    /// What must be written for one message: its tasks, or its dead letter.
    async fn publishes_for(
        &self,
        msg: &jetstream::Message,
    ) -> anyhow::Result<Vec<(String, PublishMessage)>> {
        let stored = StoredMessage::from_jetstream(msg).map_err(anyhow::Error::msg)?;
        let seq = stored.stream_sequence;
        // Broker time: rate limit and debounce decide the same on every replica and replay.
        let at_ms = (stored.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
        let mut out = Vec::new();
        metrics().event_in();
        match EventEnvelope::from_stored(&stored, self.settings.max_event_bytes) {
            Ok(mut event) => {
                let span = tracing::debug_span!("route", otel.kind = "consumer", event.id = %event.id, subject = %msg.subject);
                trace::follow(&span, &event);
                // Its tasks (and the events routing writes) continue the trace from this span.
                trace::stamp(&mut event, &span);
                let mut targets: Vec<&Route> =
                    self.routes.matching(msg.subject.as_str(), &event).collect();
                if let Some(capability) = &event.capability {
                    match self.pick_capable(capability) {
                        Some(route) if !targets.iter().any(|t| t.handler == route.handler) => {
                            targets.push(route)
                        }
                        Some(_) => {}
                        None => {
                            let err = IngestError::UnknownCapability {
                                subject: msg.subject.to_string(),
                                capability: capability.clone(),
                            };
                            warn!(error = %err, "dead-lettering unroutable event");
                            let dead = ingest_dead_letter(&err, &stored);
                            metrics().events_out(EventsOut::DeadLetter, 1);
                            let publish = PublishMessage::build()
                                .payload(dead.to_json_bytes())
                                .message_id(format!("ingest:{}", seq));
                            out.push((DLQ_INGEST.to_string(), publish));
                        }
                    }
                }
                for route in targets {
                    // An event's own priority beats the handler's default.
                    let priority = if event.priority != grizzly_shared::Priority::Normal {
                        event.priority
                    } else {
                        route.priority
                    };
                    if let flow::Dedup::Duplicate { first, key } =
                        self.flow.dedup(&route.handler, &event).await?
                    {
                        debug!(handler = %route.handler, event = %event.id, %first, "duplicate skipped");
                        let skipped = event.caused(
                            &EventSubject::new(&event.aggregatetype, &event.aggregateid, "duplicate_skipped")?,
                            "grizzly/listener",
                            serde_json::json!({"handler": route.handler, "event_id": event.id, "first_event_id": first, "dedup_key": key}),
                            &[&route.handler, "duplicate_skipped"],
                        );
                        let publish = PublishMessage::build()
                            .payload(skipped.to_json_bytes())
                            .headers(skipped.headers());
                        out.push((skipped.subject()?.to_string(), publish));
                        continue;
                    }
                    if let Some(limited) = self
                        .flow
                        .rate_limit(&route.handler, &event, seq, at_ms)
                        .await?
                    {
                        debug!(handler = %route.handler, event = %event.id, "rate limited");
                        let skipped = event.caused(
                            &EventSubject::new(&event.aggregatetype, &event.aggregateid, "handler_skipped")?,
                            "grizzly/listener",
                            serde_json::json!({"handler": route.handler, "handler_version": route.version, "event_id": event.id, "reason": "rate_limited", "rate_limit_key": limited.key, "limit": limited.limit, "period_ms": limited.period_ms}),
                            &[&route.handler, "skipped"],
                        );
                        let publish = PublishMessage::build()
                            .payload(skipped.to_json_bytes())
                            .headers(skipped.headers());
                        out.push((skipped.subject()?.to_string(), publish));
                        metrics().events_out(EventsOut::Outcome, 1);
                        continue;
                    }
                    let debounced = self
                        .flow
                        .debounce(&route.handler, &event, seq, at_ms)
                        .await?;
                    let mut task = Task::new(
                        &route.handler,
                        route.version,
                        seq,
                        self.settings.partitions,
                        priority,
                        event.clone(),
                    );
                    task.not_before_ms = self.flow.throttle(&route.handler, &event)?.max(debounced);
                    debug!(handler = %task.handler, event = %event.id, "routing");
                    let publish = PublishMessage::build()
                        .payload(task.to_json_bytes())
                        .message_id(task.msg_id());
                    out.push((task.subject(), publish));
                    metrics().event_routed(&task.handler);
                }
            }
            Err(err) => {
                warn!(error = %err, seq = seq, "dead-lettering unparseable event");
                let dead = ingest_dead_letter(&err, &stored);
                metrics().events_out(EventsOut::DeadLetter, 1);
                let publish = PublishMessage::build()
                    .payload(dead.to_json_bytes())
                    .message_id(format!("ingest:{}", seq));
                out.push((DLQ_INGEST.to_string(), publish));
            }
        }
        Ok(out)
    }
}

fn ingest_dead_letter(err: &IngestError, msg: &StoredMessage<'_>) -> DeadLetter {
    let mut dead = DeadLetter {
        handler: None,
        handler_version: None,
        kind: err.kind().to_string(),
        error: err.to_string(),
        attempts: 1,
        history: Vec::new(),
        original_subject: msg.subject.to_string(),
        original_headers: headers_to_map(msg.headers),
        original_payload: None,
        original_payload_base64: None,
        event_seq: Some(msg.stream_sequence),
        event: None,
        dead_lettered_at: now_rfc3339(),
    };
    dead.set_original_payload(msg.payload);
    dead
}
