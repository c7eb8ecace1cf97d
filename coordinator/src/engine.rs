//! One partition of workflow instances (`partition_for(instance_id)`), owned by exactly one
//! coordinator at a time (KV lease `wf.partition.<p>`).
//!
//! The engine is fed the log by its process's [`Reader`] (one ordered consumer for every owned
//! partition, filtered on `events.workflow.>` plus every trigger and wait pattern, each event
//! parsed and routed to the instances it names once) and applies it in log order per instance:
//! 1. take the events of the instances of this partition it concerns (a trigger, a step
//!    outcome, a timer, a child's end, an operator request) and match it against the waits of
//!    the instances waiting on an event;
//! 2. apply it ([`InstanceState::apply`]) and checkpoint the new state *with its effects* in KV
//!    `grizzly_wf_instances` (compare-and-set on the revision read);
//! 3. publish the effects (events, then tasks), each confirmed by the broker;
//! 4. move on; once a second, write the partition's cursor (`cursor.<p>`, the sequence from
//!    which it still has to apply the log).
//!
//! Steps 2–3 of the events waiting in the feed (up to [`GROUP`]) run at once for different
//! instances; an event for an instance with a write under way waits for it
//! ([`PartitionEngine::handle_all`]). The cursor moves past a group once all of it is written.
//!
//! A crash anywhere replays from the cursor: an instance whose `last_seq` already covers an
//! event skips it, and re-publishes its outbox for the last one it applied (same ids, dropped
//! as duplicates), so no step runs twice. A new owner starts at the cursor, so events are
//! applied in log order across fail-overs. Timers live in the checkpoints; the owner fires
//! due ones as `timer_fired` events.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use grizzly_shared::envelope::EventEnvelope;
use grizzly_shared::nats::{
    EVENTS_STREAM, LeaseFence, Nats, cursor_key, publish_all_confirmed, publish_confirmed,
};
use grizzly_shared::task::partition_for;
use grizzly_shared::{EventSubject, Settings, Task};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, error, info, warn};

use crate::instance::{
    AGGREGATE, Ctx, Effect, Input, InstanceState, ParentRef, SOURCE, instance_id_for_trigger,
    timer_event_id,
};
use crate::reader::{Fed, Reader};
use crate::registry::Registry;

pub const INSTANCES_BUCKET: &str = "grizzly_wf_instances";
/// How often a partition writes its cursor while it applies events: a coordinator killed
/// replays at most about this much of the log (harmless, see the module docs).
const CURSOR_EVERY: Duration = Duration::from_secs(1);
/// Most events a partition takes from its feed to apply together ([`PartitionEngine::handle_all`]).
const GROUP: usize = 64;

/// The owner line of the durable consumers partitions read the log through in releases before
/// the one reader (see [`PartitionEngine::resume_point`], which starts at their ack floor).
fn consumer_name(partition: u16) -> String {
    format!("coordinator-{partition}")
}

pub async fn ensure_instances_bucket(
    js: &jetstream::Context,
    replicas: usize,
) -> anyhow::Result<kv::Store> {
    Ok(grizzly_shared::nats::ensure_bucket(
        js,
        INSTANCES_BUCKET,
        "Grizzly workflow instance checkpoints",
        Duration::ZERO,
        replicas,
    )
    .await?)
}

/// Everything the partitions of one coordinator share.
pub struct Shared {
    pub nats: Nats,
    pub settings: Settings,
    pub registry: Registry,
    pub checkpoints: kv::Store,
    pub cursors: kv::Store,
}

/// What an event means for one instance.
#[derive(Debug, Clone)]
pub(crate) enum Routed {
    Start {
        workflow: String,
        version: Option<u32>,
        input: Option<Value>,
        parent: Option<ParentRef>,
    },
    Input(Input),
}

struct Cached {
    state: InstanceState,
    revision: u64,
}

/// What applying an event to an instance came to.
enum Prepared {
    /// Nothing to write (applied already, refused, or no such instance).
    Done,
    /// The checkpoint could not be read.
    Retry,
    /// A new state to checkpoint (compare-and-set on `revision`; `None` creates it) and whose
    /// outbox to publish.
    Write {
        state: Box<InstanceState>,
        revision: Option<u64>,
    },
}

/// A prepared state of a group not written yet (see [`PartitionEngine::handle_all`]).
struct Pending {
    instance: String,
    routed: Routed,
    fed: Arc<Fed>,
    state: InstanceState,
    revision: Option<u64>,
    span: tracing::Span,
}

pub struct PartitionEngine {
    pub shared: Arc<Shared>,
    reader: Reader,
    pub partition: u16,
    /// Past it the partition may be another coordinator's: pull nothing, fire no timer.
    fence: LeaseFence,
    instances: HashMap<String, Cached>,
    /// The cached instances waiting on an event: every event the partition is fed is matched
    /// against their waits (all instances would cost O(instances) per event).
    waiting: HashSet<String>,
    /// Timers whose `timer_fired` was published and not applied yet.
    fired: HashSet<(String, String)>,
    /// The earliest due timer not fired yet, once computed; `None` after a change.
    due: Option<Option<u64>>,
}

pub use grizzly_shared::clock::now_ms;

/// Filter subjects for a set of patterns: `events.workflow.>` plus the patterns, without the
/// ones another covers; `events.>` when two still overlap (the server refuses overlaps).
pub fn filter_subjects(patterns: &[String]) -> Vec<String> {
    let mut all: Vec<String> = vec![format!("events.{AGGREGATE}.>")];
    all.extend(patterns.iter().cloned());
    all.sort();
    all.dedup();
    let kept: Vec<String> = all
        .iter()
        .filter(|p| !all.iter().any(|q| q != *p && covers(q, p)))
        .cloned()
        .collect();
    for (i, a) in kept.iter().enumerate() {
        for b in &kept[i + 1..] {
            if overlaps(a, b) {
                return vec!["events.>".into()];
            }
        }
    }
    kept
}

/// Whether every subject matching `b` matches `a`.
fn covers(a: &str, b: &str) -> bool {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.split('.').collect(), b.split('.').collect());
    for (i, at) in a.iter().enumerate() {
        if *at == ">" {
            return b.len() > i;
        }
        match b.get(i) {
            None => return false,
            Some(&">") => return false,
            Some(&"*") if *at != "*" => return false,
            Some(bt) if *at != "*" && at != bt => return false,
            _ => {}
        }
    }
    a.len() == b.len()
}

/// Whether some subject matches both patterns.
fn overlaps(a: &str, b: &str) -> bool {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.split('.').collect(), b.split('.').collect());
    for i in 0.. {
        match (a.get(i), b.get(i)) {
            (None, None) => return true,
            (Some(&">"), Some(_)) | (Some(_), Some(&">")) => return true,
            (Some(x), Some(y)) if *x == "*" || *y == "*" || x == y => {}
            _ => return false,
        }
    }
    false
}

/// (Re)creates the durable consumer of `EVENTS` of one owner line — a workflow partition's
/// (`coordinator-<p>`) or the projector's (`coordinator-view`) — resuming at the ack floor of
/// the line's newest consumer: it delivers every event not yet acked, in log order, at once.
/// Reusing the old consumer instead would hand back its unacked events only after the ack
/// wait, behind newer ones — and an instance (or view entry) that applied a newer event skips
/// older ones as covered.
///
/// Every creation gets a name of its own, `<line>-<32 hex>`, and every older consumer of the
/// line is deleted first. A stalled predecessor (SIGSTOP, a long GC pause of its host) may
/// still send a pull request it had queued before it noticed its lease lapsed; under one
/// shared name that request reached the successor's consumer and took events the predecessor
/// never applied, which came back only after the ack wait. Now it addresses a consumer that is
/// gone, and fails.
pub async fn recreate_from_ack_floor(
    js: &jetstream::Context,
    line: &str,
    mut config: pull::Config,
) -> anyhow::Result<jetstream::consumer::Consumer<pull::Config>> {
    let stream = js.get_stream(EVENTS_STREAM).await?;
    let old = consumers_of_line(&stream, line).await?;
    // Newest by the broker's creation time (one clock): the line's current consumer.
    let start = old
        .iter()
        .max_by_key(|info| info.created)
        .map(|info| info.ack_floor.stream_sequence + 1);
    for info in &old {
        if let Err(e) = stream.delete_consumer(&info.name).await
            && stream.consumer_info(&info.name).await.is_ok()
        {
            anyhow::bail!("cannot delete consumer {}: {e}", info.name);
        }
    }
    config.durable_name = Some(format!(
        "{line}-{}",
        grizzly_shared::ids::new_event_id().replace('-', "")
    ));
    config.deliver_policy = match start {
        Some(start_sequence) if start_sequence > 1 => {
            DeliverPolicy::ByStartSequence { start_sequence }
        }
        _ => DeliverPolicy::All,
    };
    Ok(stream.create_consumer(config).await?)
}

/// The consumers of `EVENTS` that belong to an owner line (see [`recreate_from_ack_floor`]),
/// including one named `line` itself, as releases before per-creation names had it.
pub async fn consumers_of_line(
    stream: &jetstream::stream::Stream,
    line: &str,
) -> anyhow::Result<Vec<jetstream::consumer::Info>> {
    let mut all = stream.consumers();
    let mut mine = Vec::new();
    while let Some(info) = all.next().await {
        let info = info?;
        if of_line(&info.name, line) {
            mine.push(info);
        }
    }
    Ok(mine)
}

/// The line's current consumer (the newest), if there is one.
pub async fn current_consumer(
    js: &jetstream::Context,
    line: &str,
) -> anyhow::Result<Option<jetstream::consumer::Info>> {
    let stream = js.get_stream(EVENTS_STREAM).await?;
    Ok(consumers_of_line(&stream, line)
        .await?
        .into_iter()
        .max_by_key(|info| info.created))
}

fn of_line(name: &str, line: &str) -> bool {
    name == line
        || name
            .strip_prefix(line)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl PartitionEngine {
    pub fn new(shared: Arc<Shared>, reader: Reader, partition: u16, fence: LeaseFence) -> Self {
        Self {
            shared,
            reader,
            partition,
            fence,
            instances: HashMap::new(),
            waiting: HashSet::new(),
            fired: HashSet::new(),
            due: None,
        }
    }

    fn cache(&mut self, instance: String, cached: Cached) {
        if cached.state.waits().is_empty() {
            self.waiting.remove(&instance);
        } else {
            self.waiting.insert(instance.clone());
        }
        self.instances.insert(instance, cached);
        self.due = None;
    }

    fn uncache(&mut self, instance: &str) -> Option<Cached> {
        self.waiting.remove(instance);
        self.due = None;
        self.instances.remove(instance)
    }

    fn mine(&self, instance: &str) -> bool {
        partition_for(instance, self.shared.settings.partitions) == self.partition
    }

    /// Loads the unfinished instances of this partition.
    async fn load(&mut self) -> anyhow::Result<()> {
        self.instances.clear();
        self.waiting.clear();
        self.due = None;
        let kv = self.shared.checkpoints.clone();
        let mut keys = kv.keys().await?;
        let mut mine = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key?;
            if self.mine(&key) {
                mine.push(key);
            }
        }
        for key in mine {
            if let Some(entry) = kv.entry(&key).await?
                && let Ok(state) = serde_json::from_slice::<InstanceState>(&entry.value)
                && !state.status.is_terminal()
            {
                // Known definitions keep the consumer's filter complete.
                if let Err(e) = self
                    .shared
                    .registry
                    .get(&state.workflow, state.version)
                    .await
                {
                    error!(instance = %key, error = %e, "definition of a running instance is missing");
                }
                self.cache(
                    key,
                    Cached {
                        state,
                        revision: entry.revision,
                    },
                );
            }
        }
        Ok(())
    }

    /// Where this partition resumes: its cursor; for a partition last run by a release with
    /// a durable consumer of its own, that consumer's ack floor (the consumers are deleted:
    /// nothing reads them any more).
    async fn resume_point(&self) -> anyhow::Result<u64> {
        let key = cursor_key(self.partition);
        if let Some(value) = self.shared.cursors.get(&key).await? {
            match std::str::from_utf8(&value)
                .ok()
                .and_then(|v| v.parse().ok())
            {
                Some(from) => return Ok(from),
                // Replaying the whole log is slow but harmless (`last_seq`); skipping is not.
                None => {
                    error!(partition = self.partition, cursor = %String::from_utf8_lossy(&value), "the cursor is not a stream sequence; replaying the log from its start");
                    return Ok(1);
                }
            }
        }
        let stream = self.shared.nats.js.get_stream(EVENTS_STREAM).await?;
        let line = consumers_of_line(&stream, &consumer_name(self.partition)).await?;
        let from = line
            .iter()
            .max_by_key(|info| info.created)
            .map_or(1, |info| info.ack_floor.stream_sequence + 1);
        for info in &line {
            stream.delete_consumer(&info.name).await?;
        }
        Ok(from)
    }

    /// Writes the partition's cursor, while the partition is surely still this coordinator's
    /// (a lapsed owner's cursor may be behind its successor's; replaying is harmless, but
    /// there is no need for it).
    async fn save_cursor(&self, next: u64) {
        if !self.fence.held() {
            return;
        }
        let key = cursor_key(self.partition);
        if let Err(e) = self.shared.cursors.put(&key, next.to_string().into()).await {
            warn!(partition = self.partition, error = %e, "cannot write the cursor; the next owner replays more");
        }
    }

    /// Runs the partition until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        let p = self.partition;
        let mut next = loop {
            let ready = async {
                self.load().await.context("loading checkpoints")?;
                self.resume_point().await.context("partition cursor")
            };
            match ready.await {
                Ok(from) => break from,
                Err(e) => {
                    warn!(partition = p, error = %e, "cannot take partition yet; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        };
        info!(
            partition = p,
            instances = self.instances.len(),
            from = next,
            "workflow partition acquired"
        );
        let fence = self.fence.clone();
        let mut saved = (next, tokio::time::Instant::now());
        'feed: while !stop.is_cancelled() {
            if !fence.held() {
                // Back in possession (renewed), it resumes where it stopped applying.
                tokio::select! {
                    _ = stop.cancelled() => break 'feed,
                    _ = fence.renewed() => {}
                }
            }
            let mut feed = self.reader.subscribe(p, next);
            loop {
                if !fence.held() {
                    // Not surely ours any more: apply nothing (dropping the feed ends it).
                    continue 'feed;
                }
                self.fire_due_timers().await;
                if next > saved.0 && saved.1.elapsed() >= CURSOR_EVERY {
                    self.save_cursor(next).await;
                    saved = (next, tokio::time::Instant::now());
                }
                let next_due = self.next_due();
                let sleep = async {
                    match next_due {
                        Some(at) => {
                            tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms())))
                                .await
                        }
                        None => tokio::time::sleep(CURSOR_EVERY).await,
                    }
                };
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break 'feed,
                    _ = fence.lapsed() => continue 'feed,
                    _ = sleep => {}
                    msg = feed.recv() => match msg {
                        Some(fed) => {
                            let mut group = vec![fed];
                            while group.len() < GROUP {
                                match feed.try_recv() {
                                    Ok(fed) => group.push(fed),
                                    Err(_) => break,
                                }
                            }
                            next = self.handle_all(group, next).await;
                        }
                        // The reader stopped: the process is shutting down.
                        None => break 'feed,
                    },
                }
            }
        }
        if next > saved.0 {
            self.save_cursor(next).await;
        }
        info!(partition = p, "workflow partition released");
    }

    fn next_due(&mut self) -> Option<u64> {
        if let Some(due) = self.due {
            return due;
        }
        let fired = &self.fired;
        let due = self
            .instances
            .iter()
            .flat_map(|(id, c)| {
                c.state
                    .timers
                    .iter()
                    .filter(move |(t, _)| !fired.contains(&(id.clone(), (*t).clone())))
                    .map(|(_, due)| *due)
            })
            .min();
        self.due = Some(due);
        due
    }

    /// Publishes `timer_fired` for every due timer (applied when it comes back in the log).
    async fn fire_due_timers(&mut self) {
        let now = now_ms();
        if self.next_due().is_none_or(|due| due > now) {
            return;
        }
        self.due = None;
        let due: Vec<(String, String, String)> = self
            .instances
            .iter()
            .flat_map(|(id, c)| {
                c.state
                    .timers
                    .iter()
                    .filter(|(_, due)| **due <= now)
                    .map(|(t, _)| (id.clone(), t.clone(), c.state.correlation.clone()))
            })
            .filter(|(id, t, _)| !self.fired.contains(&(id.clone(), t.clone())))
            .collect();
        for (instance, timer, correlation) in due {
            let subject = EventSubject::new(AGGREGATE, &instance, "timer_fired").expect("valid");
            let mut event = EventEnvelope::new(&subject, SOURCE, json!({"timer": timer}));
            event.id = timer_event_id(&instance, &timer);
            event.correlationid = Some(correlation);
            let publish = PublishMessage::build()
                .payload(event.to_json_bytes())
                .headers(event.headers());
            publish_confirmed(&self.shared.nats.js, &subject.to_string(), publish, None).await;
            debug!(%instance, %timer, "timer fired");
            self.fired.insert((instance, timer));
        }
    }

    /// Applies events fed together and returns the sequence to go on from. The events of
    /// different instances are written at once — a partition's burst costs about one round
    /// trip per group instead of one per event — and an event for an instance with a write
    /// under way waits for it, so each instance sees its events in log order. Stops early if
    /// the lease lapses.
    async fn handle_all(&mut self, group: Vec<Arc<Fed>>, mut next: u64) -> u64 {
        let mut writes: Vec<Pending> = Vec::new();
        for fed in group {
            if !self.fence.held() {
                break;
            }
            // Unparseable events are the listener's to dead-letter.
            if let Some(event) = &fed.event {
                let mut routed = self.route(&fed, event);
                if routed
                    .iter()
                    .any(|(i, _)| writes.iter().any(|w| &w.instance == i))
                {
                    // Routed against a state not written yet: write, then route again.
                    self.flush(&mut writes).await;
                    routed = self.route(&fed, event);
                }
                for (instance, routed) in routed {
                    if writes.iter().any(|w| w.instance == instance) {
                        self.flush(&mut writes).await;
                    }
                    // The step this event moves on joins the event's trace; what it writes
                    // (transition events, step tasks) continues from this span.
                    let span = tracing::debug_span!("workflow", otel.kind = "consumer", instance = %instance, event.id = %event.id, event.r#type = %event.event_type);
                    grizzly_shared::trace::follow(&span, event);
                    let prepared = self
                        .prepare(&instance, &routed, event, fed.seq)
                        .instrument(span.clone())
                        .await;
                    match prepared {
                        Prepared::Done => {}
                        Prepared::Retry => {
                            self.flush(&mut writes).await;
                            self.process(&instance, &routed, event, fed.seq)
                                .instrument(span)
                                .await;
                        }
                        Prepared::Write { state, revision } => {
                            let state = *state;
                            // Later events of the group are routed against the new state (its
                            // waits); no event of this instance is applied before it is written.
                            self.cache(
                                instance.clone(),
                                Cached {
                                    state: state.clone(),
                                    revision: revision.unwrap_or_default(),
                                },
                            );
                            writes.push(Pending {
                                instance,
                                routed,
                                fed: fed.clone(),
                                state,
                                revision,
                                span,
                            });
                        }
                    }
                }
            }
            next = fed.seq + 1;
        }
        self.flush(&mut writes).await;
        next
    }

    /// Writes the pending checkpoints at once, each then publishing its outbox; one that
    /// conflicts is read again and its event applied anew.
    async fn flush(&mut self, writes: &mut Vec<Pending>) {
        let shared = self.shared.clone();
        let results = futures::future::join_all(writes.iter().map(|w| {
            commit(&shared, &w.instance, &w.state, w.revision).instrument(w.span.clone())
        }))
        .await;
        for (w, written) in writes.drain(..).zip(results) {
            match written {
                Ok(revision) => self.committed(&w.instance, w.state, revision),
                Err(e) => {
                    // Someone else wrote (a previous owner still finishing): read and redo.
                    warn!(instance = %w.instance, error = %e, "checkpoint conflict; re-reading");
                    self.uncache(&w.instance);
                    let event = w
                        .fed
                        .event
                        .as_ref()
                        .expect("only parsed events are applied");
                    self.process(&w.instance, &w.routed, event, w.fed.seq)
                        .instrument(w.span)
                        .await;
                }
            }
        }
    }

    /// What the event means for this partition's instances: what the reader routed here, and
    /// the awaited events of the instances waiting on one.
    fn route(&self, fed: &Fed, event: &EventEnvelope) -> Vec<(String, Routed)> {
        let subject = fed.subject.as_str();
        let mut out: Vec<(String, Routed)> = fed
            .directed
            .iter()
            .filter(|d| d.partition == self.partition)
            .map(|d| (d.instance.clone(), d.routed.clone()))
            .collect();
        let waiting = self
            .waiting
            .iter()
            .filter_map(|id| Some((id.as_str(), &self.instances.get(id)?.state)));
        out.extend(awaited(subject, event, waiting));
        out
    }

    /// Applies one routed event to one instance: checkpoint (with the outbox), then publish;
    /// after a failed read or a conflicting write, again until it holds.
    async fn process(&mut self, instance: &str, routed: &Routed, event: &EventEnvelope, seq: u64) {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            if attempt > 1 {
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt.min(40)))).await;
            }
            let (state, revision) = match self.prepare(instance, routed, event, seq).await {
                Prepared::Done => return,
                Prepared::Retry => continue,
                Prepared::Write { state, revision } => (*state, revision),
            };
            match commit(&self.shared, instance, &state, revision).await {
                Ok(revision) => return self.committed(instance, state, revision),
                Err(e) => {
                    // Someone else wrote (a previous owner still finishing): read and redo.
                    warn!(%instance, error = %e, "checkpoint conflict; re-reading");
                    self.uncache(instance);
                }
            }
        }
    }

    /// The state one routed event moves an instance to, not written yet (the instance is out
    /// of the cache until it is, see [`Self::committed`]).
    async fn prepare(
        &mut self,
        instance: &str,
        routed: &Routed,
        event: &EventEnvelope,
        seq: u64,
    ) -> Prepared {
        let current = match self.current(instance).await {
            Ok(c) => c,
            Err(e) => {
                warn!(%instance, error = %e, "cannot read checkpoint; retrying");
                return Prepared::Retry;
            }
        };
        let current = match current {
            Some(c) if seq <= c.state.last_seq => {
                if seq == c.state.last_seq {
                    publish(&self.shared, &c.state.outbox).await;
                }
                self.cache(instance.to_string(), c);
                return Prepared::Done;
            }
            other => other,
        };
        let applied = apply_routed(
            &self.shared,
            instance,
            current.as_ref().map(|c| &c.state),
            routed,
            event,
            seq,
            now_ms(),
        )
        .await;
        match applied {
            Applied::Unchanged => {
                if let Some(c) = current {
                    self.cache(instance.to_string(), c);
                }
                Prepared::Done
            }
            Applied::Rejected(rejected) => {
                publish(&self.shared, &[*rejected]).await;
                Prepared::Done
            }
            Applied::Changed(state) => Prepared::Write {
                state,
                revision: current.map(|c| c.revision),
            },
        }
    }

    /// Takes a written state into the cache (a finished instance leaves it).
    fn committed(&mut self, instance: &str, state: InstanceState, revision: u64) {
        self.fired
            .retain(|(i, t)| i != instance || state.timers.contains_key(t));
        if state.status.is_terminal() {
            self.uncache(instance);
        } else {
            self.cache(instance.to_string(), Cached { state, revision });
        }
    }

    /// The instance's checkpoint: cached, or read from KV.
    async fn current(&mut self, instance: &str) -> anyhow::Result<Option<Cached>> {
        if let Some(c) = self.uncache(instance) {
            return Ok(Some(c));
        }
        Ok(match self.shared.checkpoints.entry(instance).await? {
            Some(entry) if entry.operation == kv::Operation::Put => Some(Cached {
                state: serde_json::from_slice(&entry.value)?,
                revision: entry.revision,
            }),
            _ => None,
        })
    }
}

/// What the coordinators read of the log: [`filter_subjects`] of every known version's
/// triggers and waits. It follows the definitions loaded (a pinned older version may wait on
/// other subjects than the files), worked out again only when a version is pinned: not once
/// per event.
pub(crate) struct ReadFilter {
    pins: usize,
    subjects: Vec<String>,
}

impl ReadFilter {
    pub(crate) fn new() -> Self {
        Self {
            pins: usize::MAX,
            subjects: Vec::new(),
        }
    }

    pub(crate) fn current(&mut self, registry: &Registry) -> &[String] {
        if registry.pinned_count() != self.pins {
            self.pins = registry.pinned_count();
            self.subjects = filter_subjects(&registry.subscriptions());
        }
        &self.subjects
    }
}

/// The inputs `event` is for instances waiting on an event (each a step whose wait it matches).
pub(crate) fn awaited<'a>(
    subject: &str,
    event: &EventEnvelope,
    waiting: impl Iterator<Item = (&'a str, &'a InstanceState)>,
) -> Vec<(String, Routed)> {
    let mut out = Vec::new();
    // Serialized only for an event some instance waits on.
    let mut event_json = None;
    for (id, state) in waiting {
        for (step, wait) in state.waits() {
            if wait.matches(subject, event) {
                let mut ev = event_json
                    .get_or_insert_with(|| serde_json::to_value(event).unwrap_or_default())
                    .clone();
                ev["subject"] = json!(subject);
                out.push((
                    id.to_string(),
                    Routed::Input(Input::Event {
                        step: step.to_string(),
                        event: ev,
                    }),
                ));
            }
        }
    }
    out
}

/// What one routed event does to an instance.
pub(crate) enum Applied {
    /// Nothing to write: an input for no instance, a start of one that exists, an input that
    /// changes nothing, or an instance whose definition is gone.
    Unchanged,
    /// A start the registry refuses: only its `start_rejected` event is to be published.
    Rejected(Box<Effect>),
    /// The new state (`last_seq` = the event's), its effects in its outbox.
    Changed(Box<InstanceState>),
}

/// Applies one routed event to an instance's state (`None`: it has none) at time `now_ms`:
/// the interpreter's part of applying an event, without reading or writing checkpoints. The
/// partitions call it with the clock, `grizzly workflow restore` with each event's stored time.
pub(crate) async fn apply_routed(
    shared: &Shared,
    instance: &str,
    current: Option<&InstanceState>,
    routed: &Routed,
    event: &EventEnvelope,
    seq: u64,
    now_ms: u64,
) -> Applied {
    let catalog = shared.registry.catalog();
    let (mut state, outbox) = match (current, routed) {
        // Started already (a replayed trigger beyond the dedup window).
        (Some(_), Routed::Start { .. }) | (None, Routed::Input(_)) => return Applied::Unchanged,
        (
            None,
            Routed::Start {
                workflow,
                version,
                input,
                parent,
            },
        ) => {
            let def = match shared.registry.for_start(workflow, *version).await {
                Ok(def) => def,
                Err(e) => {
                    warn!(%instance, error = %e, "start refused");
                    return Applied::Rejected(Box::new(start_rejected(
                        instance, workflow, &e, event,
                    )));
                }
            };
            let ctx = Ctx {
                def: &def.spec,
                catalog: &catalog,
                now_ms,
                cause: event,
            };
            InstanceState::start(&ctx, instance, input.clone(), parent.clone())
        }
        (Some(c), Routed::Input(input)) => {
            let def = match shared.registry.get(&c.workflow, c.version).await {
                Ok(def) => def,
                Err(e) => {
                    error!(%instance, error = %e, "no definition for instance; event skipped");
                    return Applied::Unchanged;
                }
            };
            let ctx = Ctx {
                def: &def.spec,
                catalog: &catalog,
                now_ms,
                cause: event,
            };
            let mut st = c.clone();
            let fx = st.apply(&ctx, input.clone());
            if fx.is_empty() && st == *c {
                return Applied::Unchanged;
            }
            (st, fx)
        }
    };
    state.outbox = outbox;
    state.last_seq = seq;
    Applied::Changed(Box::new(state))
}

/// The `start_rejected` event of a start the registry refused (its id derived from the
/// instance and the trigger, so a replay writes the same one).
fn start_rejected(instance: &str, workflow: &str, error: &str, event: &EventEnvelope) -> Effect {
    let subject = EventSubject::new(AGGREGATE, instance, "start_rejected").expect("valid");
    let mut rejected = event.caused(
        &subject,
        SOURCE,
        json!({"workflow": workflow, "error": error}),
        &[],
    );
    rejected.id =
        grizzly_shared::ids::derived_id(&["workflow", instance, "start_rejected", &event.id]);
    Effect::Event { event: rejected }
}

/// Writes an instance's checkpoint (compare-and-set on `revision`; `None` creates it), then
/// publishes its outbox; the new revision.
async fn commit(
    shared: &Shared,
    instance: &str,
    state: &InstanceState,
    revision: Option<u64>,
) -> Result<u64, String> {
    let bytes: bytes::Bytes = serde_json::to_vec(state).expect("state serializes").into();
    let written = match revision {
        None => shared.checkpoints.create(instance, bytes).await,
        Some(r) => shared
            .checkpoints
            .update(instance, bytes, r)
            .await
            .map_err(Into::into),
    }
    .map_err(|e| e.to_string())?;
    publish(shared, &state.outbox).await;
    Ok(written)
}

/// Publishes effects in order, confirmed: first every event, sent together and then
/// confirmed one by one (one round trip, not one per event: a step's events went out one
/// after another), then the tasks, which carry their step event's sequence.
pub(crate) async fn publish(shared: &Shared, effects: &[Effect]) {
    let js = &shared.nats.js;
    let span = tracing::Span::current();
    let events: Vec<EventEnvelope> = effects
        .iter()
        .map(|effect| {
            let mut event = effect.event().clone();
            grizzly_shared::trace::stamp(&mut event, &span);
            event
        })
        .collect();
    let publishes = events
        .iter()
        .map(|event| {
            let publish = PublishMessage::build()
                .payload(event.to_json_bytes())
                .headers(event.headers());
            (event.subject().expect("valid").to_string(), publish)
        })
        .collect();
    let acks = publish_all_confirmed(js, publishes).await;
    let tasks = effects
        .iter()
        .zip(events)
        .zip(acks)
        .filter_map(|((effect, event), ack)| task_message(shared, effect, event, ack.sequence))
        .collect();
    publish_all_confirmed(js, tasks).await;
}

/// The `TASKS` message of a step's [`Effect::Task`], whose event `event` is stored at `seq`
/// (`None` for an [`Effect::Event`]).
pub(crate) fn task_message(
    shared: &Shared,
    effect: &Effect,
    event: EventEnvelope,
    seq: u64,
) -> Option<(String, PublishMessage)> {
    let Effect::Task {
        handler,
        version,
        priority,
        lane,
        timeout_ms,
        max_attempts,
        ..
    } = effect
    else {
        return None;
    };
    let partitions = shared.settings.partitions;
    let mut task = Task::new(handler, *version, seq, partitions, *priority, event)
        .with_ordering_key(lane.clone(), partitions);
    task.timeout_ms = *timeout_ms;
    task.max_attempts = *max_attempts;
    let publish = PublishMessage::build()
        .payload(task.to_json_bytes())
        .message_id(task.msg_id());
    Some((task.subject(), publish))
}

/// An event routed to one instance.
pub(crate) struct Directed {
    pub partition: u16,
    pub instance: String,
    pub(crate) routed: Routed,
}

/// What an event means for instances it names (a trigger, a step outcome, a timer, a child's
/// end, an operator request), found once per event by the reader for every partition; an
/// awaited event is matched by the partitions against their waiting instances.
pub(crate) fn directed(shared: &Shared, subject: &str, event: &EventEnvelope) -> Vec<Directed> {
    let mut out = Vec::new();
    let data = &event.data;
    if event.aggregatetype == AGGREGATE {
        let id = event.aggregateid.clone();
        let str_of = |k: &str| data.get(k).and_then(Value::as_str).map(str::to_string);
        match event.event_type.as_str() {
            "start_requested" => {
                if let Some(workflow) = str_of("workflow") {
                    out.push((
                        id.clone(),
                        Routed::Start {
                            workflow,
                            version: data
                                .get("version")
                                .and_then(Value::as_u64)
                                .map(|v| v as u32),
                            input: data.get("input").cloned(),
                            parent: data
                                .get("parent")
                                .and_then(|p| serde_json::from_value(p.clone()).ok()),
                        },
                    ));
                }
            }
            t @ ("suspend_requested" | "resume_requested" | "cancel_requested") => {
                let transition =
                    crate::machine::Transition::parse_request(t.trim_end_matches("_requested"))
                        .expect("matched above");
                out.push((
                    id.clone(),
                    Routed::Input(Input::Request {
                        transition,
                        reason: str_of("reason"),
                    }),
                ));
            }
            "handler_succeeded" | "handler_failed" => {
                let ok = event.event_type == "handler_succeeded";
                let last = ok
                    || data.get("dead_lettered").and_then(Value::as_bool) == Some(true)
                    || data.get("will_retry").and_then(Value::as_bool) == Some(false);
                if let (true, Some(event_id)) = (last, str_of("event_id")) {
                    out.push((
                        id.clone(),
                        Routed::Input(Input::Outcome {
                            event_id,
                            ok,
                            output: data.get("output").cloned().unwrap_or_default(),
                            error: str_of("error"),
                        }),
                    ));
                }
            }
            "timer_fired" => {
                if let Some(timer) = str_of("timer") {
                    out.push((id.clone(), Routed::Input(Input::Timer { id: timer })));
                }
            }
            t @ ("completed" | "failed" | "cancelled") if event.source == SOURCE => {
                if let Some(parent) = data
                    .get("parent")
                    .and_then(|p| serde_json::from_value::<ParentRef>(p.clone()).ok())
                {
                    out.push((
                        parent.instance,
                        Routed::Input(Input::Child {
                            child: id.clone(),
                            ok: t == "completed",
                            output: data.get("output").cloned().unwrap_or_default(),
                            error: str_of("error").or_else(|| Some(format!("sub-workflow {t}"))),
                        }),
                    ));
                }
            }
            _ => {}
        }
    }
    for w in shared.registry.latest() {
        if w.spec
            .on
            .iter()
            .any(|p| grizzly_shared::subject::pattern_matches(&p.value, subject))
        {
            out.push((
                instance_id_for_trigger(w.name(), &event.id),
                Routed::Start {
                    workflow: w.name().to_string(),
                    version: Some(w.version()),
                    input: None,
                    parent: None,
                },
            ));
        }
    }
    out.into_iter()
        .map(|(instance, routed)| Directed {
            partition: partition_for(&instance, shared.settings.partitions),
            instance,
            routed,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumers_belong_to_their_line_only() {
        let id = "0193b5e2c4f27c1a9e4b8d2f6a1c3e5b";
        assert!(of_line("coordinator-3", "coordinator-3"));
        assert!(of_line(&format!("coordinator-3-{id}"), "coordinator-3"));
        assert!(!of_line(&format!("coordinator-31-{id}"), "coordinator-3"));
        assert!(!of_line(&format!("coordinator-3-{id}"), "coordinator-31"));
        assert!(!of_line("coordinator-3-x", "coordinator-3"));
        assert!(!of_line("coordinator-view", "coordinator-3"));
        assert!(of_line(
            &format!("coordinator-view-{id}"),
            "coordinator-view"
        ));
    }

    #[test]
    fn filter_subjects_drop_covered_patterns_and_fall_back_on_overlap() {
        let f = filter_subjects(&["events.workflow.*.x".into(), "events.pr.*.opened".into()]);
        assert_eq!(f, vec!["events.pr.*.opened", "events.workflow.>"]);
        let f = filter_subjects(&["events.a.*.x".into(), "events.a.b.*".into()]);
        assert_eq!(f, vec!["events.>"]);
        let f = filter_subjects(&["events.>".into()]);
        assert_eq!(f, vec!["events.>"]);
        assert!(covers("events.*.*.x", "events.a.b.x"));
        assert!(!covers("events.a.b.x", "events.*.b.x"));
    }
}
