//! Concurrency slots handed out by priority across partition runners.
//!
//! A handler's `concurrency` and the worker's `max_concurrency` are shared by every partition
//! runner of the handler (and, for the worker's, of every handler). A plain semaphore serves its
//! waiters first come, first served: a critical task that arrived in one partition waited
//! behind the low ones other runners had asked a slot for earlier. A [`PriorityGate`] instead
//! gives a freed slot to the waiter whose [`Urgency`] is highest at that moment. Each runner
//! keeps its urgency current (the priority of the task it would start next, and since when
//! that task waits), so a critical task that arrives while its runner already waits raises the
//! runner's claim in place. Waiting counts like priority does inside a runner: every
//! [`AGING`](crate::partition::AGING) promotes a waiter one level, so low priorities still get
//! slots under a stream of urgent work; among equal levels the higher priority, then the
//! longest-waiting task goes first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tokio::time::Instant;

#[cfg(test)]
use crate::partition::AGING;
use crate::partition::aged_rank;

/// The claim of a waiting runner: the priority rank (0 = critical) of the task it would start
/// next and when that task started waiting. Shared with the runner, which updates it.
#[derive(Clone)]
pub struct Urgency(Arc<Mutex<(usize, Instant)>>);

impl Default for Urgency {
    fn default() -> Self {
        Self(Arc::new(Mutex::new((usize::MAX, Instant::now()))))
    }
}

impl Urgency {
    pub fn set(&self, rank: usize, waiting_since: Instant) {
        *self.0.lock().expect("urgency lock") = (rank, waiting_since);
    }

    /// (rank after aging, rank, waiting since): lower sorts first, as in the runner's own pick.
    fn key(&self, now: Instant) -> (usize, usize, Instant) {
        let (rank, since) = *self.0.lock().expect("urgency lock");
        (aged_rank(rank, since, now), rank, since)
    }
}

struct State {
    free: usize,
    next_id: u64,
    waiters: HashMap<u64, (Urgency, oneshot::Sender<Permit>)>,
}

/// A counting semaphore whose freed slots go to the most urgent waiter.
#[derive(Clone)]
pub struct PriorityGate(Arc<Mutex<State>>);

/// One slot of a [`PriorityGate`], given back when dropped.
pub struct Permit(Option<Arc<Mutex<State>>>);

impl PriorityGate {
    pub fn new(slots: usize) -> Self {
        Self(Arc::new(Mutex::new(State {
            free: slots,
            next_id: 0,
            waiters: HashMap::new(),
        })))
    }

    /// Waits for a slot. Cancel-safe: dropping the future gives back a slot it was just granted.
    pub async fn acquire(&self, urgency: Urgency) -> Permit {
        let (id, rx) = {
            let mut state = self.0.lock().expect("gate lock");
            if state.free > 0 {
                state.free -= 1;
                return Permit(Some(self.0.clone()));
            }
            let (tx, rx) = oneshot::channel();
            let id = state.next_id;
            state.next_id += 1;
            state.waiters.insert(id, (urgency, tx));
            (id, rx)
        };
        struct Withdraw<'a>(&'a Mutex<State>, u64);
        impl Drop for Withdraw<'_> {
            fn drop(&mut self) {
                self.0.lock().expect("gate lock").waiters.remove(&self.1);
            }
        }
        let _withdraw = Withdraw(&self.0, id);
        // The sender is dropped without sending only by `Withdraw`, i.e. never while we await.
        rx.await
            .expect("a waiter is removed only by itself or by a grant")
    }

    #[cfg(test)]
    fn free(&self) -> usize {
        self.0.lock().expect("gate lock").free
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let Some(gate) = self.0.take() else { return };
        let mut state = gate.lock().expect("gate lock");
        let now = Instant::now();
        loop {
            let best = state
                .waiters
                .iter()
                .map(|(id, (urgency, _))| (urgency.key(now), *id))
                .min();
            let Some((_, id)) = best else {
                state.free += 1;
                return;
            };
            let (_, tx) = state.waiters.remove(&id).expect("just found");
            match tx.send(Permit(Some(gate.clone()))) {
                Ok(()) => return,
                // The waiter went away meanwhile: disarm the returned permit and try the next.
                Err(mut unsent) => unsent.0 = None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn urgency(rank: usize, waited: Duration) -> Urgency {
        let u = Urgency::default();
        u.set(rank, Instant::now() - waited);
        u
    }

    async fn waiting(gate: &PriorityGate, n: usize) {
        while gate.0.lock().unwrap().waiters.len() < n {
            tokio::task::yield_now().await;
        }
    }

    /// Queues one waiter per claim behind `held`, then frees it: the order the slot went round.
    async fn grant_order(
        gate: &PriorityGate,
        held: Permit,
        claims: Vec<(&'static str, Urgency)>,
        before_release: impl FnOnce(),
    ) -> Vec<&'static str> {
        let n = claims.len();
        let (order_tx, mut order) = tokio::sync::mpsc::unbounded_channel();
        for (name, u) in claims {
            let (gate, order_tx) = (gate.clone(), order_tx.clone());
            tokio::spawn(async move {
                let permit = gate.acquire(u).await;
                order_tx.send(name).unwrap();
                drop(permit);
            });
        }
        waiting(gate, n).await;
        before_release();
        drop(held);
        let mut seen = Vec::new();
        for _ in 0..n {
            seen.push(order.recv().await.unwrap());
        }
        seen
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_most_urgent_waiter_then_the_longest_waiting() {
        let gate = PriorityGate::new(1);
        let held = gate.acquire(Urgency::default()).await;
        let claims = vec![
            ("low, waiting longest", urgency(3, Duration::from_secs(3))),
            ("critical", urgency(0, Duration::ZERO)),
            ("normal, older", urgency(2, Duration::from_secs(2))),
            ("normal, newer", urgency(2, Duration::from_secs(1))),
        ];
        let seen = grant_order(&gate, held, claims, || {}).await;
        assert_eq!(
            seen,
            [
                "critical",
                "normal, older",
                "normal, newer",
                "low, waiting longest"
            ]
        );
        assert_eq!(gate.free(), 1);
    }

    #[tokio::test]
    async fn a_raised_claim_counts_and_an_aged_one_is_promoted() {
        let gate = PriorityGate::new(1);
        let held = gate.acquire(Urgency::default()).await;
        // Low, but waiting for two aging periods: counts as high (rank 1), ahead of a normal.
        let aged = urgency(3, AGING * 2 + Duration::from_millis(100));
        let raised = urgency(3, Duration::ZERO);
        let claims = vec![
            ("aged", aged),
            ("normal", urgency(2, Duration::ZERO)),
            ("raised", raised.clone()),
        ];
        // A critical task reached the runner that waited with a low one.
        let seen = grant_order(&gate, held, claims, || raised.set(0, Instant::now())).await;
        assert_eq!(seen, ["raised", "aged", "normal"]);
    }

    #[tokio::test]
    async fn a_withdrawn_waiter_neither_blocks_nor_leaks_a_slot() {
        let gate = PriorityGate::new(1);
        let held = gate.acquire(Urgency::default()).await;
        let gone = tokio::spawn({
            let gate = gate.clone();
            async move { gate.acquire(urgency(0, Duration::ZERO)).await }
        });
        waiting(&gate, 1).await;
        gone.abort();
        let _ = gone.await;
        drop(held);
        assert_eq!(gate.free(), 1, "the slot came back");
        let a = gate.acquire(Urgency::default()).await;
        drop(a);
        assert_eq!(gate.free(), 1);
    }
}
