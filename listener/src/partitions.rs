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
//!
//! Bundles (several events' tasks in one message, see the crate docs) are idempotent only if the
//! next router forms exactly the same ones. So a replica announces each bundled round in
//! `round.<p>` before writing it, and claiming a partition reads that announcement ([`Claim`]):
//! the new router starts with exactly that round, and routes one event at a time (ids per
//! event) up to the end of the log as it was at the claim: the previous router may have routed
//! any of those singly. Claiming also rewrites `round.<p>`, so the previous router's next
//! announcement — a compare-and-set on the revision it knew — fails and it writes no bundle
//! the new router would not reproduce.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt as _;
use grizzly_shared::nats::cursor_key;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A bundled routing round: the partition's events with `from <= seq <= to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Round {
    pub from: u64,
    pub to: u64,
}

/// The value of `round.<p>`: the last round announced (if any) and the replica that wrote it
/// last — the claim writes its own id, so a fenced-off router can tell its write apart.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Announcement {
    #[serde(default, flatten, skip_serializing_if = "Option::is_none")]
    pub round: Option<Round>,
    pub by: String,
}

impl Announcement {
    pub fn to_bytes(&self) -> bytes::Bytes {
        serde_json::to_vec(self)
            .expect("an announcement serializes")
            .into()
    }
}

/// What claiming a partition found in, and did to, `round.<p>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// Where routing starts: the announced round's first event (everything before it was
    /// confirmed before it was announced), else the cursor.
    pub from: u64,
    /// Revision of `round.<p>` after the claim rewrote it: the base of the next announcement.
    pub revision: u64,
    /// The last round announced, if it may not be confirmed yet (it reaches the cursor): to
    /// be formed again, exactly.
    pub announced: Option<Round>,
    /// The end of the log at the claim: the previous router may have routed any event up to
    /// here one at a time, so the new one does too.
    pub singles_to: u64,
}

/// What the manager tells the routing loop.
#[derive(Debug)]
pub enum Change {
    /// Route `partition` from `claim.from` on.
    Acquired { partition: u16, claim: Claim },
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
    /// Until when this replica's leases are surely its own: the routing loop writes nothing
    /// past it (a replica stopped past its lease must not write what it read after resuming).
    pub fence: grizzly_shared::nats::LeaseFence,
    /// The cursor last written per partition: an unchanged one is not written again (an idle
    /// replica wrote every cursor every round, a synced write each).
    pub written: Mutex<HashMap<u16, u64>>,
}

pub fn lease_key(partition: u16) -> String {
    format!("route.{partition}")
}

pub fn round_key(partition: u16) -> String {
    format!("round.{partition}")
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
        let asked = tokio::time::Instant::now();
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
        // The leases kept, and those claimed below, were all written after `asked`.
        self.fence
            .extend(asked + grizzly_shared::nats::LeaseFence::margin(self.lease_ttl));
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
            let claim = match self.claim(partition, from).await {
                Ok(claim) => claim,
                Err(e) => {
                    warn!(partition, error = %e, "cannot claim the partition's rounds; leaving it");
                    let _ = self.leases.delete(lease_key(partition)).await;
                    continue;
                }
            };
            let from = claim.from;
            // Another replica may have written the cursor since we last did.
            self.written.lock().expect("written").remove(&partition);
            info!(listener = %self.id, partition, from, ?claim, "routing partition");
            owned.insert(partition, revision);
            self.progress
                .lock()
                .expect("progress")
                .insert(partition, from);
            let _ = self.changes.send(Change::Acquired { partition, claim });
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
            match self.claim(partition, cursor).await {
                Ok(claim) => {
                    let _ = self.changes.send(Change::Acquired { partition, claim });
                }
                // Routed by no one until the lease expires and a replica claims it.
                Err(e) => warn!(partition, error = %e, "cannot claim the partition again"),
            }
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

    /// Reads the partition's last announced round and rewrites it with this replica's id (a
    /// new revision fences the previous router, see the module docs); notes the end of the log.
    async fn claim(&self, partition: u16, cursor: u64) -> anyhow::Result<Claim> {
        let singles_to = self.events.get_info().await?.state.last_sequence;
        let key = round_key(partition);
        let entry = self.cursors.entry(key.clone()).await?;
        let round = entry
            .as_ref()
            .and_then(|e| serde_json::from_slice::<Announcement>(&e.value).ok()?.round);
        let claimed = Announcement {
            round,
            by: self.id.clone(),
        }
        .to_bytes();
        let revision = match entry {
            Some(e) => self.cursors.update(&key, claimed, e.revision).await?,
            None => self.cursors.create(&key, claimed).await?,
        };
        let announced = round.filter(|round| round.to >= cursor);
        Ok(Claim {
            from: announced.map_or(cursor, |round| round.from),
            revision,
            announced,
            singles_to,
        })
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
            if self.written.lock().expect("written").get(&partition) == Some(&cursor) {
                continue;
            }
            match self
                .cursors
                .put(cursor_key(partition), cursor.to_string().into())
                .await
            {
                Ok(_) => {
                    self.written
                        .lock()
                        .expect("written")
                        .insert(partition, cursor);
                }
                Err(e) => {
                    warn!(partition, error = %e, "cannot write the cursor; retrying next round")
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_read_back_with_and_without_a_round() {
        let with = Announcement {
            round: Some(Round { from: 7, to: 9 }),
            by: "a".into(),
        };
        let text = with.to_bytes();
        assert_eq!(&text[..], br#"{"from":7,"to":9,"by":"a"}"#);
        assert_eq!(serde_json::from_slice::<Announcement>(&text).unwrap(), with);
        let claim = serde_json::from_slice::<Announcement>(br#"{"by":"b"}"#).unwrap();
        assert_eq!(claim.round, None);
        // What an older release or a stray write left: no announcement at all.
        assert!(serde_json::from_slice::<Announcement>(b"{}").is_err());
    }
}
