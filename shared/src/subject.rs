//! Subjects: every subject Grizzly reads or writes is built and parsed here, nowhere else.
//!
//! - `events.<aggregate_type>.<aggregate_id>.<event_type>`: the event log (stream `EVENTS`).
//! - `tasks.<handler>.<partition>`: routed work for workers (stream `TASKS`).
//! - `dlq.<handler>` / `dlq._ingest`: dead letters (stream `DLQ`).

use std::fmt;

use thiserror::Error;

pub const EVENTS_PREFIX: &str = "events";
pub const EVENTS_ALL: &str = "events.>";
pub const TASKS_ALL: &str = "tasks.>";
pub const DLQ_ALL: &str = "dlq.>";
/// Dead letters for events that could not be parsed at all.
pub const DLQ_INGEST: &str = "dlq._ingest";

/// Why a subject is not a well-formed event subject.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SubjectError {
    #[error(
        "subject `{subject}` has {tokens} tokens; expected events.<aggregate_type>.<aggregate_id>.<event_type>"
    )]
    TokenCount { subject: String, tokens: usize },
    #[error("subject `{subject}` does not start with `events.`")]
    Prefix { subject: String },
    #[error("{what} `{token}` in subject `{subject}` must match [A-Za-z0-9_-]+")]
    BadToken {
        subject: String,
        what: &'static str,
        token: String,
    },
}

/// Whether `token` is a valid subject token for Grizzly's own tokens: `[A-Za-z0-9_-]+`.
pub fn is_valid_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The address of one domain event: `events.<aggregate_type>.<aggregate_id>.<event_type>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventSubject {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
}

impl EventSubject {
    /// Builds a subject, validating each token.
    pub fn new(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
    ) -> Result<Self, SubjectError> {
        let subject = Self {
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
        };
        subject.validate()?;
        Ok(subject)
    }

    pub fn parse(subject: &str) -> Result<Self, SubjectError> {
        let tokens: Vec<&str> = subject.split('.').collect();
        if tokens.first() != Some(&EVENTS_PREFIX) {
            return Err(SubjectError::Prefix {
                subject: subject.to_string(),
            });
        }
        if tokens.len() != 4 {
            return Err(SubjectError::TokenCount {
                subject: subject.to_string(),
                tokens: tokens.len(),
            });
        }
        let parsed = Self {
            aggregate_type: tokens[1].to_string(),
            aggregate_id: tokens[2].to_string(),
            event_type: tokens[3].to_string(),
        };
        parsed.validate()?;
        Ok(parsed)
    }

    fn validate(&self) -> Result<(), SubjectError> {
        for (what, token) in [
            ("aggregate type", &self.aggregate_type),
            ("aggregate id", &self.aggregate_id),
            ("event type", &self.event_type),
        ] {
            if !is_valid_token(token) {
                return Err(SubjectError::BadToken {
                    subject: self.to_string(),
                    what,
                    token: token.clone(),
                });
            }
        }
        Ok(())
    }

    /// The same aggregate with another event type (e.g. an outcome event).
    pub fn with_event_type(&self, event_type: &str) -> Result<Self, SubjectError> {
        Self::new(&self.aggregate_type, &self.aggregate_id, event_type)
    }

    /// `type/id`: the key used for per-aggregate ordering and partitioning.
    pub fn aggregate_key(&self) -> String {
        format!("{}/{}", self.aggregate_type, self.aggregate_id)
    }
}

impl fmt::Display for EventSubject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{EVENTS_PREFIX}.{}.{}.{}",
            self.aggregate_type, self.aggregate_id, self.event_type
        )
    }
}

/// `events.<aggregate_type>.<aggregate_id>.>`: every event of one aggregate.
pub fn aggregate_filter(aggregate_type: &str, aggregate_id: &str) -> String {
    format!("{EVENTS_PREFIX}.{aggregate_type}.{aggregate_id}.>")
}

/// `events.<t>.<i>.<e>` with `*` for each part not given: the narrowest single filter for
/// `grizzly events tail --aggregate/--type`.
pub fn events_filter(
    aggregate_type: Option<&str>,
    aggregate_id: Option<&str>,
    event_type: Option<&str>,
) -> String {
    format!(
        "{EVENTS_PREFIX}.{}.{}.{}",
        aggregate_type.unwrap_or("*"),
        aggregate_id.unwrap_or("*"),
        event_type.unwrap_or("*")
    )
}

/// Parses an aggregate key `type/id` (the form [`EventSubject::aggregate_key`] prints). With
/// `wildcards`, either part may be `*`.
pub fn parse_aggregate_key(key: &str, wildcards: bool) -> Result<(String, String), String> {
    let Some((aggregate_type, aggregate_id)) = key.split_once('/') else {
        return Err(format!(
            "aggregate `{key}` must be `<aggregate_type>/<aggregate_id>`, e.g. `agent/a1`"
        ));
    };
    for (what, token) in [("type", aggregate_type), ("id", aggregate_id)] {
        if !(is_valid_token(token) || wildcards && token == "*") {
            return Err(format!(
                "aggregate {what} `{token}` in `{key}` must match [A-Za-z0-9_-]+"
            ));
        }
    }
    Ok((aggregate_type.to_string(), aggregate_id.to_string()))
}

/// `tasks.<handler>.<partition>`.
pub fn task_subject(handler: &str, partition: u16) -> String {
    format!("tasks.{handler}.{partition}")
}

/// Subject filter for every partition of one handler's tasks.
pub fn task_filter(handler: &str) -> String {
    format!("tasks.{handler}.*")
}

/// `dlq.<handler>`.
pub fn dlq_subject(handler: &str) -> String {
    format!("dlq.{handler}")
}

/// Whether a NATS subject pattern (with `*` and `>` wildcards) matches a subject.
pub fn pattern_matches(pattern: &str, subject: &str) -> bool {
    let mut pattern_tokens = pattern.split('.');
    let mut subject_tokens = subject.split('.');
    loop {
        match (pattern_tokens.next(), subject_tokens.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(p), Some(s)) if p == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Validates a subscription pattern: dot-separated tokens, `*` anywhere, `>` only last.
pub fn validate_pattern(pattern: &str) -> Result<(), String> {
    let tokens: Vec<&str> = pattern.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        let ok = match *token {
            "*" => true,
            ">" => i == tokens.len() - 1,
            t => is_valid_token(t),
        };
        if !ok {
            return Err(format!(
                "pattern `{pattern}`: token `{token}` must be `*`, a final `>`, or match [A-Za-z0-9_-]+"
            ));
        }
    }
    if tokens.first() != Some(&EVENTS_PREFIX) {
        return Err(format!("pattern `{pattern}` must start with `events.`"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_builds_event_subjects() {
        let s = EventSubject::parse("events.agent.a1.ping").unwrap();
        assert_eq!(s.aggregate_type, "agent");
        assert_eq!(s.aggregate_id, "a1");
        assert_eq!(s.event_type, "ping");
        assert_eq!(s.to_string(), "events.agent.a1.ping");
        assert_eq!(s.aggregate_key(), "agent/a1");
    }

    #[test]
    fn rejects_malformed_subjects() {
        assert!(matches!(
            EventSubject::parse("events.agent.a1"),
            Err(SubjectError::TokenCount { tokens: 3, .. })
        ));
        assert!(matches!(
            EventSubject::parse("events.agent.a1.ping.extra"),
            Err(SubjectError::TokenCount { tokens: 5, .. })
        ));
        assert!(matches!(
            EventSubject::parse("other.agent.a1.ping"),
            Err(SubjectError::Prefix { .. })
        ));
        assert!(matches!(
            EventSubject::new("agent", "a 1", "ping"),
            Err(SubjectError::BadToken { .. })
        ));
    }

    #[test]
    fn matches_patterns() {
        assert!(pattern_matches(
            "events.agent.*.ping",
            "events.agent.a1.ping"
        ));
        assert!(pattern_matches("events.>", "events.agent.a1.ping"));
        assert!(pattern_matches("events.agent.>", "events.agent.a1.ping"));
        assert!(!pattern_matches(
            "events.agent.*.ping",
            "events.agent.a1.pong"
        ));
        assert!(!pattern_matches("events.agent.*", "events.agent.a1.ping"));
        assert!(!pattern_matches(
            "events.agent.a1.ping.x",
            "events.agent.a1.ping"
        ));
        assert!(validate_pattern("events.agent.*.ping").is_ok());
        assert!(validate_pattern("events.>.ping").is_err());
        assert!(validate_pattern("tasks.x").is_err());
    }

    #[test]
    fn parses_aggregate_keys_and_builds_filters() {
        assert_eq!(
            parse_aggregate_key("agent/a1", false).unwrap(),
            ("agent".into(), "a1".into())
        );
        assert!(
            parse_aggregate_key("agent", false)
                .unwrap_err()
                .contains("agent/a1")
        );
        assert!(parse_aggregate_key("agent/a 1", false).is_err());
        assert!(parse_aggregate_key("agent/a1/x", false).is_err());
        assert!(parse_aggregate_key("agent/*", false).is_err());
        assert!(parse_aggregate_key("agent/*", true).is_ok());
        assert_eq!(aggregate_filter("agent", "a1"), "events.agent.a1.>");
        assert_eq!(
            events_filter(Some("agent"), None, Some("ping")),
            "events.agent.*.ping"
        );
    }
}
