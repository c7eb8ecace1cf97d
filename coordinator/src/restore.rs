//! `grizzly workflow restore`: rebuilds the instances' checkpoints from the log, for a
//! deployment that has the log but lost the coordinators' KV state — a region promoted after a
//! failover (KV buckets are not replicated, docs/multi-region.md) or lost buckets. Without it
//! the instances that were running there are stuck: their later events find no checkpoint.
//!
//! Every input of the interpreter is an event of the log (a trigger, a step's outcome, a
//! timer's firing, a child's end, an operator's request), and it decides on nothing else but
//! the workflow definition and the event's time. So the restore replays the log, first event
//! to last, through the partitions' own code ([`apply_routed`], at each event's stored time),
//! in memory, holding back every effect. An effect's id derives from its instance and step, so
//! the replay sees which effects the log already holds: an effect is expected from when it is
//! produced, and found when the message with its id goes by (an effect is always written
//! after the event that caused it). At the end of the log it
//! 1. publishes the effects never found: written into the lost checkpoints' outboxes but not
//!    into the log that survived (e.g. the mirror's lag at a failover);
//! 2. writes again the tasks of steps still in flight (`TASKS` is not replicated), with their
//!    step events' sequences, so their handlers run (once more, if the lost deployment had
//!    already started them: at least once, as after any crash);
//! 3. writes the checkpoints of the instances still running (`last_seq` = the last event each
//!    applied; those that ended were written as they ended, so memory holds the running ones);
//! 4. starts every coordinator partition after the last event replayed.
//!
//! The coordinators started afterwards fire the timers due and apply what the log receives
//! from then on. It refuses while a coordinator runs (it would apply the log meanwhile), while
//! checkpoints exist (the restore rebuilds lost state, it does not merge with some) and with
//! fewer partitions than a cursor bucket shows (tasks would go where no worker reads).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use async_nats::jetstream;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use futures::StreamExt as _;
use grizzly_shared::Settings;
use grizzly_shared::envelope::{EventEnvelope, StoredMessage};
use grizzly_shared::headers;
use grizzly_shared::nats::{self, EVENTS_STREAM, Nats, cursor_key};
use grizzly_shared::subject::pattern_matches;
use serde_json::Value;

use crate::engine::{
    Applied, INSTANCES_BUCKET, ReadFilter, Routed, Shared, apply_routed, awaited, directed,
    publish, task_message,
};
use crate::instance::{AGGREGATE, Effect, Input, InstanceState};

/// What a restore did.
#[derive(Debug, Default)]
pub struct Restored {
    /// The log replayed: its first and last sequence (`None`: the log is empty).
    pub replayed: Option<(u64, u64)>,
    /// Events that concerned an instance.
    pub applied: u64,
    /// Checkpoints written, and how many of them are not finished.
    pub instances: usize,
    pub unfinished: usize,
    /// Effects the log did not hold, published now.
    pub published: usize,
    /// Tasks of steps in flight, written again.
    pub tasks: usize,
    /// Instances that could not be rebuilt, and why.
    pub skipped: Vec<String>,
    /// The sequence every coordinator partition starts at.
    pub cursor: u64,
}

/// Rebuilds the checkpoints (see the module docs).
pub async fn restore(nats: &Nats, settings: &Settings) -> anyhow::Result<Restored> {
    let js = &nats.js;
    let events = js
        .get_stream(EVENTS_STREAM)
        .await
        .context("no EVENTS stream on this server (check --nats-url)")?;
    // A running coordinator would apply the log (from no cursor: its start) meanwhile.
    let running = nats::lease_holders(js, "wf.")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some((key, holder)) = running.into_iter().next() {
        bail!(
            "a coordinator is running ({key} is held by {holder}): stop every coordinator first, then restore"
        );
    }
    // Tasks go to `partition_for(…, partitions)`: the deployment's count, as far as the
    // cursors (e.g. of `grizzly cursors set`, run first) tell.
    nats::check_partitions(
        js,
        &[nats::CURSORS_BUCKET, crate::reader::CURSORS_BUCKET],
        settings.partitions,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    if let Ok(checkpoints) = js.get_key_value(INSTANCES_BUCKET).await
        && let Some(key) = checkpoints.keys().await?.next().await
    {
        bail!(
            "{INSTANCES_BUCKET} holds checkpoints (instance {}): restore rebuilds them where all are lost; \
             to rebuild every one from the log, delete the bucket first (`nats kv del {INSTANCES_BUCKET}`)",
            key?
        );
    }
    let (shared, _, _) = crate::open(nats, settings).await?;
    let state = events.cached_info().state.clone();
    let mut replay = Replay {
        shared: shared.clone(),
        versions: started_versions(js, state.last_sequence).await?,
        instances: BTreeMap::new(),
        waiting: HashSet::new(),
        finished: HashSet::new(),
        ended: Vec::new(),
        missing: BTreeMap::new(),
        index: HashMap::new(),
        produced: 0,
        found_tasks: HashMap::new(),
        applied: 0,
        skipped: Vec::new(),
    };
    let mut done = Restored {
        cursor: state.last_sequence + 1,
        ..Restored::default()
    };
    if state.messages > 0 {
        replay.run(js, state.last_sequence).await?;
        done.replayed = Some((state.first_sequence, state.last_sequence));
    }
    done.applied = replay.applied;
    done.skipped = std::mem::take(&mut replay.skipped);

    // 1–2: what the log lacks, and the tasks of the steps in flight.
    let in_flight = |effect: &Effect| {
        let event = effect.event();
        replay
            .instances
            .get(&event.aggregateid)
            .is_some_and(|st| st.inflight.contains_key(&event.id))
    };
    let missing: Vec<Effect> = replay
        .missing
        .values()
        .map(|effect| match effect {
            Effect::Task { event, .. } if !in_flight(effect) => Effect::Event {
                event: event.clone(),
            },
            other => other.clone(),
        })
        .collect();
    done.published = missing.len();
    done.tasks = missing
        .iter()
        .filter(|e| matches!(e, Effect::Task { .. }))
        .count();
    publish(&shared, &missing).await;
    let tasks: Vec<_> = replay
        .found_tasks
        .values()
        .filter(|(effect, _)| in_flight(effect))
        .filter_map(|(effect, seq)| task_message(&shared, effect, effect.event().clone(), *seq))
        .collect();
    done.tasks += tasks.len();
    nats::publish_all_confirmed(js, tasks).await;

    // 3–4: the checkpoints, then where the coordinators start.
    done.unfinished = replay.instances.len();
    done.instances = replay.finished.len() + done.unfinished;
    write_checkpoints(&shared, replay.instances.into_values()).await?;
    for p in 0..settings.partitions {
        shared
            .cursors
            .put(cursor_key(p), done.cursor.to_string().into())
            .await
            .with_context(|| format!("writing cursor.{p}"))?;
    }
    Ok(done)
}

/// The version each instance of the log started on (its `created` event): a trigger replayed
/// starts the version the lost deployment started, not the newest on disk now.
async fn started_versions(
    js: &jetstream::Context,
    last: u64,
) -> anyhow::Result<HashMap<String, u32>> {
    let mut versions = HashMap::new();
    let mut log = LogReader::open(js, format!("events.{AGGREGATE}.*.created"), last).await?;
    while let Some(msg) = log.next().await? {
        let Ok(stored) = StoredMessage::from_jetstream(&msg) else {
            continue;
        };
        if let Ok(event) = EventEnvelope::from_stored(&stored, usize::MAX)
            && let Some(v) = event.data.get("version").and_then(Value::as_u64)
        {
            versions.insert(event.aggregateid, v as u32);
        }
    }
    Ok(versions)
}

struct Replay {
    shared: Arc<Shared>,
    versions: HashMap<String, u32>,
    instances: BTreeMap<String, InstanceState>,
    /// Instances waiting on an event (matched against every event, like a partition's).
    waiting: HashSet<String>,
    /// Instances that ended: their checkpoints are written soon (`ended`, in groups) and only
    /// their ids kept, so memory holds the instances running at once, not the whole log's.
    finished: HashSet<String>,
    ended: Vec<InstanceState>,
    /// Effects produced and not found in the log (yet), by the order produced; `index` finds
    /// them by event id.
    missing: BTreeMap<u64, Effect>,
    index: HashMap<String, u64>,
    produced: u64,
    /// Step events found in the log, with their sequences, until their outcomes are.
    found_tasks: HashMap<String, (Effect, u64)>,
    applied: u64,
    skipped: Vec<String>,
}

impl Replay {
    async fn run(&mut self, js: &jetstream::Context, last: u64) -> anyhow::Result<()> {
        let mut log = LogReader::open(js, String::new(), last).await?;
        // The events a partition would be fed: the coordinators' reader filter.
        let mut filters = ReadFilter::new();
        while let Some(msg) = log.next().await? {
            let Ok(stored) = StoredMessage::from_jetstream(&msg) else {
                continue;
            };
            let seq = stored.stream_sequence;
            if let Some(id) = stored
                .headers
                .and_then(|h| h.get(headers::MSG_ID))
                .map(|v| v.as_str().to_string())
            {
                self.found(&id, seq);
            }
            if !filters
                .current(&self.shared.registry)
                .iter()
                .any(|f| pattern_matches(f, stored.subject))
            {
                continue;
            }
            let Ok(event) = EventEnvelope::from_stored(&stored, usize::MAX) else {
                continue;
            };
            let now_ms = (stored.published.unix_timestamp_nanos() / 1_000_000) as u64;
            let mut routed: Vec<(String, Routed)> = directed(&self.shared, stored.subject, &event)
                .into_iter()
                .map(|d| (d.instance, d.routed))
                .collect();
            let waiting = self
                .waiting
                .iter()
                .filter_map(|id| Some((id.as_str(), self.instances.get(id)?)));
            routed.extend(awaited(stored.subject, &event, waiting));
            for (instance, routed) in routed {
                self.apply(&instance, routed, &event, seq, now_ms).await?;
            }
        }
        write_checkpoints(&self.shared, self.ended.drain(..)).await
    }

    /// A message with this id is in the log at `seq`: no longer missing.
    fn found(&mut self, id: &str, seq: u64) {
        let Some(i) = self.index.remove(id) else {
            return;
        };
        if let Some(effect @ Effect::Task { .. }) = self.missing.remove(&i) {
            self.found_tasks.insert(id.to_string(), (effect, seq));
        }
    }

    async fn apply(
        &mut self,
        instance: &str,
        mut routed: Routed,
        event: &EventEnvelope,
        seq: u64,
        now_ms: u64,
    ) -> anyhow::Result<()> {
        // An ended instance changes no more, and a repeated trigger does not start it again.
        if self.finished.contains(instance) {
            return Ok(());
        }
        if let Routed::Start {
            workflow, version, ..
        } = &mut routed
            && let Some(started) = self.versions.get(instance)
        {
            if let Err(e) = self.shared.registry.get(workflow, *started).await {
                self.skipped.push(format!("{instance}: {e}"));
                return Ok(());
            }
            *version = Some(*started);
        }
        if let Routed::Input(Input::Outcome { event_id, .. }) = &routed {
            self.found_tasks.remove(event_id);
        }
        let current = self.instances.get(instance);
        let effects = match apply_routed(
            &self.shared,
            instance,
            current,
            &routed,
            event,
            seq,
            now_ms,
        )
        .await
        {
            Applied::Unchanged => return Ok(()),
            Applied::Rejected(effect) => vec![*effect],
            Applied::Changed(mut state) => {
                let effects = std::mem::take(&mut state.outbox);
                if state.waits().is_empty() {
                    self.waiting.remove(instance);
                } else {
                    self.waiting.insert(instance.to_string());
                }
                if state.status.is_terminal() {
                    self.instances.remove(instance);
                    self.finished.insert(instance.to_string());
                    self.ended.push(*state);
                    if self.ended.len() >= WRITE_GROUP {
                        write_checkpoints(&self.shared, self.ended.drain(..)).await?;
                    }
                } else {
                    self.instances.insert(instance.to_string(), *state);
                }
                effects
            }
        };
        self.applied += 1;
        for effect in effects {
            self.produced += 1;
            self.index.insert(effect.event().id.clone(), self.produced);
            self.missing.insert(self.produced, effect);
        }
        Ok(())
    }
}

/// Checkpoints written at once by [`write_checkpoints`].
const WRITE_GROUP: usize = 256;

/// Writes instances' checkpoints, [`WRITE_GROUP`] at a time (their outboxes are empty: the
/// effects were taken out of them).
async fn write_checkpoints(
    shared: &Shared,
    states: impl Iterator<Item = InstanceState>,
) -> anyhow::Result<()> {
    let states: Vec<InstanceState> = states.collect();
    for group in states.chunks(WRITE_GROUP) {
        let writes = group.iter().map(|st| async move {
            let bytes = serde_json::to_vec(st).expect("state serializes");
            shared
                .checkpoints
                .put(&st.id, bytes.into())
                .await
                .with_context(|| format!("writing the checkpoint of {}", st.id))
        });
        for written in futures::future::join_all(writes).await {
            written?;
        }
    }
    Ok(())
}

/// An ordered reader of the log from its start to sequence `last` (`filter` empty: every
/// subject).
struct LogReader {
    messages: pull::Ordered,
    last: u64,
    /// Past `last`, or no message of the filter left when the last one was read.
    done: bool,
}

impl LogReader {
    async fn open(js: &jetstream::Context, filter: String, last: u64) -> anyhow::Result<Self> {
        let mut consumer = js
            .get_stream(EVENTS_STREAM)
            .await?
            .create_consumer(pull::OrderedConfig {
                description: Some("grizzly workflow restore".into()),
                filter_subject: filter,
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await?;
        let pending = consumer.info().await?.num_pending;
        Ok(Self {
            messages: consumer.messages().await?,
            last,
            done: pending == 0,
        })
    }

    /// The next message (`None` at the end); an error if the log does not answer within 30 s.
    async fn next(&mut self) -> anyhow::Result<Option<jetstream::Message>> {
        if self.done {
            return Ok(None);
        }
        let msg = tokio::time::timeout(Duration::from_secs(30), self.messages.next())
            .await
            .context("the log did not answer within 30 s")?
            .context("the log reader ended")?
            .map_err(|e| anyhow::anyhow!("reading the log: {e}"))?;
        let info = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        if info.stream_sequence > self.last {
            self.done = true;
            return Ok(None);
        }
        self.done = info.stream_sequence == self.last || info.pending == 0;
        Ok(Some(msg))
    }
}
