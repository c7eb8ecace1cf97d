//! The instance state machine: statuses, transitions, and the one table that says which
//! transition is legal from which status. Every transition taken is appended to the log as
//! `events.workflow.<instance_id>.<transition event>`; an illegal one is refused with an
//! [`IllegalTransition`] naming the status and what would have been allowed.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Created, not started yet.
    Pending,
    /// At least one call or sub-workflow is in flight.
    Running,
    /// Only waits (events, timers) are outstanding.
    Waiting,
    /// Paused by an operator: no new step starts; running work finishes and is recorded.
    Suspended,
    /// A step failed: completed steps' compensations run in reverse order.
    Compensating,
    Completed,
    Failed,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 8] = [
        Self::Pending,
        Self::Running,
        Self::Waiting,
        Self::Suspended,
        Self::Compensating,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Waiting => "waiting",
            Self::Suspended => "suspended",
            Self::Compensating => "compensating",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// Whether steps may be started (the scheduler runs).
    pub fn is_active(self) -> bool {
        matches!(self, Self::Running | Self::Waiting)
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transition {
    Start,
    Wait,
    Wake,
    Suspend,
    Resume,
    Compensate,
    Complete,
    Fail,
    Cancel,
}

impl Transition {
    pub const ALL: [Transition; 9] = [
        Self::Start,
        Self::Wait,
        Self::Wake,
        Self::Suspend,
        Self::Resume,
        Self::Compensate,
        Self::Complete,
        Self::Fail,
        Self::Cancel,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Wait => "wait",
            Self::Wake => "wake",
            Self::Suspend => "suspend",
            Self::Resume => "resume",
            Self::Compensate => "compensate",
            Self::Complete => "complete",
            Self::Fail => "fail",
            Self::Cancel => "cancel",
        }
    }

    /// The event type appended when this transition is taken.
    pub fn event_type(self) -> &'static str {
        match self {
            Self::Start => "started",
            Self::Wait => "waiting",
            Self::Wake => "woke",
            Self::Suspend => "suspended",
            Self::Resume => "resumed",
            Self::Compensate => "compensating",
            Self::Complete => "completed",
            Self::Fail => "failed",
            Self::Cancel => "cancelled",
        }
    }

    /// Transitions an operator may ask for (CLI or `*_requested` events).
    pub fn parse_request(s: &str) -> Option<Self> {
        match s {
            "suspend" => Some(Self::Suspend),
            "resume" => Some(Self::Resume),
            "cancel" => Some(Self::Cancel),
            _ => None,
        }
    }
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

use Status::*;
use Transition::*;

/// The transition table: (from, transition, to). Anything not listed is illegal.
pub const TABLE: &[(Status, Transition, Status)] = &[
    (Pending, Start, Running),
    (Pending, Fail, Failed),
    (Pending, Cancel, Cancelled),
    (Running, Wait, Waiting),
    (Running, Suspend, Suspended),
    (Running, Compensate, Compensating),
    (Running, Complete, Completed),
    (Running, Fail, Failed),
    (Running, Cancel, Cancelled),
    (Waiting, Wake, Running),
    (Waiting, Suspend, Suspended),
    (Waiting, Compensate, Compensating),
    (Waiting, Complete, Completed),
    (Waiting, Fail, Failed),
    (Waiting, Cancel, Cancelled),
    (Suspended, Resume, Running),
    (Suspended, Cancel, Cancelled),
    (Compensating, Fail, Failed),
];

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "illegal transition: cannot {transition} an instance that is {from} ({transition} is allowed from: {allowed})"
)]
pub struct IllegalTransition {
    pub from: Status,
    pub transition: Transition,
    pub allowed: String,
}

/// The status `transition` leads to from `from`, or why it cannot be taken.
pub fn next(from: Status, transition: Transition) -> Result<Status, IllegalTransition> {
    TABLE
        .iter()
        .find(|(f, t, _)| *f == from && *t == transition)
        .map(|(_, _, to)| *to)
        .ok_or_else(|| IllegalTransition {
            from,
            transition,
            allowed: {
                let from: Vec<&str> = TABLE
                    .iter()
                    .filter(|(_, t, _)| *t == transition)
                    .map(|(f, _, _)| f.as_str())
                    .collect();
                if from.is_empty() {
                    "nowhere".into()
                } else {
                    from.join(", ")
                }
            },
        })
}

/// The table as Markdown (docs and `grizzly workflow docs`).
pub fn table_markdown() -> String {
    let mut out = String::from("| from | transition | to | event |\n|---|---|---|---|\n");
    for (from, t, to) in TABLE {
        out.push_str(&format!("| {from} | {t} | {to} | `{}` |\n", t.event_type()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legal_transitions_follow_the_table() {
        assert_eq!(next(Pending, Start), Ok(Running));
        assert_eq!(next(Running, Suspend), Ok(Suspended));
        assert_eq!(next(Suspended, Resume), Ok(Running));
        assert_eq!(next(Waiting, Cancel), Ok(Cancelled));
        assert_eq!(next(Compensating, Fail), Ok(Failed));
    }

    #[test]
    fn illegal_transitions_are_refused_with_a_clear_error() {
        let err = next(Running, Resume).unwrap_err();
        assert_eq!(
            err.to_string(),
            "illegal transition: cannot resume an instance that is running (resume is allowed from: suspended)"
        );
        for terminal in [Completed, Failed, Cancelled] {
            for t in Transition::ALL {
                assert!(next(terminal, t).is_err(), "{terminal} → {t}");
            }
        }
        assert!(next(Compensating, Cancel).is_err());
        assert!(next(Suspended, Suspend).is_err());
    }

    #[test]
    fn each_pair_is_listed_once() {
        let mut seen = std::collections::HashSet::new();
        for (f, t, _) in TABLE {
            assert!(seen.insert((*f, *t)), "{f} {t} twice");
        }
    }
}
