//! Handler flow-control settings that group or drop events: `batch`, `debounce` and
//! `rate_limit` (see ARCHITECTURE.md, "Batching, debounce and rate limit"), their validation,
//! and the key templates they share with `throttle` and `dedup`.
//!
//! - `batch`: the worker hands similar events to one invocation; a batch closes on `max_size`,
//!   `max_bytes` or `max_wait` since it opened, whichever comes first.
//! - `debounce`: of a burst of events with one key, only the last runs, `period` after it (at
//!   most `max_wait` after the burst's first); the others are recorded as skipped.
//! - `rate_limit`: lossy — at most `limit` events per `period` run, the others are recorded as
//!   skipped (unlike `throttle`, which delays them).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::envelope::EventEnvelope;

/// Groups events into one invocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSpec {
    /// Most events in one batch.
    pub max_size: usize,
    /// How long a batch stays open for more events after its first one joined.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Most bytes (sum of the events' JSON sizes) in one batch; default: no limit. A single
    /// event larger than this runs alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<usize>,
    /// minijinja template over `event` / `data`: only events with the same key share a batch
    /// (default: one batch at a time per handler partition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Runs only the last event of a burst.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebounceSpec {
    /// Quiet time after an event before it runs; a newer event with the same key supersedes it.
    #[serde(with = "humantime_serde")]
    pub period: Duration,
    /// minijinja template over `event` / `data` (default: one key per handler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Longest a burst can postpone its run, counted from its first event (default: no limit).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_wait: Option<Duration>,
}

/// Lossy rate limit: events over `limit` per `period` are skipped (and recorded).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    pub limit: u32,
    #[serde(with = "humantime_serde")]
    pub period: Duration,
    /// minijinja template over `event` / `data`, e.g. `{{ event.source }}` (default: one limit
    /// per handler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Problems with `batch`, `debounce` and `rate_limit` that serde cannot see. Each message starts
/// with the offending key path (`batch.max_size: ...`) so it can be located in the file.
pub fn validate(spec: &crate::HandlerSpec) -> Vec<String> {
    let mut problems = Vec::new();
    let mut template = |path: &str, key: &Option<String>| {
        if let Some(key) = key
            && let Err(e) = KeyTemplate::new(key)
        {
            problems.push(format!("{path}: invalid template: {e}"));
        }
    };
    template(
        "batch.key",
        &spec.batch.as_ref().and_then(|b| b.key.clone()),
    );
    template(
        "debounce.key",
        &spec.debounce.as_ref().and_then(|d| d.key.clone()),
    );
    template(
        "rate_limit.key",
        &spec.rate_limit.as_ref().and_then(|r| r.key.clone()),
    );
    if let Some(b) = &spec.batch {
        if b.max_size == 0 {
            problems.push("batch.max_size: must be at least 1".into());
        }
        if b.max_wait.is_zero() {
            problems.push("batch.max_wait: must be greater than zero".into());
        }
        if b.max_bytes == Some(0) {
            problems.push("batch.max_bytes: must be at least 1".into());
        }
        if spec.session == crate::handler::SessionMode::PerAggregate {
            problems.push(
                "batch: cannot be combined with `session: per_aggregate` (a batch spans aggregates)"
                    .into(),
            );
        }
        if spec.debounce.is_some() {
            problems.push(
                "batch: cannot be combined with `debounce` (debounce already runs one event per burst)"
                    .into(),
            );
        }
    }
    if let Some(d) = &spec.debounce {
        if d.period.is_zero() {
            problems.push("debounce.period: must be greater than zero".into());
        }
        if let Some(max_wait) = d.max_wait
            && max_wait < d.period
        {
            problems.push("debounce.max_wait: must be at least `period`".into());
        }
        if d.period.max(d.max_wait.unwrap_or_default()) > MAX_WINDOW {
            problems.push("debounce: period and max_wait must be at most 24h".into());
        }
    }
    if let Some(r) = &spec.rate_limit {
        if r.limit == 0 {
            problems.push("rate_limit.limit: must be at least 1".into());
        }
        if r.limit > MAX_RATE_LIMIT {
            problems.push(format!(
                "rate_limit.limit: at most {MAX_RATE_LIMIT} per period (use a longer period)"
            ));
        }
        if r.period < Duration::from_millis(1) {
            problems.push("rate_limit.period: must be at least 1ms".into());
        }
        if r.period > MAX_WINDOW {
            problems.push("rate_limit.period: must be at most 24h".into());
        }
    }
    problems
}

/// Longest `rate_limit.period` and debounce window: state older than [`STATE_MAX_AGE`] is gone.
pub const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Entries of the rate-limit and debounce buckets expire this long after their last write.
pub const STATE_MAX_AGE: Duration = Duration::from_secs(2 * 24 * 3600);
/// KV bucket: per (handler, key) the latest event of the current debounce burst.
pub const DEBOUNCE_BUCKET: &str = "grizzly_debounce";
/// KV bucket: per (handler, key) the events admitted by the rate limit in the last period.
pub const RATE_LIMIT_BUCKET: &str = "grizzly_rate_limit";

/// Debounce state of one (handler, key): written by the listener for every event, read by the
/// worker when a task is due (it runs only if it is still `latest`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DebounceState {
    /// Id and `EVENTS` sequence of the newest event of the burst.
    pub latest: String,
    pub latest_seq: u64,
    /// Broker time (unix ms) of the burst's first event.
    pub first_ms: u64,
    /// When the newest event runs (unix ms).
    pub due_ms: u64,
}

/// Rate-limit state of one (handler, key): the newest `limit` admitted events (sequence, broker
/// time in unix ms), oldest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RateLimitState {
    pub admitted: Vec<(u64, u64)>,
}

/// Opens (creating when needed) one of the flow-control state buckets.
pub async fn state_bucket(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    replicas: usize,
) -> anyhow::Result<async_nats::jetstream::kv::Store> {
    use async_nats::jetstream::{kv, stream::StorageType};
    js.create_or_update_key_value(kv::Config {
        bucket: bucket.into(),
        description: "Grizzly flow-control state (debounce / rate limit)".into(),
        history: 1,
        max_age: STATE_MAX_AGE,
        storage: StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("KV bucket {bucket}: {e}"))
}

/// The rate limiter keeps the times of the last `limit` admitted events per key.
pub const MAX_RATE_LIMIT: u32 = 10_000;

/// Problems that depend on the worker's settings: a batch must close well before the broker
/// would redeliver its tasks.
pub fn settings_problems(spec: &crate::HandlerSpec, ack_wait: Duration) -> Vec<String> {
    match &spec.batch {
        Some(b) if b.max_wait >= ack_wait => vec![format!(
            "batch.max_wait: {} must be shorter than the worker's ack_wait ({})",
            humantime::format_duration(b.max_wait),
            humantime::format_duration(ack_wait)
        )],
        _ => Vec::new(),
    }
}

/// A key template (`batch.key`, `debounce.key`, `rate_limit.key`): minijinja over `event` (the
/// envelope) and `data`.
pub struct KeyTemplate(minijinja::Environment<'static>);

impl KeyTemplate {
    pub fn new(source: &str) -> Result<Self, minijinja::Error> {
        let mut env = minijinja::Environment::new();
        env.add_template_owned("key", source.to_string())?;
        Ok(Self(env))
    }

    pub fn render(&self, event: &EventEnvelope) -> Result<String, minijinja::Error> {
        use minijinja::value::Serde;
        self.0
            .get_template("key")?
            .render(minijinja::context! { event => Serde(event), data => Serde(&event.data) })
    }

    /// The rendered key of an optional template (`""` when there is none: one key).
    pub fn render_opt(
        template: Option<&Self>,
        event: &EventEnvelope,
    ) -> Result<String, minijinja::Error> {
        template.map_or(Ok(String::new()), |t| t.render(event))
    }
}

impl std::fmt::Debug for KeyTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyTemplate")
    }
}

/// The KV key of `handler`'s state for one rendered key (any text becomes a valid KV key).
pub fn kv_key(handler: &str, rendered: &str) -> String {
    let digest = Sha256::digest(rendered.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{handler}.{hex}")
}

#[cfg(test)]
mod tests {
    use crate::handler::{HandlerFileError, LoadedHandler, parse_handler};
    use std::path::Path;

    fn parse(text: &str) -> Result<LoadedHandler, Vec<HandlerFileError>> {
        parse_handler(
            Path::new("handlers/b.yaml"),
            &format!("name: b\non: [\"events.>\"]\nkind: exec\ncommand: [x]\n{text}"),
        )
    }

    fn errors(text: &str) -> Vec<String> {
        parse(text)
            .unwrap_err()
            .iter()
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn parses_all_three() {
        let h = parse(
            "batch: { max_size: 10, max_wait: 300ms, max_bytes: 65536, key: \"{{ data.tenant }}\" }\n\
             rate_limit: { limit: 5, period: 1s, key: \"{{ event.source }}\" }\n",
        )
        .unwrap();
        let b = h.spec.batch.unwrap();
        assert_eq!(
            (b.max_size, b.max_wait.as_millis(), b.max_bytes),
            (10, 300, Some(65536))
        );
        assert_eq!(h.spec.rate_limit.unwrap().limit, 5);
        let h = parse("debounce:\n  period: 2s\n  max_wait: 10s\n").unwrap();
        assert_eq!(
            h.spec.debounce.unwrap().max_wait,
            Some(std::time::Duration::from_secs(10))
        );
    }

    #[test]
    fn zero_values_point_at_the_nested_key() {
        // Line 5 is the `batch:` line; the column is that of the offending nested key.
        let e = errors("batch: { max_size: 0, max_wait: 1s }\n");
        assert_eq!(
            e,
            vec!["handlers/b.yaml:5:10: batch.max_size: must be at least 1"]
        );
        let e = errors("batch:\n  max_size: 3\n  max_wait: 0s\n  max_bytes: 0\n");
        assert_eq!(
            e,
            vec![
                "handlers/b.yaml:7:3: batch.max_wait: must be greater than zero",
                "handlers/b.yaml:8:3: batch.max_bytes: must be at least 1",
            ]
        );
        let e = errors("rate_limit: { limit: 0, period: 0s }\n");
        assert!(
            e[0].starts_with("handlers/b.yaml:5:15: rate_limit.limit:"),
            "{e:?}"
        );
        assert!(
            e[1].starts_with("handlers/b.yaml:5:25: rate_limit.period:"),
            "{e:?}"
        );
        let e = errors("debounce: { period: 0s }\n");
        assert_eq!(
            e,
            vec!["handlers/b.yaml:5:13: debounce.period: must be greater than zero"]
        );
        let e = errors("debounce: { period: 5s, max_wait: 1s }\n");
        assert!(
            e[0].contains(":5:25: debounce.max_wait: must be at least"),
            "{e:?}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_types_have_line_and_column() {
        let e = errors("batch: { max_size: 3, max_wait: 1s, size: 4 }\n");
        assert!(e[0].starts_with("handlers/b.yaml:5:"), "{e:?}");
        assert!(e[0].contains("size"), "{e:?}");
        let e = errors("batch:\n  max_size: ten\n  max_wait: 1s\n");
        assert!(e[0].starts_with("handlers/b.yaml:6:"), "{e:?}");
        let e = errors("batch: { max_size: 3 }\n");
        assert!(e[0].contains("max_wait"), "{e:?}");
        let e = errors("rate_limit: { limit: 1, period: soon }\n");
        assert!(e[0].starts_with("handlers/b.yaml:5:"), "{e:?}");
        let e = errors("debounce: { period: 1s, quiet: 2s }\n");
        assert!(e[0].contains("quiet"), "{e:?}");
    }

    #[test]
    fn bad_combinations_and_templates_are_named() {
        let e = parse_handler(
            Path::new("h.yaml"),
            "name: c\non: [\"events.>\"]\nkind: claude\ntemplate: x\nsession: per_aggregate\nbatch: { max_size: 2, max_wait: 1s }\n",
        )
        .unwrap_err();
        assert!(
            e[0].to_string()
                .starts_with("h.yaml:6:1: batch: cannot be combined with `session: per_aggregate`"),
            "{}",
            e[0]
        );
        let e = errors("batch: { max_size: 2, max_wait: 1s }\ndebounce: { period: 1s }\n");
        assert!(
            e[0].contains("batch: cannot be combined with `debounce`"),
            "{e:?}"
        );
        let e = errors("rate_limit: { limit: 1, period: 1s, key: \"{{ event.source \" }\n");
        assert!(
            e[0].starts_with("handlers/b.yaml:5:37: rate_limit.key: invalid template"),
            "{e:?}"
        );
    }

    #[test]
    fn max_wait_must_be_below_ack_wait() {
        let h = parse("batch: { max_size: 2, max_wait: 30s }\n").unwrap();
        let p = super::settings_problems(&h.spec, std::time::Duration::from_secs(30));
        assert_eq!(
            p,
            vec!["batch.max_wait: 30s must be shorter than the worker's ack_wait (30s)"]
        );
        assert!(super::settings_problems(&h.spec, std::time::Duration::from_secs(31)).is_empty());
    }

    #[test]
    fn keys_render_and_hash() {
        let subject = crate::EventSubject::parse("events.a.b.c").unwrap();
        let event = crate::EventEnvelope::new(&subject, "src1", serde_json::json!({"t": 7}));
        let t = super::KeyTemplate::new("{{ event.source }}/{{ data.t }}").unwrap();
        assert_eq!(t.render(&event).unwrap(), "src1/7");
        assert_eq!(super::KeyTemplate::render_opt(None, &event).unwrap(), "");
        let k = super::kv_key("h", "src1/7");
        assert!(k.starts_with("h.") && k.len() == 34, "{k}");
        assert_ne!(k, super::kv_key("h", "src1/8"));
    }
}
