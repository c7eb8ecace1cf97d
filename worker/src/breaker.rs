//! Per-handler circuit breaker: closed → open after `failure_threshold` consecutive failures →
//! half-open after `open_for` (one probe runs) → closed on success, open again on failure.
//! While open, tasks wait here (their attempts are not spent) instead of hammering a broken
//! dependency.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use grizzly_shared::handler::BreakerPolicy;
use tokio::sync::Notify;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

impl BreakerState {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Closed { .. } => "closed",
            Self::Open { .. } => "open",
            Self::HalfOpen { .. } => "half_open",
        }
    }
}

pub struct Breaker {
    policy: BreakerPolicy,
    state: Mutex<BreakerState>,
    changed: Notify,
}

/// A state change worth telling the log about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened,
    Closed,
}

impl Breaker {
    pub fn new(policy: BreakerPolicy) -> Self {
        Self {
            policy,
            state: Mutex::new(BreakerState::Closed { failures: 0 }),
            changed: Notify::new(),
        }
    }

    pub fn state(&self) -> BreakerState {
        *self.state.lock().expect("breaker lock")
    }

    /// Waits until a call may go ahead.
    pub async fn admit(&self) {
        loop {
            let notified = self.changed.notified();
            let wait = {
                let mut state = self.state.lock().expect("breaker lock");
                match *state {
                    BreakerState::Closed { .. } => return,
                    BreakerState::HalfOpen { probing: false } => {
                        *state = BreakerState::HalfOpen { probing: true };
                        return;
                    }
                    BreakerState::Open { until } if Instant::now() >= until => {
                        *state = BreakerState::HalfOpen { probing: true };
                        return;
                    }
                    BreakerState::Open { until } => until.saturating_duration_since(Instant::now()),
                    // A probe is running: wait for its verdict (re-check now and then).
                    BreakerState::HalfOpen { probing: true } => Duration::from_millis(500),
                }
            };
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Records a call's result; returns a transition when the breaker opened or closed.
    pub fn record(&self, success: bool) -> Option<Transition> {
        let mut state = self.state.lock().expect("breaker lock");
        let open = BreakerState::Open {
            until: Instant::now() + self.policy.open_for,
        };
        let (next, transition) = match (*state, success) {
            (BreakerState::Closed { .. }, true) => (BreakerState::Closed { failures: 0 }, None),
            (BreakerState::Closed { failures }, false)
                if failures + 1 >= self.policy.failure_threshold =>
            {
                (open, Some(Transition::Opened))
            }
            (BreakerState::Closed { failures }, false) => (
                BreakerState::Closed {
                    failures: failures + 1,
                },
                None,
            ),
            (BreakerState::HalfOpen { .. }, true) => (
                BreakerState::Closed { failures: 0 },
                Some(Transition::Closed),
            ),
            (BreakerState::HalfOpen { .. }, false) => (open, Some(Transition::Opened)),
            // Results of calls admitted before the breaker opened change nothing.
            (s @ BreakerState::Open { .. }, _) => (s, None),
        };
        *state = next;
        drop(state);
        if transition.is_some() {
            self.changed.notify_waiters();
        }
        transition
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn opens_probes_and_closes() {
        let b = Breaker::new(BreakerPolicy {
            failure_threshold: 2,
            open_for: Duration::from_millis(50),
        });
        b.admit().await;
        assert_eq!(b.record(false), None);
        assert_eq!(b.record(false), Some(Transition::Opened));
        assert_eq!(b.state().name(), "open");
        // admit waits for the open period, then lets one probe through.
        tokio::time::timeout(Duration::from_secs(2), b.admit())
            .await
            .unwrap();
        assert_eq!(b.state().name(), "half_open");
        assert_eq!(b.record(true), Some(Transition::Closed));
        assert_eq!(b.state().name(), "closed");
    }

    #[tokio::test]
    async fn failed_probe_reopens() {
        let b = Breaker::new(BreakerPolicy {
            failure_threshold: 1,
            open_for: Duration::from_millis(20),
        });
        assert_eq!(b.record(false), Some(Transition::Opened));
        tokio::time::timeout(Duration::from_secs(2), b.admit())
            .await
            .unwrap();
        assert_eq!(b.record(false), Some(Transition::Opened));
        assert_eq!(b.state().name(), "open");
    }
}
