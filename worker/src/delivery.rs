//! The `TASKS` message a task came in. The listener writes one task per message, or, under a
//! backlog, a *bundle*: every task of one handler partition from one routing round in a single
//! message (one stored write and one delete for all of them, which is what a synced write per
//! task costs; see ARCHITECTURE.md, *Bundles*). A bundle is acked once every task in it is
//! done; until then the runner keeps its [`Bundle`], so a redelivery (a recreated consumer)
//! starts only the tasks that are not done yet. A bundle open for a while has its done tasks
//! recorded in `grizzly_done` by the runner, so that a worker taking the partition over after a
//! crash starts only the others (see [`crate::partition`]).

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::jetstream;

/// Which tasks of a bundle are still to be done.
#[derive(Debug)]
pub(crate) struct Bundle {
    open: Mutex<Vec<bool>>,
    /// One of its tasks has started: it is finished before the partition is given back.
    started: AtomicBool,
    /// When this runner got it.
    pub(crate) since: std::time::Instant,
    /// Which stored message it is (`<Nats-Msg-Id>@<stored time>`): a record names it, so a
    /// `TASKS` stream made anew, whose sequences start over, is never mistaken for it.
    pub(crate) message: String,
    /// How many done tasks the record in `grizzly_done` holds.
    recorded: AtomicUsize,
}

impl Bundle {
    pub(crate) fn new(tasks: usize, message: String) -> Arc<Self> {
        Arc::new(Self {
            open: Mutex::new(vec![true; tasks]),
            started: AtomicBool::new(false),
            since: std::time::Instant::now(),
            message,
            recorded: AtomicUsize::new(0),
        })
    }

    /// Marks the tasks a previous owner recorded as done.
    pub(crate) fn restore(&self, done: &[u32]) {
        let mut open = self.open.lock().expect("bundle lock");
        for index in done {
            if let Some(slot) = open.get_mut(*index as usize) {
                *slot = false;
            }
        }
        let n = open.iter().filter(|o| !**o).count();
        self.recorded.store(n, Ordering::Relaxed);
    }

    /// The done tasks, if more are done than recorded and some are still open. Asked of every
    /// long-held bundle on every recording round: the list is built only when it is due.
    pub(crate) fn unrecorded(&self) -> Option<Vec<u32>> {
        let open = self.open.lock().expect("bundle lock");
        let done = open.iter().filter(|o| !**o).count();
        if done <= self.recorded.load(Ordering::Relaxed) || done == open.len() {
            return None;
        }
        Some(
            (0u32..)
                .zip(open.iter())
                .filter(|(_, o)| !**o)
                .map(|(i, _)| i)
                .collect(),
        )
    }

    pub(crate) fn recorded(&self, done: usize) {
        self.recorded.fetch_max(done, Ordering::Relaxed);
    }

    /// Whether a record of it was written.
    pub(crate) fn was_recorded(&self) -> bool {
        self.recorded.load(Ordering::Relaxed) > 0
    }

    pub(crate) fn is_open(&self, index: u32) -> bool {
        let open = self.open.lock().expect("bundle lock");
        open.get(index as usize).copied().unwrap_or(false)
    }

    pub(crate) fn all_done(&self) -> bool {
        !self.open.lock().expect("bundle lock").contains(&true)
    }

    /// Marks a task done; true when it was the last open one.
    fn done(&self, index: u32) -> bool {
        let mut open = self.open.lock().expect("bundle lock");
        if let Some(slot) = open.get_mut(index as usize) {
            *slot = false;
        }
        !open.contains(&true)
    }
}

/// A task's delivery: its message, and its place in the message when that is a bundle.
/// Dereferences to the message (`info`, `headers`, progress acks); [`Delivery::ack`] acks the
/// task.
#[derive(Clone, Debug)]
pub(crate) struct Delivery {
    msg: jetstream::Message,
    bundle: Option<(Arc<Bundle>, u32)>,
}

impl Delivery {
    pub(crate) fn single(msg: jetstream::Message) -> Self {
        Self { msg, bundle: None }
    }

    pub(crate) fn bundled(msg: jetstream::Message, bundle: Arc<Bundle>, index: u32) -> Self {
        Self {
            msg,
            bundle: Some((bundle, index)),
        }
    }

    /// The task is done: acks its message, or, in a bundle, once every task in it is done.
    pub(crate) async fn ack(&self) -> Result<(), async_nats::Error> {
        match &self.bundle {
            Some((bundle, index)) if !bundle.done(*index) => Ok(()),
            _ => self.msg.ack().await,
        }
    }

    /// The task starts (or joins a batch).
    pub(crate) fn mark_started(&self) {
        if let Some((bundle, _)) = &self.bundle {
            bundle.started.store(true, Ordering::Relaxed);
        }
    }

    /// Whether the task is part of a bundle of which some task has started.
    pub(crate) fn in_started_bundle(&self) -> bool {
        self.bundle
            .as_ref()
            .is_some_and(|(b, _)| b.started.load(Ordering::Relaxed))
    }

    pub(crate) fn is_bundled(&self) -> bool {
        self.bundle.is_some()
    }

    /// Whether nothing of the message is left to do (its bundle, if any, can be forgotten).
    pub(crate) fn settled(&self) -> bool {
        self.bundle.as_ref().is_none_or(|(b, _)| b.all_done())
    }
}

impl Deref for Delivery {
    type Target = jetstream::Message;

    fn deref(&self) -> &jetstream::Message {
        &self.msg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_is_done_when_its_last_task_is() {
        let b = Bundle::new(3, "m".into());
        assert!(!b.done(1));
        assert!(!b.is_open(1) && b.is_open(0));
        assert!(!b.done(1), "done twice still leaves the others");
        assert!(!b.done(0));
        assert!(b.done(2));
        assert!(b.all_done());
        assert!(!b.is_open(7), "an index past the end is never open");
    }

    #[test]
    fn a_record_lists_the_done_tasks_while_some_are_open() {
        let b = Bundle::new(3, "m".into());
        assert_eq!(b.unrecorded(), None, "nothing done");
        b.done(2);
        assert_eq!(b.unrecorded(), Some(vec![2]));
        b.recorded(1);
        assert_eq!(b.unrecorded(), None, "recorded already");
        let taken_over = Bundle::new(3, "m".into());
        taken_over.restore(&[0, 2, 9]);
        assert!(taken_over.is_open(1) && !taken_over.is_open(0) && !taken_over.is_open(2));
        assert!(taken_over.was_recorded() && taken_over.unrecorded().is_none());
        taken_over.done(1);
        assert_eq!(
            taken_over.unrecorded(),
            None,
            "all done: acked, not recorded"
        );
    }
}
