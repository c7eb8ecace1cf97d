//! The task: what the listener hands to workers on `tasks.<handler>.<partition>` (stream
//! `TASKS`, work-queue retention). It carries the whole event so a worker needs no extra read.

use serde::{Deserialize, Serialize};

use crate::envelope::{EventEnvelope, Priority};
use crate::ids::stable_hash;
use crate::subject::task_subject;

/// Header of a `TASKS` message that holds several tasks (a JSON array) instead of one: a
/// *bundle*, written by the listener under a backlog (see ARCHITECTURE.md, *Bundles*).
pub const BUNDLE_HEADER: &str = "Grizzly-Bundle";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub handler: String,
    pub handler_version: u32,
    /// Sequence of the event in `EVENTS`.
    pub event_seq: u64,
    pub partition: u16,
    pub priority: Priority,
    pub event: EventEnvelope,
    /// Tasks with the same key run one at a time, in order (default: the event's aggregate).
    /// Workflow steps use `<instance>/<step>` so parallel branches of one instance run at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering_key: Option<String>,
    /// Not to start before this time (unix ms): set by the listener's throttle and debounce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<u64>,
    /// Set when an operator re-drove the task from the DLQ (makes its id distinct).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redrive: Option<u64>,
    /// Per-attempt time limit overriding the handler's `timeout` (a workflow step's `timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Attempts overriding the handler's `retry.max_attempts` (a workflow step's `retry`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
}

impl Task {
    pub fn new(
        handler: &str,
        handler_version: u32,
        event_seq: u64,
        partitions: u16,
        priority: Priority,
        event: EventEnvelope,
    ) -> Self {
        Self {
            handler: handler.to_string(),
            handler_version,
            event_seq,
            partition: partition_for(&event.aggregate_key(), partitions),
            priority,
            event,
            ordering_key: None,
            not_before_ms: None,
            redrive: None,
            timeout_ms: None,
            max_attempts: None,
        }
    }

    /// Runs this task in its own ordering lane (`key`) instead of its aggregate's.
    pub fn with_ordering_key(mut self, key: String, partitions: u16) -> Self {
        self.partition = partition_for(&key, partitions);
        self.ordering_key = Some(key);
        self
    }

    /// The key of the lane this task is ordered in.
    pub fn ordering_key(&self) -> String {
        self.ordering_key
            .clone()
            .unwrap_or_else(|| self.event.aggregate_key())
    }

    pub fn subject(&self) -> String {
        task_subject(&self.handler, self.partition)
    }

    /// `Nats-Msg-Id` of the task: routing the same event twice writes one task.
    pub fn msg_id(&self) -> String {
        match self.redrive {
            None => format!("task:{}:{}", self.event.id, self.handler),
            Some(dlq_seq) => format!("task:{}:{}:redrive:{dlq_seq}", self.event.id, self.handler),
        }
    }

    pub fn to_json_bytes(&self) -> bytes::Bytes {
        serde_json::to_vec(self)
            .expect("a task always serializes")
            .into()
    }
}

/// How many partitions a member of a group sharing `partitions` keeps, holding `mine` of them,
/// when the members hold `held` each (workers serving one handler, listener replicas; the
/// member itself included). Over the fair share `ceil(partitions / members)`: the surplus goes.
/// At it while another member holds less than the floor (4 partitions, 3 members: 2 + 2 + 0):
/// one goes, so every member gets a share (2 + 1 + 1). Returns `(keep, claim_to)`: claim up to
/// `claim_to` when keeping all. While a member is below the floor that is the floor, so the
/// partition just given back goes to the member short of it, not back to the one that freed it.
pub fn fair_share(
    partitions: u16,
    mine: usize,
    held: impl IntoIterator<Item = usize>,
    members: usize,
) -> (usize, usize) {
    let members = members.max(1);
    let fair = usize::from(partitions).div_ceil(members);
    let floor = usize::from(partitions) / members;
    let someone_short = held.into_iter().any(|h| h < floor);
    let keep = if mine > fair {
        fair
    } else if mine > floor && someone_short {
        mine - 1
    } else {
        mine
    };
    let claim_to = if someone_short { floor } else { fair };
    (keep, claim_to)
}

/// The partition of an aggregate: all events of one aggregate land in one partition, so one
/// worker at a time sees them, in log order.
pub fn partition_for(aggregate_key: &str, partitions: u16) -> u16 {
    (stable_hash(aggregate_key) % u64::from(partitions.max(1))) as u16
}

#[cfg(test)]
mod tests {
    use super::fair_share;

    #[test]
    fn surplus_goes_and_a_member_short_of_the_floor_gets_one() {
        // 4 partitions, 3 members holding 2 + 2 + 0: each of the two gives one back and claims
        // nothing more while the third is short.
        assert_eq!(fair_share(4, 2, [2, 2, 0], 3), (1, 1));
        // The third claims up to the floor.
        assert_eq!(fair_share(4, 0, [1, 1, 0], 3), (0, 1));
        // Once nobody is short, the last free partition may go to anyone.
        assert_eq!(fair_share(4, 1, [1, 1, 1], 3), (1, 2));
        // Over the fair share: down to it.
        assert_eq!(fair_share(4, 4, [4, 0], 2), (2, 2));
        // More members than partitions: nobody is ever short of a floor of zero.
        assert_eq!(fair_share(2, 1, [1, 1, 0], 3), (1, 1));
        assert_eq!(fair_share(2, 0, [1, 1, 0], 3), (0, 1));
    }
}
