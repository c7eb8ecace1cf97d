//! The listener: reads the event log (`EVENTS`), turns each message into an event, matches
//! it against the handlers' `on` patterns and writes one task per matching handler to `TASKS`.
//! Messages that cannot become events go to `dlq._ingest` with the reason.
//!
//! Replicas share the log by partition (`hash(aggregate) mod partitions`, see [`partitions`]):
//! each partition is routed by the one replica holding its lease, in log order. A replica reads
//! the log with an ordered consumer from the oldest cursor of its partitions and skips events
//! of other partitions (a hash of the subject, no parsing). A partition's cursor — the sequence
//! from which it is still to be routed — advances only past events whose tasks (or dead letter)
//! the broker confirmed, so a crash at any point re-routes from the cursor.
//!
//! Writes go out in *rounds*, one partition's at a time and never two of a partition at once (so
//! an aggregate's tasks land in log order, even when a refused publish is re-sent); partitions
//! go on in parallel, so the broker's write latency is paid once per round, not once per event.
//! A round of one event writes its tasks alone, with ids derived from the event: re-routing it
//! writes nothing twice, and an idle system's latency is a single write. A round of several —
//! a backlog — is announced in `round.<p>` and then written as one *bundle* per task subject
//! (one stored write and one delete for up to 256 tasks instead of one each); the
//! announcement lets the next router form exactly the same bundles (see [`partitions`]).

pub mod flow;
pub mod health;
pub mod partitions;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use async_nats::jetstream::consumer::{self, pull};
use async_nats::jetstream::kv;
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
use grizzly_shared::task::BUNDLE_HEADER;
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
/// Events in one round of a partition at most: what a worker re-runs at worst when it dies
/// with a bundle half done before its runner recorded any of it (bundles held over a second
/// are recorded, see the worker's `partition` module).
const MAX_ROUND: usize = 256;
/// A bundle message's payload at most (the broker's default message limit is 1 MiB); a
/// larger one is split, the same way by every router.
const MAX_BUNDLE_BYTES: usize = 256 * 1024;
/// Outcome event types; a handler never receives the outcomes of its own runs.
const OUTCOME_TYPES: [&str; 3] = ["handler_succeeded", "handler_failed", "handler_skipped"];

/// What routing one event writes.
enum Write {
    /// A task: alone in its message (id per event), or in a bundle of its round unless its
    /// handler's tasks always go `alone` (see [`Route::alone`]).
    Task { task: Box<Task>, alone: bool },
    /// Anything else (a dead letter, a skip record): its own message, id and subject.
    Other(String, PublishMessage),
}

/// One event's writes, not issued yet.
struct Routing {
    seq: u64,
    writes: Vec<Write>,
}

/// A partition this replica routes: its next round, and whether a round is being written.
/// Rounds of a partition never overlap, so an aggregate's tasks land in log order, and a
/// round's announcement implies that every earlier event of the partition is confirmed.
struct Part {
    pending: Vec<Routing>,
    busy: bool,
    claim: partitions::Claim,
    /// The claim's first revision: tells this claim's rounds from those of an earlier claim
    /// of the same partition still in flight.
    generation: u64,
}

/// What a written round reports: its partition and events, the publishes it confirmed, and
/// the revision of `round.<p>` after its announcement (`Err`: another replica claimed the
/// partition, nothing was written).
struct Written {
    partition: u16,
    generation: u64,
    seqs: Vec<u64>,
    publishes: usize,
    revision: Result<Option<u64>, ()>,
}

/// Routed events whose writes are not confirmed yet.
#[derive(Default)]
struct Pipeline {
    /// This replica's id, in its announcements.
    id: String,
    in_flight: FuturesUnordered<BoxFuture<'static, Written>>,
    parts: HashMap<u16, Part>,
    /// Unconfirmed publishes; kept under the context's in-flight window so issuing a publish
    /// never waits on a confirmation that only the routing loop could collect.
    outstanding: usize,
    /// Per partition, the sequences of events whose writes are not confirmed yet: a
    /// partition's cursor stays at the oldest of them.
    unconfirmed: HashMap<u16, BTreeSet<u64>>,
}

impl Pipeline {
    /// Whether the routing loop may read the next event: room for its publishes, and no
    /// round full (a full one is written first).
    fn has_room(&self) -> bool {
        self.outstanding < MAX_OUTSTANDING_PUBLISHES
            && self
                .parts
                .values()
                .all(|p| p.pending.len() < MAX_ROUND || p.claim.announced.is_some())
    }

    fn claimed(&mut self, partition: u16, claim: partitions::Claim) {
        self.forget(partition);
        self.parts.insert(
            partition,
            Part {
                pending: Vec::new(),
                busy: false,
                generation: claim.revision,
                claim,
            },
        );
    }

    /// Stops routing `partition`: its unwritten round is dropped (the cursor stays before it).
    fn forget(&mut self, partition: u16) {
        if let Some(part) = self.parts.remove(&partition)
            && let Some(seqs) = self.unconfirmed.get_mut(&partition)
        {
            for routing in part.pending {
                seqs.remove(&routing.seq);
            }
        }
    }

    /// Adds an event to its partition's next round.
    fn queue(&mut self, partition: u16, routing: Routing) {
        let Some(part) = self.parts.get_mut(&partition) else {
            return;
        };
        self.unconfirmed
            .entry(partition)
            .or_default()
            .insert(routing.seq);
        part.pending.push(routing);
    }

    /// A partition whose next round can be written now: not busy, and — when it re-forms an
    /// announced round — every event of that round read.
    fn ready(&self, read_to: u64, full_only: bool) -> Option<u16> {
        self.parts.iter().find_map(|(partition, part)| {
            let ready = !part.busy
                && !part.pending.is_empty()
                && part.claim.announced.is_none_or(|r| read_to > r.to)
                && (!full_only || part.pending.len() >= MAX_ROUND);
            ready.then_some(*partition)
        })
    }

    /// A round was written (or fenced off); returns the partition if it is lost.
    fn settled(&mut self, written: Written) -> Option<u16> {
        self.outstanding -= written.publishes;
        let current = self
            .parts
            .get_mut(&written.partition)
            .filter(|p| p.generation == written.generation);
        match written.revision {
            Ok(revision) => {
                if let Some(seqs) = self.unconfirmed.get_mut(&written.partition) {
                    for seq in &written.seqs {
                        seqs.remove(seq);
                    }
                }
                if let Some(part) = current {
                    part.busy = false;
                    if let Some(revision) = revision {
                        part.claim.revision = revision;
                    }
                }
                None
            }
            // Nothing written: the cursor stays where it was.
            Err(()) => current.is_some().then(|| {
                self.forget(written.partition);
                self.unconfirmed.remove(&written.partition);
                written.partition
            }),
        }
    }

    /// Confirms everything in flight.
    async fn drain(&mut self) {
        while let Some(written) = self.in_flight.next().await {
            self.settled(written);
        }
    }

    /// Writes `partition`'s next round: one event alone, or up to the end of the log at the
    /// claim, as it always was (each event's tasks on their own, ids per event, one event
    /// after another); otherwise announced in `round.<p>`, then one bundle per task subject.
    fn write(&mut self, partition: u16, js: &jetstream::Context, rounds: &kv::Store) {
        let Some(part) = self.parts.get_mut(&partition) else {
            return;
        };
        let round = std::mem::take(&mut part.pending);
        // Formed again or not, an announced round is written once: what follows is new.
        let announced = part.claim.announced.take();
        let Some(first) = round.first().map(|r| r.seq) else {
            return;
        };
        let last = round.last().map_or(first, |r| r.seq);
        part.busy = true;
        let bundled = announced.is_some() || (round.len() > 1 && first > part.claim.singles_to);
        let seqs: Vec<u64> = round.iter().map(|r| r.seq).collect();
        let generation = part.generation;
        let js = js.clone();
        // The revision after the round's announcement, if any; `Err` when fenced off.
        let (publishes, writing): (usize, BoxFuture<'static, Result<Option<u64>, ()>>) = if bundled
        {
            let bounds = announced.unwrap_or(partitions::Round {
                from: first,
                to: last,
            });
            let Bundled {
                bundles,
                mut publishes,
                alone,
            } = bundles(partition, bounds, round);
            publishes.extend(bundles.into_iter().map(Bundle::publish));
            let count = publishes.len() + alone.len();
            let (rounds, revision) = (rounds.clone(), part.claim.revision);
            let announcement = partitions::Announcement {
                round: Some(bounds),
                by: self.id.clone(),
            };
            let writing = async move {
                let revision = announce(&rounds, partition, announcement, revision).await?;
                nats::publish_all_confirmed(&js, publishes).await;
                // One after another: an aggregate's tasks land in log order.
                for publish in alone {
                    nats::publish_all_confirmed(&js, vec![publish]).await;
                }
                Ok(Some(revision))
            };
            (count, Box::pin(writing))
        } else {
            let count = round.iter().map(|r| r.writes.len()).sum();
            let writing = async move {
                for routing in round {
                    let publishes = routing.writes.into_iter().map(|w| match w {
                        Write::Task { task, .. } => single(&task),
                        Write::Other(subject, publish) => (subject, publish),
                    });
                    nats::publish_all_confirmed(&js, publishes.collect()).await;
                }
                Ok(None)
            };
            (count, Box::pin(writing))
        };
        self.outstanding += publishes;
        self.in_flight.push(Box::pin(async move {
            Written {
                partition,
                generation,
                seqs,
                publishes,
                revision: writing.await,
            }
        }));
    }
}

/// A bundle message, before it becomes a publish.
struct Bundle {
    subject: String,
    id: String,
    tasks: usize,
    /// The tasks as a JSON array.
    payload: Vec<u8>,
}

impl Bundle {
    fn publish(self) -> (String, PublishMessage) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(BUNDLE_HEADER, self.tasks.to_string().as_str());
        let publish = PublishMessage::build()
            .payload(self.payload.into())
            .headers(headers)
            .message_id(self.id);
        (self.subject, publish)
    }
}

/// A task in a message of its own, with the id derived from its event.
fn single(task: &Task) -> (String, PublishMessage) {
    let publish = PublishMessage::build()
        .payload(task.to_json_bytes())
        .message_id(task.msg_id());
    (task.subject(), publish)
}

/// What a bundled round writes.
struct Bundled {
    bundles: Vec<Bundle>,
    /// Dead letters and skip records, each with its own id.
    publishes: Vec<(String, PublishMessage)>,
    /// Tasks that go alone, in log order.
    alone: Vec<(String, PublishMessage)>,
}

/// A bundled round's messages: per task subject, its tasks in log order (split by
/// [`MAX_BUNDLE_BYTES`]), with ids from the round's first sequence, so forming the same round
/// again writes nothing twice; the tasks that go alone, and the round's other writes, as they
/// are.
fn bundles(partition: u16, bounds: partitions::Round, round: Vec<Routing>) -> Bundled {
    let mut publishes = Vec::new();
    let mut alone = Vec::new();
    let mut by_subject: BTreeMap<String, Vec<bytes::Bytes>> = BTreeMap::new();
    for write in round.into_iter().flat_map(|r| r.writes) {
        match write {
            Write::Task { task, alone: true } => alone.push(single(&task)),
            Write::Task { task, .. } => by_subject
                .entry(task.subject())
                .or_default()
                .push(task.to_json_bytes()),
            Write::Other(subject, publish) => publishes.push((subject, publish)),
        }
    }
    let mut out = Vec::new();
    for (subject, tasks) in by_subject {
        let mut chunks: Vec<Vec<bytes::Bytes>> = Vec::new();
        let mut size = 0;
        for task in tasks {
            if chunks.is_empty() || size + task.len() > MAX_BUNDLE_BYTES {
                chunks.push(Vec::new());
                size = 0;
            }
            size += task.len() + 1;
            chunks.last_mut().expect("pushed above").push(task);
        }
        for (part, chunk) in chunks.into_iter().enumerate() {
            let mut payload =
                Vec::with_capacity(chunk.iter().map(|t| t.len() + 1).sum::<usize>() + 1);
            payload.push(b'[');
            for (i, task) in chunk.iter().enumerate() {
                if i > 0 {
                    payload.push(b',');
                }
                payload.extend_from_slice(task);
            }
            payload.push(b']');
            out.push(Bundle {
                id: format!("bundle:{partition}:{}:{subject}:{part}", bounds.from),
                subject: subject.clone(),
                tasks: chunk.len(),
                payload,
            });
        }
    }
    Bundled {
        bundles: out,
        publishes,
        alone,
    }
}

/// Announces a bundled round in `round.<p>`: a compare-and-set on the revision this replica
/// last wrote, which fails once another replica has claimed the partition. Retries anything
/// else; `Err` only when fenced off.
async fn announce(
    rounds: &kv::Store,
    partition: u16,
    announcement: partitions::Announcement,
    revision: u64,
) -> Result<u64, ()> {
    let key = partitions::round_key(partition);
    let value = announcement.to_bytes();
    let mut delays = nats::retry_delays(Duration::from_secs(2));
    loop {
        match rounds.update(&key, value.clone(), revision).await {
            Ok(revision) => return Ok(revision),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                // Our earlier attempt may have landed (its reply lost); a claim writes its
                // own id.
                return match rounds.entry(key.clone()).await {
                    Ok(Some(entry)) if entry.value == value => Ok(entry.revision),
                    _ => {
                        warn!(
                            partition,
                            "partition claimed by another replica; round dropped"
                        );
                        Err(())
                    }
                };
            }
            Err(e) => warn!(partition, error = %e, "cannot announce a round; retrying"),
        }
        tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(2))).await;
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

/// Rendezvous (highest random weight) hashing: the route scoring highest for `key`. Stable for
/// a key while the candidates stay; a candidate coming or going moves only the keys it wins or
/// won, and keys spread evenly over the candidates.
fn rendezvous<'a>(candidates: Vec<&'a Route>, key: &str) -> Option<&'a Route> {
    candidates
        .into_iter()
        .max_by_key(|r| grizzly_shared::ids::stable_hash(&format!("{key}\u{0}{}", r.handler)))
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
    /// Its tasks never go in a bundle: `claude` handlers. A worker that dies with a bundle half
    /// done re-runs the done part, and re-run turns cost far more (and may act twice) than the
    /// writes a bundle saves at the few turns a second a handler like that runs.
    pub alone: bool,
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
                    alone: h.spec.kind == grizzly_shared::handler::HandlerKind::Claude,
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
        })
    }

    /// One handler with `capability` for an event of `aggregate`: among the healthy ones (when
    /// none is healthy, any of them: its tasks wait in `TASKS` until a worker serves it), the
    /// one [`rendezvous`] picks. Not a counter: a successor routing an event again after a
    /// take-over must pick the handler the first router did (same task id, so the broker drops
    /// the copy), and an aggregate's requests stay with one handler, in order.
    fn pick_capable<'a>(&'a self, capability: &'a str, aggregate: &str) -> Option<&'a Route> {
        let capable: Vec<&Route> = self.routes.with_capability(capability).collect();
        let health = self.health.read().expect("health lock");
        let healthy: Vec<&Route> = capable
            .iter()
            .copied()
            .filter(|r| health.is_healthy(&r.handler))
            .collect();
        let pool = if healthy.is_empty() { capable } else { healthy };
        rendezvous(pool, aggregate)
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
        let rounds = cursors.clone();
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
        let fence = nats::LeaseFence::new(tokio::time::Instant::now());
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
                fence: fence.clone(),
                written: Default::default(),
            }
            .run(stop_manager.clone()),
        ));
        info!(listener = %id, routes = self.routes.len(), "listener routing");

        let mut pipeline = Pipeline {
            id: id.clone(),
            ..Default::default()
        };
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
            // Past the fence another replica may route our partitions: write nothing until a
            // renewal (or the lease's loss) says which.
            let held = fence.held();
            let ready = pipeline.ready(owned.read_to, false).filter(|_| held);
            let room = pipeline.has_room();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(change) = changes.recv() => match change {
                    partitions::Change::Acquired { partition, claim } => {
                        let from = claim.from;
                        let first = owned.next.is_empty();
                        owned.next.insert(partition, from);
                        pipeline.claimed(partition, claim);
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
                        pipeline.forget(partition);
                        let _ = cursor.send(at.unwrap_or(owned.read_to));
                    }
                    partitions::Change::Lost { partition } => {
                        owned.next.remove(&partition);
                        pipeline.forget(partition);
                    }
                },
                Some(written) = pipeline.in_flight.next(), if !pipeline.in_flight.is_empty() => {
                    if let Some(fenced) = pipeline.settled(written) {
                        // Claimed by another replica (our lease round will say so too).
                        owned.next.remove(&fenced);
                    }
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
                // Fenced with a round waiting: look again once a renewal may have come.
                _ = fence.renewed(), if !held && !pipeline.parts.values().all(|p| p.pending.is_empty()) => {}
                next = async { reader.as_mut().expect("reader").next().await },
                    if reader.is_some() && room => match next {
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
                        if pipeline.parts.get(&partition).is_some_and(|p| {
                            p.claim.announced.is_some_and(|r| seq > r.to)
                        }) {
                            if !fence.held() {
                                // It must not join the announced round: read it again later.
                                owned.read_to = seq;
                                reader = None;
                                start = Some(seq);
                                resume_at = tokio::time::Instant::now() + RETRY_AFTER;
                                continue;
                            }
                            // The announced round being formed again is complete: write it
                            // before this event joins the next one.
                            pipeline.write(partition, &self.nats.js, &rounds);
                        }
                        match self.writes_for(&msg).await {
                            Ok(writes) => {
                                if !writes.is_empty() {
                                    pipeline.queue(partition, Routing { seq, writes });
                                }
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
                // Lowest priority: a round closes when nothing more is ready to read (or it is
                // full), so a lone event is written at once and a backlog in bundles.
                Some(partition) = std::future::ready(ready), if ready.is_some() => {
                    pipeline.write(partition, &self.nats.js, &rounds);
                }
            }
            while let Some(partition) = pipeline.ready(owned.read_to, true).filter(|_| fence.held())
            {
                pipeline.write(partition, &self.nats.js, &rounds);
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

    /// What must be written for one message: its tasks, or its dead letter. Fails, writing
    /// nothing, when the flow-control state cannot be read.
    async fn writes_for(&self, msg: &jetstream::Message) -> anyhow::Result<Vec<Write>> {
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
                    match self.pick_capable(capability, &event.aggregate_key()) {
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
                            out.push(Write::Other(DLQ_INGEST.to_string(), publish));
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
                        out.push(Write::Other(skipped.subject()?.to_string(), publish));
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
                        out.push(Write::Other(skipped.subject()?.to_string(), publish));
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
                    metrics().event_routed(&task.handler);
                    out.push(Write::Task {
                        task: Box::new(task),
                        alone: route.alone,
                    });
                }
            }
            Err(err) => {
                warn!(error = %err, seq = seq, "dead-lettering unparseable event");
                let dead = ingest_dead_letter(&err, &stored);
                metrics().events_out(EventsOut::DeadLetter, 1);
                let publish = PublishMessage::build()
                    .payload(dead.to_json_bytes())
                    .message_id(format!("ingest:{}", seq));
                out.push(Write::Other(DLQ_INGEST.to_string(), publish));
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

#[cfg(test)]
mod tests {
    use super::*;
    use grizzly_shared::Priority;

    fn task_of(n: u64, data_bytes: usize) -> Write {
        let subject = EventSubject::new("acct", format!("a{}", n % 3), "op").unwrap();
        let event = EventEnvelope::new(
            &subject,
            "test",
            serde_json::json!({"n": n, "pad": "x".repeat(data_bytes)}),
        );
        Write::Task {
            task: Box::new(Task::new("h", 1, n, 1, Priority::Normal, event)),
            alone: false,
        }
    }

    fn route(handler: &str) -> Route {
        Route {
            handler: handler.into(),
            version: 1,
            patterns: vec![],
            priority: Priority::Normal,
            capabilities: vec!["c".into()],
            alone: false,
        }
    }

    #[test]
    fn a_capability_request_goes_where_its_aggregate_hashes_whoever_routes_it() {
        let (a, b, c) = (route("alpha"), route("beta"), route("gamma"));
        let pick = |candidates: Vec<&Route>, key: &str| {
            rendezvous(candidates, key).map(|r| r.handler.clone())
        };
        assert_eq!(pick(vec![], "k"), None);
        let mut alpha = 0;
        for n in 0..1000 {
            let key = format!("req/r{n}");
            let first = pick(vec![&a, &b], &key).unwrap();
            // Another router (another order of the same candidates) picks the same.
            assert_eq!(pick(vec![&b, &a], &key).unwrap(), first);
            alpha += usize::from(first == "alpha");
            // A third candidate takes keys only for itself: the others' keys do not move.
            let with_gamma = pick(vec![&a, &b, &c], &key).unwrap();
            assert!(with_gamma == first || with_gamma == "gamma", "{key} moved");
        }
        assert!(
            (400..=600).contains(&alpha),
            "uneven spread: {alpha} of 1000"
        );
    }

    fn round(sizes: &[usize]) -> Vec<Routing> {
        (0u64..)
            .zip(sizes)
            .map(|(i, size)| Routing {
                seq: 10 + i,
                writes: vec![task_of(10 + i, *size)],
            })
            .collect()
    }

    #[test]
    fn a_round_becomes_one_bundle_per_subject_with_ids_from_its_first_sequence() {
        let bounds = partitions::Round { from: 10, to: 12 };
        let mut events = round(&[10, 10, 10]);
        events[1].writes.push(Write::Other(
            "dlq._ingest".into(),
            PublishMessage::build().message_id("ingest:11"),
        ));
        let Bundled {
            bundles: out,
            publishes: others,
            alone,
        } = bundles(0, bounds, events);
        assert_eq!(others.len(), 1, "the dead letter keeps its own message");
        assert!(alone.is_empty());
        assert_eq!(out.len(), 1);
        let bundle = &out[0];
        assert_eq!(bundle.id, "bundle:0:10:tasks.h.0:0");
        assert_eq!(bundle.subject, "tasks.h.0");
        assert_eq!(bundle.tasks, 3);
        let tasks: Vec<Task> = serde_json::from_slice(&bundle.payload).unwrap();
        let seqs: Vec<u64> = tasks.iter().map(|t| t.event_seq).collect();
        assert_eq!(seqs, [10, 11, 12], "in log order");
    }

    #[test]
    fn a_large_round_is_split_the_same_way_every_time() {
        let bounds = partitions::Round { from: 10, to: 14 };
        let sizes = [100_000, 100_000, 100_000, 10, 100_000];
        let ids = |b: &[Bundle]| b.iter().map(|b| b.id.clone()).collect::<Vec<_>>();
        let first = bundles(0, bounds, round(&sizes)).bundles;
        let again = bundles(0, bounds, round(&sizes)).bundles;
        assert_eq!(ids(&first), ids(&again));
        // 200 kB, then 200 kB: a third 100 kB task would pass 256 KiB.
        assert_eq!(first.len(), 2, "{:?}", ids(&first));
        for b in &first {
            assert!(b.payload.len() <= MAX_BUNDLE_BYTES + 1024);
            assert_eq!(
                b.tasks,
                serde_json::from_slice::<Vec<Task>>(&b.payload)
                    .unwrap()
                    .len()
            );
        }
        let total: usize = first.iter().map(|b| b.tasks).sum();
        assert_eq!(total, 5, "no task lost or repeated");
    }

    #[test]
    fn tasks_of_a_claude_handler_go_alone_in_log_order_even_in_a_bundled_round() {
        let mut events = round(&[10, 10, 10]);
        for routing in &mut events {
            for write in &mut routing.writes {
                if let Write::Task { alone, .. } = write {
                    *alone = routing.seq != 11;
                }
            }
        }
        let out = bundles(0, partitions::Round { from: 10, to: 12 }, events);
        assert_eq!(out.bundles.len(), 1);
        assert_eq!(
            out.bundles[0].tasks, 1,
            "only the task of event 11 is bundled"
        );
        assert_eq!(out.alone.len(), 2);
        assert!(out.alone.iter().all(|(subject, _)| subject == "tasks.h.0"));
    }
}
