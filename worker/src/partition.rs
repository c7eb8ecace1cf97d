//! One owned partition of one handler's tasks (`tasks.<handler>.<partition>`).
//!
//! Taking ownership recreates the partition's consumer from the oldest unacked task: `TASKS` is a
//! work queue, so acked tasks are gone and a fresh consumer sees exactly the unfinished ones, in
//! log order — including those the previous owner had in flight when it died.
//!
//! A message holds one task, or a bundle of them (see [`crate::delivery`]). The runner reads
//! ahead (up to the consumer's `max_ack_pending` messages, and past `max_ack_pending` tasks
//! only one message a second) and schedules what it holds:
//! - tasks of one ordering lane (by default the aggregate) run one at a time, in log order;
//! - among lanes whose next task is ready, the highest priority starts first; a waiting task is
//!   promoted one level every [`AGING`] so low priorities are never starved;
//! - a task with `not_before_ms` (throttle, debounce) waits until then, holding up its lane;
//! - a task starts only when a handler slot and a worker slot are free;
//! - a `batch` handler's ready tasks go to a [`Collector`] instead, and each closed batch starts
//!   as one invocation when slots are free (see [`crate::batch`]);
//! - a `debounce` handler's task first checks it is still the newest of its burst
//!   ([`crate::debounce`]).
//!
//! Everything held is progress-acked so the broker does not redeliver it.
//!
//! A bundle is acked only when all its tasks are done, so a worker killed mid-bundle would
//! leave its done tasks to be run again by the next owner. For a bundle open longer than
//! [`RECORD_AFTER`], the runner records its done tasks in `grizzly_done` every [`RECORD_EVERY`];
//! a runner receiving a bundle that was stored before it took the partition reads that record
//! first and starts only the rest. A burst's bundles finish sooner and cost no record.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

pub(crate) use grizzly_shared::clock::now_ms;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use grizzly_shared::nats::{LeaseFence, TASKS_STREAM};
use grizzly_shared::subject::task_subject;
use grizzly_shared::task::BUNDLE_HEADER;
use grizzly_shared::{Priority, Task};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::batch::{Collector, execute_batch};
use crate::debounce::{DebounceGate, skip};
use crate::delivery::{Bundle, Delivery};
use crate::executor::{ExecutionEnv, HandlerContext, Slots, execute};
use crate::slots::Urgency;

/// How often a runner holding its fill of tasks takes one more message anyway: a pull not
/// polled for two idle heartbeats (3 s each, see `run`) fails as missed.
const TRICKLE: Duration = Duration::from_secs(1);

/// How often a runner records the done tasks of its long-open bundles: at most the tasks done
/// in this much time before a crash run again on the next owner.
const RECORD_EVERY: Duration = Duration::from_millis(200);

/// A bundle open for less than this is not recorded.
const RECORD_AFTER: Duration = Duration::from_secs(1);

/// What `grizzly_done` holds for a bundle (key `<handler>.<partition>.<TASKS sequence>`).
#[derive(serde::Serialize, serde::Deserialize)]
struct DoneRecord {
    /// The bundle's [`Bundle::message`].
    message: String,
    /// Indices of its done tasks.
    done: Vec<u32>,
}

/// A task waiting this long counts as one priority level higher.
pub const AGING: Duration = Duration::from_secs(5);

pub fn consumer_name(handler: &str, partition: u16) -> String {
    format!("worker-{handler}-{partition}")
}

pub struct PartitionRunner {
    pub ctx: Arc<HandlerContext>,
    pub env: ExecutionEnv,
    pub partition: u16,
    pub max_ack_pending: i64,
    pub fence: LeaseFence,
}

pub(crate) struct Held {
    pub(crate) msg: Delivery,
    pub(crate) task: Task,
    /// Where `msg` is stored in `TASKS`, and the task's place in it (0 unless a bundle).
    seq: u64,
    index: u32,
    /// When the broker stored `msg` (ns): with `seq`, which message it is (see [`Acked`]).
    stored: i128,
    arrived: Instant,
}

/// What running work finished: the lanes it held.
type Finished = BoxFuture<'static, Vec<String>>;

/// What the runner holds: per-lane queues, and which lanes can start now.
#[derive(Default)]
pub(crate) struct Schedule {
    /// Boxed: a `Held` is large, and a lane's queue grows under a backlog (moving the entries
    /// themselves on every growth showed in profiles of a burst).
    lanes: HashMap<String, VecDeque<Box<Held>>>,
    /// Running lanes, with how many tasks at the front of each the running work took (one, or
    /// several for a batch).
    running: HashMap<String, usize>,
    /// The `TASKS` sequences (and places in a bundle) of the running tasks, checked on every
    /// delivery.
    running_seqs: HashSet<(u64, u32)>,
    /// Bundles with tasks not done yet, by `TASKS` sequence: a redelivered bundle starts only
    /// those.
    bundles: HashMap<u64, Arc<Bundle>>,
    /// Tasks in `lanes`.
    len: usize,
    /// Lanes whose head is ready, by priority rank (0 = critical), oldest first.
    ready: [VecDeque<(String, Instant)>; 4],
    /// Lanes whose head must wait until a time.
    delayed: BTreeMap<(u64, String), ()>,
    /// The last `TASKS` sequence before this runner took the partition: a bundle up to it may
    /// have been started by a previous owner.
    inherited_to: u64,
    /// Sequences of settled bundles whose record is to be deleted.
    forget: Vec<u64>,
    /// Messages acked lately, done and not to run again if they come back.
    acked: Acked,
}

/// The messages a runner acked lately (the last [`Acked::KEEP`]), by `TASKS` sequence and the
/// broker's stored time (a `TASKS` stream made anew starts its sequences over). An ack can be
/// lost: sent while the consumer was being recreated, before the new one had delivered the
/// message again (the broker honours an earlier incarnation's ack only for a message the new one
/// has pending), or to a broker that restarted and forgot the consumer. The message then comes
/// back with its work done; it is acked again instead of run again.
#[derive(Default)]
struct Acked {
    stored: HashMap<u64, i128>,
    order: VecDeque<u64>,
}

impl Acked {
    const KEEP: usize = 8192;

    fn insert(&mut self, seq: u64, stored: i128) {
        if self.stored.insert(seq, stored).is_none() {
            self.order.push_back(seq);
        }
        while self.order.len() > Self::KEEP {
            if let Some(oldest) = self.order.pop_front() {
                self.stored.remove(&oldest);
            }
        }
    }

    fn contains(&self, seq: u64, stored: i128) -> bool {
        self.stored.get(&seq) == Some(&stored)
    }
}

/// 0 = critical … 3 = low.
pub(crate) fn rank(p: Priority) -> usize {
    Priority::ALL.iter().position(|q| *q == p).unwrap_or(2)
}

/// The rank a task of `rank` counts for after waiting since `since`: one level up per [`AGING`].
pub(crate) fn aged_rank(rank: usize, since: Instant, now: Instant) -> usize {
    let promoted = now.duration_since(since).as_secs() / AGING.as_secs().max(1);
    rank.saturating_sub(promoted as usize)
}

impl Schedule {
    fn push(&mut self, held: Held) {
        let lane = held.task.ordering_key();
        let queue = self.lanes.entry(lane.clone()).or_default();
        queue.push_back(Box::new(held));
        self.len += 1;
        if queue.len() == 1 && !self.running.contains_key(&lane) {
            self.mark_ready(lane);
        }
    }

    /// The lane's head can start (or must wait for its time).
    fn mark_ready(&mut self, lane: String) {
        let Some(head) = self.lanes.get(&lane).and_then(|q| q.front()) else {
            self.lanes.remove(&lane);
            return;
        };
        match head.task.not_before_ms {
            Some(at) if at > now_ms() => {
                self.delayed.insert((at, lane), ());
            }
            _ => {
                let r = rank(head.task.priority);
                self.ready[r].push_back((lane, head.arrived));
            }
        }
    }

    /// Moves lanes whose time has come to the ready queues; returns the next due time.
    fn release_due(&mut self) -> Option<u64> {
        let now = now_ms();
        while let Some(((at, _), ())) = self.delayed.first_key_value() {
            if *at > now {
                return Some(*at);
            }
            let ((_, lane), ()) = self.delayed.pop_first().expect("non-empty");
            if let Some(head) = self.lanes.get(&lane).and_then(|q| q.front()) {
                self.ready[rank(head.task.priority)].push_back((lane, head.arrived));
            }
        }
        None
    }

    fn has_ready(&self) -> bool {
        self.ready.iter().any(|q| !q.is_empty())
    }

    /// The lane to start next: highest effective priority (aged), oldest first.
    pub(crate) fn pick(&mut self) -> Option<String> {
        let (_, r, _) = self.best()?;
        let (lane, _) = self.ready[r].pop_front()?;
        if let Some(head) = self.head(&lane) {
            head.msg.mark_started();
            self.running_seqs.insert((head.seq, head.index));
        }
        self.running.insert(lane.clone(), 1);
        Some(lane)
    }

    /// The rank and arrival of the task [`Self::pick`] would start: the runner's claim on a slot.
    pub(crate) fn urgency(&self) -> Option<(usize, Instant)> {
        self.best().map(|(_, r, arrived)| (r, arrived))
    }

    /// (aged rank, rank, arrival) of the best ready lane's head.
    fn best(&self) -> Option<(usize, usize, Instant)> {
        let now = Instant::now();
        (0..4)
            .filter_map(|r| {
                let (_, arrived) = self.ready[r].front()?;
                Some((aged_rank(r, *arrived, now), r, *arrived))
            })
            .min()
    }

    pub(crate) fn head(&self, lane: &str) -> Option<&Held> {
        self.lanes.get(lane).and_then(|q| q.front()).map(|h| &**h)
    }

    /// A running lane's next task not yet taken, if it is due (a batch may take it too).
    pub(crate) fn next_of(&self, lane: &str) -> Option<&Held> {
        let taken = *self.running.get(lane)?;
        let next = self.lanes.get(lane)?.get(taken)?;
        match next.task.not_before_ms {
            Some(at) if at > now_ms() => None,
            _ => Some(next),
        }
    }

    /// The running work takes the lane's next task as well.
    pub(crate) fn take_next(&mut self, lane: &str) {
        if let Some(taken) = self.running.get_mut(lane) {
            if let Some(next) = self.lanes.get(lane).and_then(|q| q.get(*taken)) {
                next.msg.mark_started();
                self.running_seqs.insert((next.seq, next.index));
            }
            *taken += 1;
        }
    }

    /// The lane stops counting as running without finishing anything (an abandoned batch; the
    /// consumer is recreated right after, see [`Self::keep_running`]).
    pub(crate) fn release(&mut self, lane: &str) {
        let taken = self.running.remove(lane).unwrap_or(0);
        for held in self.lanes.get(lane).into_iter().flatten().take(taken) {
            self.running_seqs.remove(&(held.seq, held.index));
        }
    }

    /// The lane's running work finished: drop its tasks and make the next one ready.
    fn finished(&mut self, lane: String) {
        let taken = self.running.remove(&lane).unwrap_or(1);
        let mut settled = Vec::new();
        if let Some(q) = self.lanes.get_mut(&lane) {
            for held in q.drain(..taken.min(q.len())) {
                self.len -= 1;
                self.running_seqs.remove(&(held.seq, held.index));
                if held.msg.settled() {
                    // The work that finished acked it (the last task of a bundle acks the
                    // bundle).
                    self.acked.insert(held.seq, held.stored);
                    settled.push(held.seq);
                }
            }
        }
        for seq in settled {
            self.settle(seq);
        }
        self.mark_ready(lane);
    }

    /// A bundle is done: forgotten, and its record (if any) deleted.
    fn settle(&mut self, seq: u64) {
        if let Some(bundle) = self.bundles.remove(&seq)
            && bundle.was_recorded()
        {
            self.forget.push(seq);
        }
    }

    fn finished_all(&mut self, lanes: Vec<String>) {
        for lane in lanes {
            self.finished(lane);
        }
    }

    fn held(&self) -> impl Iterator<Item = &Held> {
        self.lanes.values().flatten().map(|h| &**h)
    }

    /// After the consumer was recreated: forget every task that is not running (the fresh
    /// consumer delivers them again, in order); running ones stay at the head of their lanes.
    fn keep_running(&mut self) {
        let running = &self.running;
        self.lanes.retain(|lane, queue| match running.get(lane) {
            Some(taken) => {
                queue.truncate(*taken);
                true
            }
            None => false,
        });
        for ready in &mut self.ready {
            ready.clear();
        }
        self.delayed.clear();
        self.len = self.lanes.values().map(VecDeque::len).sum();
    }

    /// Stopping: only lanes holding a task of a bundle that has started stay ready, or wait
    /// for their time. The tasks ahead of it in its lane run first (order per aggregate), and
    /// their bundles then count as started too: a later round's bundle started by a more
    /// urgent task finishes even where an earlier round's task stands before it.
    fn keep_only_started(&mut self) {
        let lanes = &self.lanes;
        let holds_started = |lane: &String| {
            lanes
                .get(lane)
                .is_some_and(|q| q.iter().any(|h| h.msg.in_started_bundle()))
        };
        for ready in &mut self.ready {
            ready.retain(|(lane, _)| holds_started(lane));
        }
        self.delayed.retain(|(_, lane), ()| holds_started(lane));
    }

    /// Whether a lane waits for its head's time.
    fn has_delayed(&self) -> bool {
        !self.delayed.is_empty()
    }

    /// Whether the task stored at `seq` in `TASKS` (at `index` in a bundle) is running now.
    fn is_running(&self, seq: u64, index: u32) -> bool {
        self.running_seqs.contains(&(seq, index))
    }
}

impl PartitionRunner {
    async fn fresh_consumer(&self) -> anyhow::Result<jetstream::consumer::Consumer<pull::Config>> {
        let stream = self.env.nats.js.get_stream(TASKS_STREAM).await?;
        let name = consumer_name(self.ctx.name(), self.partition);
        // Ignore "not found": the point is that no previous delivery state survives.
        let _ = stream.delete_consumer(&name).await;
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(name),
                description: Some(format!(
                    "tasks of handler {} partition {}",
                    self.ctx.name(),
                    self.partition
                )),
                filter_subject: task_subject(self.ctx.name(), self.partition),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::Explicit,
                ack_wait: self.env.ack_wait,
                max_ack_pending: self.max_ack_pending,
                // Its state is only the deliveries in flight: an acked task is deleted from the
                // work queue, and a lost consumer (broker restart) is recreated and redelivers
                // every task still there. On disk, each of the many partition consumers wrote
                // its state file up to 10 times a second (a synced write with fsync always).
                memory_storage: true,
                ..Default::default()
            })
            .await?;
        Ok(consumer)
    }

    /// Consumes until `stop`, then lets running tasks finish (held ones stay unacked for the
    /// next owner).
    pub async fn run(self, stop: CancellationToken) {
        let handler = self.ctx.name().to_string();
        // Read before the consumer exists: every bundle stored later is this runner's alone.
        // (Fetching the stream fetches its info.)
        let inherited_to = match self.env.nats.js.get_stream(TASKS_STREAM).await {
            Ok(stream) => stream.cached_info().state.last_sequence,
            Err(_) => u64::MAX,
        };
        let mut consumer = loop {
            match self.fresh_consumer().await {
                Ok(c) => break c,
                Err(e) => {
                    warn!(%handler, partition = self.partition, error = %e, "cannot create partition consumer; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        };
        info!(worker = %self.env.worker_id, %handler, partition = self.partition, "partition acquired");
        let mut schedule = Schedule {
            inherited_to,
            ..Default::default()
        };
        let mut record = tokio::time::interval(RECORD_EVERY);
        record.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut recording: Option<tokio::task::JoinHandle<()>> = None;
        let mut running: FuturesUnordered<Finished> = FuturesUnordered::new();
        let mut collector = self.ctx.handler.spec.batch.as_ref().and_then(|spec| {
            Collector::new(spec)
                .inspect_err(|e| warn!(%handler, error = %e, "batch.key is invalid; not batching"))
                .ok()
        });
        let debounce = DebounceGate::new(&self.ctx, &self.env.nats.js).map(Arc::new);
        let mut progress = tokio::time::interval(self.env.ack_wait / 3);
        progress.tick().await;
        // Waiting for a handler slot and a worker slot; only while a lane is ready. The claim
        // on them is the urgency of what would start next, kept current below.
        let mut slots: Option<BoxFuture<'static, Slots>> = None;
        let urgency = Urgency::default();
        let mut interrupted = false;
        // Holding `max_ack_pending` tasks (bundles carry many per message), the runner takes
        // one more message only every [`TRICKLE`]: often enough that the pull stays alive.
        let cap = usize::try_from(self.max_ack_pending).unwrap_or(usize::MAX);
        let mut trickle_at = Instant::now();
        'pull: while !stop.is_cancelled() {
            while !self.fence.held() {
                tokio::select! {
                    _ = stop.cancelled() => break 'pull,
                    Some(lanes) = running.next(), if !running.is_empty() => schedule.finished_all(lanes),
                    _ = self.fence.renewed() => {}
                }
            }
            if interrupted {
                // Tasks on their way to the interrupted pull are lost to us but stay pending on
                // the broker until `ack_wait`, while a new pull gets newer tasks at once: a later
                // task of an aggregate overtook an earlier one (seen after SIGSTOP/SIGCONT and a
                // broker restart). A fresh consumer delivers every unfinished task again, in
                // order; only the running ones are kept.
                match self.fresh_consumer().await {
                    Ok(c) => {
                        consumer = c;
                        if let Some(collector) = &mut collector {
                            collector.abandon(&mut schedule);
                        }
                        schedule.keep_running();
                        interrupted = false;
                    }
                    Err(e) => {
                        warn!(%handler, error = %e, "cannot recreate partition consumer; retrying");
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                        }
                    }
                }
            }
            let mut messages = match consumer
                .stream()
                .max_messages_per_batch(256)
                // What waits in the client unread: bundles are up to 256 KiB each.
                .max_bytes_per_batch(4 * 1024 * 1024)
                .heartbeat(Duration::from_secs(3))
                .expires(Duration::from_secs(10))
                .messages()
                .await
            {
                Ok(m) => m,
                Err(e) => {
                    warn!(%handler, error = %e, "cannot pull tasks; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            loop {
                if !self.fence.held() {
                    // Not surely ours any more: close the pull at once and start nothing until
                    // the lease is renewed (or lost: then `stop`). An open pull keeps asking
                    // for tasks, and once a successor has recreated the consumer (same name)
                    // those requests took the successor's tasks, which this runner never
                    // started: they came back only after `ack_wait`, behind later tasks of their
                    // aggregates (seen after broker restarts, when lease rounds stalled). Back
                    // in possession, a fresh consumer delivers every unfinished task in order.
                    interrupted = true;
                    continue 'pull;
                }
                let next_due = schedule.release_due();
                let finishing = stop.is_cancelled();
                if finishing {
                    // A bundle is acked whole, so before the partition goes, the bundles that
                    // have started are finished (the next owner would run their done tasks
                    // again) — only those, and only while the lease is surely ours.
                    schedule.keep_only_started();
                    if running.is_empty()
                        && !schedule.has_ready()
                        && !schedule.has_delayed()
                        && collector.as_ref().is_none_or(Collector::is_idle)
                    {
                        break 'pull;
                    }
                }
                // A batching handler's ready tasks join batches; closed batches need the slots.
                let closes_at = collector.as_mut().and_then(|c| {
                    c.absorb(&mut schedule);
                    c.close_due()
                });
                let startable = match &collector {
                    Some(c) => c.has_closed(),
                    None => schedule.has_ready(),
                };
                let next = match &collector {
                    Some(c) => c.urgency(),
                    None => schedule.urgency(),
                };
                if let Some((rank, since)) = next {
                    urgency.set(rank, since);
                }
                if slots.is_none() && startable {
                    let (h, w) = (self.ctx.limit.clone(), self.env.worker_limit.clone());
                    let urgency = urgency.clone();
                    slots = Some(Box::pin(async move {
                        let handler = h.acquire(urgency.clone()).await;
                        let worker = w.acquire(urgency).await;
                        Slots { handler, worker }
                    }));
                }
                let closes = async {
                    match closes_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => futures::future::pending().await,
                    }
                };
                let full = schedule.len >= cap;
                let take = !full || Instant::now() >= trickle_at;
                let due = async {
                    match next_due {
                        Some(at) => {
                            tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms())))
                                .await
                        }
                        None => futures::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = stop.cancelled(), if !finishing => {}
                    // Wakes an idle runner, whose pull would otherwise stay open (and keep
                    // asking for tasks) until something else happened.
                    _ = self.fence.lapsed() => {}
                    Some(lanes) = running.next(), if !running.is_empty() => schedule.finished_all(lanes),
                    acquired = async { slots.as_mut().expect("guarded").await }, if slots.is_some() => {
                        slots = None;
                        if !self.fence.held() {
                            // The slots came as the lease lapsed (e.g. the process was stopped
                            // past `ack_wait`): a successor may be running these very tasks.
                            // Dropping the slots starts nothing; the loop fences the pull.
                            continue;
                        }
                        match &mut collector {
                            Some(c) => if let Some(batch) = c.next_closed() {
                                let (ctx, env) = (self.ctx.clone(), self.env.clone());
                                running.push(Box::pin(async move {
                                    let lanes = batch.lanes().to_vec();
                                    execute_batch(&ctx, &env, batch, acquired).await;
                                    lanes
                                }));
                            },
                            None => if let Some(lane) = schedule.pick() {
                                self.start(&schedule, lane, acquired, debounce.clone(), &mut running);
                            },
                        }
                    }
                    _ = due => {}
                    _ = closes => {}
                    _ = progress.tick() => {
                        // Once per message: the tasks of a bundle share theirs.
                        let mut sent = HashSet::new();
                        for held in schedule.held() {
                            if sent.insert(held.seq) {
                                let _ = held.msg.ack_with(AckKind::Progress).await;
                            }
                        }
                    }
                    _ = tokio::time::sleep_until(trickle_at), if !take && !finishing => {}
                    _ = record.tick(), if !schedule.bundles.is_empty() || !schedule.forget.is_empty() => {
                        if recording.as_ref().is_none_or(|r| r.is_finished()) {
                            recording = self.record(&mut schedule);
                        }
                    }
                    next = messages.next(), if take && !finishing => match next {
                        Some(Ok(msg)) if self.fence.held() => {
                            if full {
                                trickle_at = Instant::now() + TRICKLE;
                            }
                            self.accept(msg, &mut schedule).await
                        }
                        Some(Ok(msg)) => {
                            // Arrived as the fence lapsed: maybe from a successor's consumer.
                            // Handing it back at once beats holding it until `ack_wait`.
                            let _ = msg.ack_with(AckKind::Nak(None)).await;
                        }
                        Some(Err(e)) => {
                            warn!(worker = %self.env.worker_id, %handler, partition = self.partition, error = %e, "task pull interrupted; resuming");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            interrupted = true;
                            continue 'pull;
                        }
                        None => {
                            interrupted = true;
                            continue 'pull;
                        }
                    },
                }
            }
        }
        // Drain: finish what is running; held tasks go back to the broker with the partition.
        while running.next().await.is_some() {}
        // The last records (tasks done while draining) and deletes go out before the
        // partition does.
        if let Some(r) = recording {
            let _ = r.await;
        }
        if let Some(r) = self.record(&mut schedule) {
            let _ = r.await;
        }
        info!(worker = %self.env.worker_id, %handler, partition = self.partition, "partition released");
    }

    async fn accept(&self, msg: jetstream::Message, schedule: &mut Schedule) {
        let (seq, stored) = match msg.info() {
            Ok(info) => (info.stream_sequence, info.published.unix_timestamp_nanos()),
            Err(e) => {
                // Not a JetStream delivery: nothing to ack, nothing to run.
                warn!(subject = %msg.subject, error = %e, "task without delivery metadata ignored");
                return;
            }
        };
        if schedule.acked.contains(seq, stored) {
            // Done and acked here before, but that ack was lost.
            debug!(handler = %self.ctx.name(), partition = self.partition, seq, "done task delivered again; acked, not run");
            let _ = msg.ack().await;
            return;
        }
        let arrived = Instant::now();
        if !is_bundle(&msg) {
            // A recreated consumer delivers a running task again; the running one acks it.
            if schedule.is_running(seq, 0) {
                return;
            }
            match serde_json::from_slice::<Task>(&msg.payload) {
                Ok(task) => schedule.push(Held {
                    msg: Delivery::single(msg),
                    task,
                    seq,
                    index: 0,
                    stored,
                    arrived,
                }),
                Err(e) => terminate_malformed(msg, &e).await,
            }
            return;
        }
        let tasks = match serde_json::from_slice::<Vec<Task>>(&msg.payload) {
            Ok(tasks) => tasks,
            Err(e) => return terminate_malformed(msg, &e).await,
        };
        let bundle = match schedule.bundles.get(&seq) {
            Some(bundle) => bundle.clone(),
            None => {
                let bundle = Bundle::new(tasks.len(), message_identity(&msg));
                if seq <= schedule.inherited_to {
                    self.restore(&bundle, seq).await;
                }
                schedule.bundles.insert(seq, bundle.clone());
                bundle
            }
        };
        // Again after a recreated consumer: only what is neither done nor running.
        for (index, task) in (0u32..).zip(tasks) {
            if bundle.is_open(index) && !schedule.is_running(seq, index) {
                schedule.push(Held {
                    msg: Delivery::bundled(msg.clone(), bundle.clone(), index),
                    task,
                    seq,
                    index,
                    stored,
                    arrived,
                });
            }
        }
        if bundle.all_done() {
            // Done before, but its ack was lost.
            schedule.settle(seq);
            let _ = msg.ack().await;
        }
    }

    fn done_key(&self, seq: u64) -> String {
        format!("{}.{}.{seq}", self.ctx.name(), self.partition)
    }

    /// Marks the tasks a previous owner recorded as done in `bundle` (stored at `seq`).
    async fn restore(&self, bundle: &Bundle, seq: u64) {
        let handler = self.ctx.name();
        match self.env.done.get(self.done_key(seq)).await {
            Ok(Some(value)) => match serde_json::from_slice::<DoneRecord>(&value) {
                Ok(record) if record.message == bundle.message => {
                    info!(%handler, partition = self.partition, seq, done = record.done.len(), "bundle taken over: its done tasks are not run again");
                    bundle.restore(&record.done);
                }
                // Another message under the same sequence: `TASKS` was made anew.
                Ok(_) => {}
                Err(e) => {
                    warn!(%handler, seq, error = %e, "unreadable record of a bundle's done tasks; running them all")
                }
            },
            Ok(None) => {}
            Err(e) => {
                warn!(%handler, seq, error = %e, "cannot read a bundle's done tasks; running them all")
            }
        }
    }

    /// Writes the records of long-open bundles with newly done tasks, and deletes those of
    /// settled ones, in the background (one round at a time).
    fn record(&self, schedule: &mut Schedule) -> Option<tokio::task::JoinHandle<()>> {
        let puts: Vec<_> = schedule
            .bundles
            .iter()
            .filter(|(_, b)| b.since.elapsed() >= RECORD_AFTER)
            .filter_map(|(seq, b)| Some((self.done_key(*seq), b.clone(), b.unrecorded()?)))
            .collect();
        let deletes: Vec<String> = std::mem::take(&mut schedule.forget)
            .into_iter()
            .map(|seq| self.done_key(seq))
            .collect();
        if puts.is_empty() && deletes.is_empty() {
            return None;
        }
        let store = self.env.done.clone();
        Some(tokio::spawn(async move {
            for (key, bundle, done) in puts {
                let n = done.len();
                let record = DoneRecord {
                    message: bundle.message.clone(),
                    done,
                };
                let value = serde_json::to_vec(&record).expect("serializable").into();
                match store.put(&key, value).await {
                    Ok(_) => {
                        bundle.recorded(n);
                        // Settled meanwhile, before it counted as recorded: nobody else
                        // deletes the record. (Settled later, it is deleted in a later round.)
                        if bundle.all_done() {
                            let _ = store.delete(&key).await;
                        }
                    }
                    Err(e) => warn!(key, error = %e, "cannot record a bundle's done tasks"),
                }
            }
            for key in deletes {
                let _ = store.delete(&key).await;
            }
        }))
    }

    fn start(
        &self,
        schedule: &Schedule,
        lane: String,
        slots: Slots,
        debounce: Option<Arc<DebounceGate>>,
        running: &mut FuturesUnordered<Finished>,
    ) {
        let Some(head) = schedule.head(&lane) else {
            return;
        };
        let (msg, task) = (head.msg.clone(), head.task.clone());
        // Fields are evaluated only when the line is logged.
        debug!(
            worker = %self.env.worker_id,
            handler = %self.ctx.name(),
            partition = self.partition,
            lane,
            seq = task.event_seq,
            task_seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0),
            delivered = msg.info().map(|i| i.delivered).unwrap_or(0),
            priority = %task.priority,
            "starting task"
        );
        let ctx = self.ctx.clone();
        let env = self.env.clone();
        running.push(Box::pin(async move {
            let newer = match &debounce {
                Some(gate) => gate.superseded_by(&task).await,
                None => None,
            };
            match newer {
                Some(newer) => skip(&ctx, &env, &msg, &task, newer).await,
                None => execute(&ctx, &env, msg, task, slots).await,
            }
            vec![lane]
        }));
    }
}

/// `<Nats-Msg-Id>@<stored time in ns>`: which stored message a bundle is.
fn message_identity(msg: &jetstream::Message) -> String {
    let id = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(grizzly_shared::headers::MSG_ID))
        .map(|v| v.as_str().to_string())
        .unwrap_or_default();
    let stored = msg
        .info()
        .map(|i| i.published.unix_timestamp_nanos())
        .unwrap_or(0);
    format!("{id}@{stored}")
}

fn is_bundle(msg: &jetstream::Message) -> bool {
    msg.headers
        .as_ref()
        .is_some_and(|h| h.get(BUNDLE_HEADER).is_some())
}

/// Only Grizzly writes tasks; a corrupt one cannot succeed by retrying.
async fn terminate_malformed(msg: jetstream::Message, e: &serde_json::Error) {
    warn!(subject = %msg.subject, error = %e, "malformed task terminated");
    let _ = msg.ack_with(AckKind::Term).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acked_messages_are_known_by_sequence_and_stored_time_until_evicted() {
        let mut acked = Acked::default();
        acked.insert(7, 1_000);
        assert!(acked.contains(7, 1_000));
        // Same sequence, another message (the stream was made anew).
        assert!(!acked.contains(7, 2_000));
        assert!(!acked.contains(8, 1_000));
        for seq in 100..100 + Acked::KEEP as u64 {
            acked.insert(seq, 5);
        }
        assert!(!acked.contains(7, 1_000), "the oldest goes first");
        assert!(acked.contains(100, 5) && acked.contains(99 + Acked::KEEP as u64, 5));
        assert_eq!(acked.stored.len(), Acked::KEEP);
    }

    #[test]
    fn aging_promotes_waiting_lanes() {
        let mut s = Schedule::default();
        // Waited two levels' worth: low now ranks as high, ahead of a fresh normal lane.
        s.ready[3].push_back(("low".into(), Instant::now() - AGING * 2));
        s.ready[2].push_back(("normal".into(), Instant::now()));
        assert_eq!(s.pick().as_deref(), Some("low"));
        let mut s = Schedule::default();
        s.ready[3].push_back(("low".into(), Instant::now()));
        s.ready[1].push_back(("high".into(), Instant::now()));
        assert_eq!(s.pick().as_deref(), Some("high"));
        assert_eq!(s.pick().as_deref(), Some("low"));
    }
}
