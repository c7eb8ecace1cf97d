//! The listener: reads the event log (`EVENTS`), turns each message into an event, matches
//! it against the handlers' `on` patterns and writes one task per matching handler to `TASKS`.
//! Messages that cannot become events go to `dlq._ingest` with the reason.
//!
//! Replicas share the log by partition (`hash(aggregate) mod partitions`, see [`partitions`]):
//! each partition is routed by the one replica holding its lease, in log order. A replica reads
//! the log with an ordered consumer from the oldest cursor of its partitions and skips events
//! of other partitions (a hash of the subject, no parsing). A partition's cursor — the sequence
//! from which it is still to be routed — advances only past events whose tasks (or dead letter)
//! the broker confirmed, so a crash at any point re-routes from the cursor; task ids are derived
//! from the event, so re-routing writes nothing twice. Publishes are pipelined (many in flight,
//! issued in log order) so the broker's write latency is paid once per window, not once per
//! event — across aggregates: within one aggregate an event's tasks are issued only once the
//! previous event's are confirmed ([`Tails`]), so a refused or lost publish that is re-sent
//! never lands behind a newer task of its aggregate.

pub mod flow;
pub mod health;
pub mod partitions;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use async_nats::jetstream::consumer::{self, pull};
use async_nats::jetstream::message::PublishMessage;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use grizzly_shared::dlq::{DeadLetter, headers_to_map};
use grizzly_shared::envelope::{EventEnvelope, IngestError, StoredMessage, now_rfc3339};
use grizzly_shared::handler::LoadedHandler;
use grizzly_shared::metrics::{EventsOut, metrics};
use grizzly_shared::nats::{self, EVENTS_STREAM, Nats};
use grizzly_shared::registry::{self, HandlerRegistry, RegistrySnapshot};
use grizzly_shared::subject::DLQ_INGEST;
use grizzly_shared::{EventSubject, Settings, Task, trace};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How often the routing loop publishes its partitions' cursors to the lease manager, which
/// writes them to the bucket once per lease round.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// Pause before reading again after the log or the flow-control state failed.
const RETRY_AFTER: Duration = Duration::from_millis(500);
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An ordered reader of the whole log from `from` (no acks: progress is the cursors).
async fn read_log(
    events: &jetstream::stream::Stream,
    from: u64,
) -> anyhow::Result<consumer::pull::Ordered> {
    let reader = events
        .create_consumer(pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from.max(1),
            },
            ..Default::default()
        })
        .await
        .context("ordered reader on EVENTS")?;
    Ok(reader.messages().await?)
}

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

/// What a routed event's confirmation returns: publishes it confirmed, its [`Tails`] entry, and
/// its partition and stream sequence.
type Routed = (usize, Option<(String, u64)>, (u16, u64));

/// Routed events whose publishes are not confirmed yet.
#[derive(Default)]
struct Pipeline {
    in_flight: FuturesUnordered<BoxFuture<'static, Routed>>,
    tails: Tails,
    /// Unconfirmed publishes; kept under the context's in-flight window so issuing a publish
    /// never waits on a confirmation that only the routing loop could collect.
    outstanding: usize,
    /// Per partition, the sequences of events whose publishes are not confirmed yet: a
    /// partition's cursor stays at the oldest of them.
    unconfirmed: HashMap<u16, BTreeSet<u64>>,
}

impl Pipeline {
    fn has_room(&self) -> bool {
        self.outstanding < MAX_OUTSTANDING_PUBLISHES
    }

    /// An event's publishes are confirmed.
    fn settled(&mut self, (done, tail, (partition, seq)): Routed) {
        self.outstanding -= done;
        if let Some((aggregate, token)) = tail {
            self.tails.finished(&aggregate, token);
        }
        if let Some(seqs) = self.unconfirmed.get_mut(&partition) {
            seqs.remove(&seq);
        }
    }

    /// Confirms everything in flight.
    async fn drain(&mut self) {
        while let Some(routed) = self.in_flight.next().await {
            self.settled(routed);
        }
    }
}

/// The partitions this replica routes, and how far it has read the log.
struct Owned {
    partitions: u16,
    /// Per owned partition, the next sequence to route: its older events are handled.
    next: HashMap<u16, u64>,
    /// The next sequence the current reader delivers: every event before it that belongs to
    /// an owned partition is handled (routed, in flight or needing nothing).
    read_to: u64,
}

impl Owned {
    /// The partition of an event: its aggregate's, from the subject (`events.<type>.<id>.<event>`,
    /// the same partition its tasks go to). A malformed subject (dead-lettered) hashes whole.
    fn partition_of(&self, subject: &str) -> u16 {
        let mut tokens = subject.split('.');
        let key = match (tokens.next(), tokens.next(), tokens.next(), tokens.next()) {
            (Some(_), Some(t), Some(i), Some(_)) if tokens.next().is_none() => {
                std::borrow::Cow::Owned(format!("{t}/{i}"))
            }
            _ => std::borrow::Cow::Borrowed(subject),
        };
        grizzly_shared::task::partition_for(&key, self.partitions)
    }

    /// Where `partition` is to be routed from if this replica stopped now.
    fn cursor(&self, partition: u16, pipeline: &Pipeline) -> Option<u64> {
        let handled = (*self.next.get(&partition)?).max(self.read_to);
        let oldest = pipeline
            .unconfirmed
            .get(&partition)
            .and_then(|s| s.first().copied());
        Some(oldest.map_or(handled, |o| o.min(handled)))
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

impl Route {
    /// Whether one of the handler's `on` patterns matches `subject`.
    fn listens_to(&self, subject: &str) -> bool {
        self.patterns
            .iter()
            .any(|p| grizzly_shared::subject::pattern_matches(p, subject))
    }
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
        self.routes
            .iter()
            .filter(move |r| outcome_of != Some(r.handler.as_str()) && r.listens_to(subject))
    }

    /// Whether some handler's subject pattern matches `subject` (whatever the event says).
    pub fn subscribed(&self, subject: &str) -> bool {
        self.routes.iter().any(|r| r.listens_to(subject))
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

    /// Routes events until `shutdown`; in-flight events are confirmed, and the partitions'
    /// cursors written, before returning.
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
        let cursors =
            nats::ensure_cursor_bucket(&self.nats.js, self.settings.streams.replicas).await?;
        // Know the workers before the first event, then keep up with their heartbeats.
        match health::HandlerHealth::read(&leases).await {
            Ok(now) => *self.health.write().expect("health lock") = now,
            Err(e) => warn!(error = %e, "cannot read worker heartbeats yet"),
        }
        tokio::spawn(health::watch(
            leases.clone(),
            self.health.clone(),
            shutdown.clone(),
        ));
        let events = self
            .nats
            .js
            .get_stream(EVENTS_STREAM)
            .await
            .context("EVENTS stream")?;

        let id = self.settings.listener_id();
        let progress = partitions::Progress::default();
        let (changes_tx, mut changes) = tokio::sync::mpsc::unbounded_channel();
        let stop_manager = CancellationToken::new();
        // Aborted if this future is dropped: leases die with the routing they stand for.
        let mut manager = AbortOnDrop(tokio::spawn(
            partitions::Manager {
                id: id.clone(),
                partitions: self.settings.partitions,
                lease_ttl: self.settings.worker.lease_ttl,
                leases,
                cursors,
                events: events.clone(),
                progress: progress.clone(),
                changes: changes_tx,
            }
            .run(stop_manager.clone()),
        ));
        info!(listener = %id, routes = self.routes.len(), "listener routing");

        let mut pipeline = Pipeline::default();
        let mut owned = Owned {
            partitions: self.settings.partitions,
            next: HashMap::new(),
            read_to: 0,
        };
        let mut reader: Option<consumer::pull::Ordered> = None;
        // Where the next reader starts, once `resume_at` has passed.
        let mut start: Option<u64> = None;
        let mut resume_at = tokio::time::Instant::now();
        let mut progress_tick = tokio::time::interval(PROGRESS_EVERY);
        progress_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if reader.is_none()
                && let Some(from) = start
                && tokio::time::Instant::now() >= resume_at
            {
                match read_log(&events, from).await {
                    Ok(r) => {
                        reader = Some(r);
                        start = None;
                    }
                    Err(e) => {
                        warn!(error = %e, from, "cannot read EVENTS; retrying");
                        resume_at = tokio::time::Instant::now() + RETRY_AFTER;
                    }
                }
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(change) = changes.recv() => match change {
                    partitions::Change::Acquired { partition, from } => {
                        let first = owned.next.is_empty();
                        owned.next.insert(partition, from);
                        if first || from < owned.read_to {
                            // Read its events from its cursor (others' are skipped as routed).
                            reader = None;
                            start = Some(start.map_or(from, |s| s.min(from)));
                            owned.read_to = if first { from } else { owned.read_to.min(from) };
                        }
                    }
                    partitions::Change::Release { partition, cursor } => {
                        let at = owned.cursor(partition, &pipeline);
                        owned.next.remove(&partition);
                        let _ = cursor.send(at.unwrap_or(owned.read_to));
                    }
                    partitions::Change::Lost { partition } => {
                        owned.next.remove(&partition);
                    }
                },
                Some(routed) = pipeline.in_flight.next(), if !pipeline.in_flight.is_empty() => {
                    pipeline.settled(routed);
                }
                _ = progress_tick.tick() => {
                    let mut shared = progress.lock().expect("progress");
                    for partition in owned.next.keys() {
                        if let Some(at) = owned.cursor(*partition, &pipeline) {
                            shared.insert(*partition, at);
                        }
                    }
                }
                _ = tokio::time::sleep_until(resume_at), if reader.is_none() && start.is_some() => {}
                next = async { reader.as_mut().expect("reader").next().await },
                    if reader.is_some() && pipeline.has_room() => match next {
                    Some(Ok(msg)) => {
                        let seq = match msg.info() {
                            Ok(info) => info.stream_sequence,
                            Err(e) => {
                                warn!(error = %e, "EVENTS message without metadata; skipped");
                                continue;
                            }
                        };
                        let partition = owned.partition_of(&msg.subject);
                        let due = owned.next.get(&partition).is_some_and(|n| seq >= *n);
                        owned.read_to = seq + 1;
                        if !due {
                            // Another replica's partition, or routed before a rewind.
                            continue;
                        }
                        if registry_rx.has_changed().unwrap_or(false) {
                            let now = registry_rx.borrow_and_update().clone();
                            self.apply_registry(&now);
                        }
                        match self.route(msg, seq, partition, &mut pipeline).await {
                            Ok(()) => {
                                owned.next.insert(partition, seq + 1);
                            }
                            Err(e) => {
                                // Flow-control state unreachable: route this event again (and
                                // everything after it) shortly; nothing later overtakes it.
                                warn!(error = %e, seq, "cannot route yet; retrying");
                                owned.read_to = seq;
                                reader = None;
                                start = Some(seq);
                                resume_at = tokio::time::Instant::now() + RETRY_AFTER;
                            }
                        }
                    }
                    Some(Err(e)) => {
                        // e.g. missed idle heartbeats under load: read again from here.
                        warn!(error = %e, "EVENTS read interrupted; resuming");
                        reader = None;
                        start = Some(owned.read_to);
                        resume_at = tokio::time::Instant::now() + RETRY_AFTER / 5;
                    }
                    None => {
                        reader = None;
                        start = Some(owned.read_to);
                    }
                },
            }
            if owned.next.is_empty() {
                reader = None;
                start = None;
            }
        }
        pipeline.drain().await;
        {
            let mut shared = progress.lock().expect("progress");
            for partition in owned.next.keys() {
                if let Some(at) = owned.cursor(*partition, &pipeline) {
                    shared.insert(*partition, at);
                }
            }
        }
        // Write the cursors and free the leases now: other replicas take over at once.
        stop_manager.cancel();
        let _ = (&mut manager.0).await;
        info!("listener stopped");
        Ok(())
    }

    /// Routes one message: issues its publishes now (so tasks are written in log order) and
    /// adds to `pipeline` a future that confirms them. An event whose aggregate still has an
    /// unconfirmed predecessor issues its publishes only once that one is confirmed (see
    /// [`Tails`]). Fails, writing nothing, when the flow-control state cannot be read.
    async fn route(
        &self,
        msg: jetstream::Message,
        seq: u64,
        partition: u16,
        pipeline: &mut Pipeline,
    ) -> anyhow::Result<()> {
        let publishes = self.publishes_for(&msg).await?;
        if publishes.is_empty() {
            // Nothing to write (e.g. an outcome event no handler listens to — half of what the
            // listener sees under load).
            return Ok(());
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
            (count, tail, (partition, seq))
        };
        pipeline.outstanding += count;
        pipeline
            .unconfirmed
            .entry(partition)
            .or_default()
            .insert(seq);
        pipeline.in_flight.push(Box::pin(confirm));
        Ok(())
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
        if !tracing::span_enabled!(tracing::Level::DEBUG)
            && !self.routes.subscribed(&msg.subject)
            && EventEnvelope::check_stored(&stored, self.settings.max_event_bytes) == Some(None)
        {
            // A valid event that no pattern and no capability routes (chiefly outcome events,
            // half of what the listener reads under load): checked, not built. Unless traces
            // are exported: then every event's `route` span shows the listener saw it.
            return Ok(out);
        }
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
                    task.not_before_ms = self
                        .flow
                        .throttle(&route.handler, &event)
                        .await?
                        .max(debounced);
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
