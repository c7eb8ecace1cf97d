//! Listener replicas share the log by partition: an event belongs to partition
//! `hash(aggregate) mod partitions` (the same partition its tasks go to), and each partition is
//! routed by the one replica that holds its lease `route.<p>` in `grizzly_leases`.
//!
//! The [`Manager`] keeps this replica's fair share: every third of `worker.lease_ttl` it
//! heartbeats `listener.<id>`, renews its leases, writes the routing cursor of each partition it
//! routes to `grizzly_listener` (`cursor.<p>`: the sequence from which the partition is still to
//! be routed), gives up partitions over its share (or one, while another live replica holds
//! fewer than `partitions / replicas`) and claims free ones up to it. A dead
//! replica's leases expire after `lease_ttl`; the replica that claims a partition starts it
//! from its cursor. The events between that cursor and what the dead replica had really routed
//! are routed again — idempotent, task ids derive from the event.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt as _;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What the manager tells the routing loop.
#[derive(Debug)]
pub enum Change {
    /// Route `partition` from stream sequence `from` on.
    Acquired { partition: u16, from: u64 },
    /// Stop routing `partition` now and answer with its cursor.
    Release {
        partition: u16,
        cursor: oneshot::Sender<u64>,
    },
    /// Another replica holds the lease now: stop routing `partition` at once.
    Lost { partition: u16 },
}

/// Cursors of the partitions this replica routes, kept current by the routing loop and written
/// to the bucket by the manager.
pub type Progress = Arc<Mutex<BTreeMap<u16, u64>>>;

pub struct Manager {
    pub id: String,
    pub partitions: u16,
    pub lease_ttl: Duration,
    pub leases: kv::Store,
    pub cursors: kv::Store,
    pub events: jetstream::stream::Stream,
    pub progress: Progress,
    pub changes: mpsc::UnboundedSender<Change>,
}

fn lease_key(partition: u16) -> String {
    format!("route.{partition}")
}

fn cursor_key(partition: u16) -> String {
    format!("cursor.{partition}")
}

impl Manager {
    /// Lease rounds until `stop`; then writes the final cursors and frees every lease, so the
    /// other replicas take over at once. Call `stop` only once the routing loop has confirmed
    /// everything it routed (the cursors in `progress` say so).
    pub async fn run(self, stop: CancellationToken) {
        let mut owned: HashMap<u16, u64> = HashMap::new();
        let mut tick = tokio::time::interval(self.lease_ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    if let Err(e) = self.round(&mut owned).await {
                        warn!(error = %e, "listener lease round failed");
                    }
                }
            }
        }
        self.write_cursors(&owned).await;
        for partition in owned.keys() {
            let _ = self.leases.delete(lease_key(*partition)).await;
        }
        let _ = self.leases.delete(format!("listener.{}", self.id)).await;
        info!(listener = %self.id, partitions = owned.len(), "listener partitions released");
    }

    /// Heartbeat, renew, write cursors, release surplus, claim up to the fair share.
    async fn round(&self, owned: &mut HashMap<u16, u64>) -> anyhow::Result<()> {
        self.leases
            .put(format!("listener.{}", self.id), self.id.clone().into())
            .await?;
        // Renew first: a replica that was stopped for longer than the lease must not write a
        // cursor for a partition another replica routes now.
        let mut lost = Vec::new();
        for (partition, revision) in owned.iter_mut() {
            match self
                .leases
                .update(lease_key(*partition), self.id.clone().into(), *revision)
                .await
            {
                Ok(r) => *revision = r,
                Err(e) => {
                    warn!(partition, error = %e, "listener partition lost");
                    lost.push(*partition);
                }
            }
        }
        for partition in lost {
            owned.remove(&partition);
            self.progress.lock().expect("progress").remove(&partition);
            let _ = self.changes.send(Change::Lost { partition });
        }
        self.write_cursors(owned).await;

        let (live, held) = self.census().await?;
        let (keep, fair) = grizzly_shared::task::fair_share(
            self.partitions,
            owned.len(),
            live.iter().map(|id| held.get(id).copied().unwrap_or(0)),
            live.len(),
        );
        if owned.len() > keep {
            let mut mine: Vec<u16> = owned.keys().copied().collect();
            mine.sort_unstable();
            for partition in mine.into_iter().skip(keep) {
                self.release(partition, owned).await;
            }
            return Ok(());
        }
        // Start at a replica-specific offset so that replicas starting together do not all
        // race for the same partitions first.
        let offset =
            (grizzly_shared::ids::stable_hash(&self.id) % u64::from(self.partitions)) as u16;
        for i in 0..self.partitions {
            if owned.len() >= fair {
                break;
            }
            let partition = (offset + i) % self.partitions;
            if owned.contains_key(&partition) {
                continue;
            }
            let Ok(revision) = self
                .leases
                .create(lease_key(partition), self.id.clone().into())
                .await
            else {
                continue;
            };
            let from = match self.cursors.get(cursor_key(partition)).await {
                Ok(Some(v)) => std::str::from_utf8(&v)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1),
                Ok(None) => self.first_start().await,
                Err(e) => {
                    // Without its cursor the partition cannot start at the right place.
                    warn!(partition, error = %e, "cannot read the cursor; leaving the partition");
                    let _ = self.leases.delete(lease_key(partition)).await;
                    continue;
                }
            };
            info!(listener = %self.id, partition, from, "routing partition");
            owned.insert(partition, revision);
            self.progress
                .lock()
                .expect("progress")
                .insert(partition, from);
            let _ = self.changes.send(Change::Acquired { partition, from });
        }
        Ok(())
    }

    /// Hands `partition` over: the routing loop stops routing it, its cursor is written, then
    /// the lease is freed for another replica.
    async fn release(&self, partition: u16, owned: &mut HashMap<u16, u64>) {
        let (tx, rx) = oneshot::channel();
        if self
            .changes
            .send(Change::Release {
                partition,
                cursor: tx,
            })
            .is_err()
        {
            return;
        }
        let Ok(cursor) = rx.await else { return };
        self.progress.lock().expect("progress").remove(&partition);
        if let Err(e) = self
            .cursors
            .put(cursor_key(partition), cursor.to_string().into())
            .await
        {
            // Keep the lease: the next round renews it; the partition stays with us meanwhile.
            warn!(partition, error = %e, "cannot write the cursor; keeping the lease");
            let _ = self.changes.send(Change::Acquired {
                partition,
                from: cursor,
            });
            self.progress
                .lock()
                .expect("progress")
                .insert(partition, cursor);
            return;
        }
        owned.remove(&partition);
        let _ = self.leases.delete(lease_key(partition)).await;
        info!(listener = %self.id, partition, cursor, "released partition to rebalance");
    }

    /// Where a partition that has no cursor yet starts: the beginning of the log, or — for a
    /// deployment whose listeners shared the durable consumer of earlier releases — that
    /// consumer's ack floor, so nothing it routed is routed again.
    async fn first_start(&self) -> u64 {
        match self
            .events
            .consumer_info(grizzly_shared::nats::LISTENER_CONSUMER)
            .await
        {
            Ok(info) => info.ack_floor.stream_sequence + 1,
            Err(_) => 1,
        }
    }

    async fn write_cursors(&self, owned: &HashMap<u16, u64>) {
        let now: Vec<(u16, u64)> = {
            let progress = self.progress.lock().expect("progress");
            owned
                .keys()
                .filter_map(|p| progress.get(p).map(|c| (*p, *c)))
                .collect()
        };
        for (partition, cursor) in now {
            if let Err(e) = self
                .cursors
                .put(cursor_key(partition), cursor.to_string().into())
                .await
            {
                warn!(partition, error = %e, "cannot write the cursor; retrying next round");
            }
        }
    }

    /// The live replicas (from their heartbeats) and how many partitions each routes.
    async fn census(&self) -> anyhow::Result<(Vec<String>, HashMap<String, usize>)> {
        let mut live = Vec::new();
        let mut held: HashMap<String, usize> = HashMap::new();
        let mut keys = self.leases.keys().await?;
        while let Some(key) = keys.next().await {
            let key = key?;
            if let Some(id) = key.strip_prefix("listener.") {
                live.push(id.to_string());
            } else if key.starts_with("route.")
                && let Some(owner) = self.leases.get(&key).await?
            {
                *held
                    .entry(String::from_utf8_lossy(&owner).into_owned())
                    .or_default() += 1;
            }
        }
        Ok((live, held))
    }
}
