//! One reader of `EVENTS` per coordinator process, feeding the workflow partitions it owns.
//!
//! Each owned partition used to read the log through a durable consumer of its own, and every
//! one of them had to see every workflow event to find its instances: the broker delivered
//! each event once per partition (8 by default), and with a trigger outside
//! `events.workflow.>` it matched every message against several filters per consumer.
//! Now one ordered consumer (no acks) reads the union of the filters from the oldest position
//! an owned partition still needs, and hands each event to every partition subscribed here.
//! A partition's progress is its cursor (`cursor.<p>` in KV [`CURSORS_BUCKET`]), written by the
//! partition once it applied the events before it; a new owner starts there.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use grizzly_shared::envelope::{EventEnvelope, StoredMessage};
use grizzly_shared::nats::EVENTS_STREAM;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::engine::{Directed, ReadFilter, Shared, directed};

/// KV bucket of the partitions' cursors: `cursor.<p>` → the stream sequence from which
/// partition `p` still has to be applied.
pub const CURSORS_BUCKET: &str = "grizzly_wf_cursors";

/// Events buffered per partition before the reader waits for it.
const FEED_CAPACITY: usize = 512;

/// One event of the log, parsed once and shared by every partition it is handed to.
pub struct Fed {
    pub seq: u64,
    pub subject: String,
    /// `None` for an event that does not parse (the listener's to dead-letter): a partition
    /// only moves past it.
    pub event: Option<EventEnvelope>,
    /// The instances the event names, with their partitions ([`directed`]).
    pub(crate) directed: Vec<Directed>,
}

pub async fn ensure_cursors_bucket(
    js: &jetstream::Context,
    replicas: usize,
) -> anyhow::Result<kv::Store> {
    Ok(grizzly_shared::nats::ensure_bucket(
        js,
        CURSORS_BUCKET,
        "Grizzly workflow partition cursors",
        Duration::ZERO,
        replicas,
    )
    .await?)
}

struct Subscribe {
    partition: u16,
    from: u64,
    feed: mpsc::Sender<Arc<Fed>>,
}

/// The handle partitions subscribe with; the reader stops with the process's `stop`.
#[derive(Clone)]
pub struct Reader {
    commands: mpsc::UnboundedSender<Subscribe>,
}

impl Reader {
    pub fn spawn(shared: Arc<Shared>, stop: CancellationToken) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(shared, rx, stop));
        Self { commands }
    }

    /// The events of the reader's filter from stream sequence `from` on, in log order. A new
    /// subscription of the same partition replaces the old one; dropping the receiver ends it.
    pub fn subscribe(&self, partition: u16, from: u64) -> mpsc::Receiver<Arc<Fed>> {
        let (feed, rx) = mpsc::channel(FEED_CAPACITY);
        let _ = self.commands.send(Subscribe {
            partition,
            from: from.max(1),
            feed,
        });
        rx
    }
}

struct Subscriber {
    /// The sequence this partition is to be handed next.
    next: u64,
    feed: mpsc::Sender<Arc<Fed>>,
}

/// The open ordered consumer, the filter it was made with, and the sequence it hands out next
/// (its start, then one past each event).
struct Open {
    messages: pull::Ordered,
    filter: Vec<String>,
    position: u64,
}

async fn run(
    shared: Arc<Shared>,
    mut commands: mpsc::UnboundedReceiver<Subscribe>,
    stop: CancellationToken,
) {
    let mut subscribers: HashMap<u16, Subscriber> = HashMap::new();
    let mut open: Option<Open> = None;
    let mut filters = ReadFilter::new();
    loop {
        subscribers.retain(|_, s| !s.feed.is_closed());
        let need = subscribers.values().map(|s| s.next).min();
        let filter = filters.current(&shared.registry);
        match need {
            None => open = None,
            Some(need)
                if open
                    .as_ref()
                    .is_none_or(|o| need < o.position || o.filter != filter) =>
            {
                match read(&shared.nats.js, need, filter.to_vec()).await {
                    Ok(messages) => {
                        debug!(from = need, ?filter, "workflow reader (re)opened");
                        open = Some(Open {
                            messages,
                            filter: filter.to_vec(),
                            position: need,
                        });
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot open the workflow reader; retrying");
                        open = None;
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                        }
                    }
                }
            }
            Some(_) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            command = commands.recv() => match command {
                Some(Subscribe { partition, from, feed }) => {
                    subscribers.insert(partition, Subscriber { next: from, feed });
                }
                None => return,
            },
            next = async {
                match open.as_mut() {
                    Some(o) => o.messages.next().await,
                    None => futures::future::pending().await,
                }
            } => match next {
                Some(Ok(msg)) => {
                    let Ok(stored) = StoredMessage::from_jetstream(&msg) else {
                        continue;
                    };
                    let seq = stored.stream_sequence;
                    if let Some(o) = open.as_mut() {
                        o.position = seq + 1;
                    }
                    // Parsed and routed here once, not once per partition.
                    let event = EventEnvelope::from_stored(&stored, usize::MAX).ok();
                    let directed = event
                        .as_ref()
                        .map(|e| directed(&shared, stored.subject, e))
                        .unwrap_or_default();
                    let msg = Arc::new(Fed {
                        seq,
                        subject: msg.subject.to_string(),
                        event,
                        directed,
                    });
                    for s in subscribers.values_mut() {
                        // A closed feed fails at once and is dropped on the next round.
                        if s.next <= seq && s.feed.send(msg.clone()).await.is_ok() {
                            s.next = seq + 1;
                        }
                    }
                }
                Some(Err(e)) => {
                    warn!(error = %e, "workflow reader interrupted; reopening");
                    open = None;
                }
                None => open = None,
            },
        }
    }
}

async fn read(
    js: &jetstream::Context,
    from: u64,
    filter_subjects: Vec<String>,
) -> anyhow::Result<pull::Ordered> {
    let consumer = js
        .get_stream(EVENTS_STREAM)
        .await?
        .create_consumer(pull::OrderedConfig {
            description: Some("coordinator: workflow partitions".into()),
            filter_subjects,
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: from,
            },
            ..Default::default()
        })
        .await?;
    Ok(consumer.messages().await?)
}
