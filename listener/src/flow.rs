//! Flow control applied while routing: content de-duplication and throttling.
//!
//! - **Dedup**: the key (a minijinja template over `event`/`data`, default a hash of type +
//!   aggregate + data) is claimed in KV bucket `grizzly_dedup` with a TTL of the handler's window.
//!   The claim's value is the claiming event's id, so a redelivered event finds its own claim and
//!   is routed again (idempotent), while a different event with the same key is a duplicate:
//!   recorded as `events.<T>.<I>.duplicate_skipped`, not handled. Shared by every listener
//!   replica and kept across restarts.
//! - **Throttle**: a virtual schedule per (handler, key): each task gets a start time at least
//!   `period / limit` after the previous one (`Task::not_before_ms`), and workers do not start it
//!   earlier. Lossless: over-limit events wait, none is dropped.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv};
use grizzly_shared::EventEnvelope;
use grizzly_shared::handler::LoadedHandler;
use sha2::{Digest, Sha256};

pub const DEDUP_BUCKET: &str = "grizzly_dedup";

/// The outcome of a dedup check.
#[derive(Debug, PartialEq, Eq)]
pub enum Dedup {
    /// Route it (first sight, or our own earlier claim).
    Route,
    /// Already handled within the window by event `first`.
    Duplicate { first: String, key: String },
}

pub struct FlowControl {
    templates: minijinja::Environment<'static>,
    dedup_windows: HashMap<String, Duration>,
    throttles: HashMap<String, (f64, bool)>,
    schedule: Mutex<HashMap<(String, String), f64>>,
    bucket: Option<kv::Store>,
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

impl FlowControl {
    /// The same flow state (KV bucket, throttle schedules) for a new set of handlers.
    pub fn rebuilt(&self, handlers: &[LoadedHandler]) -> anyhow::Result<Self> {
        let mut next = Self::new(handlers)?;
        next.bucket = self.bucket.clone();
        *next.schedule.get_mut().expect("schedule lock") =
            self.schedule.lock().expect("schedule lock").clone();
        Ok(next)
    }

    pub fn new(handlers: &[LoadedHandler]) -> anyhow::Result<Self> {
        let mut templates = minijinja::Environment::new();
        let mut dedup_windows = HashMap::new();
        let mut throttles = HashMap::new();
        for h in handlers {
            let name = &h.spec.name;
            if let Some(d) = &h.spec.dedup {
                dedup_windows.insert(name.clone(), d.window);
                if let Some(key) = &d.key {
                    templates
                        .add_template_owned(format!("dedup:{name}"), key.clone())
                        .map_err(|e| anyhow::anyhow!("handler {name}: dedup.key: {e}"))?;
                }
            }
            if let Some(t) = &h.spec.throttle {
                let interval_ms = t.period.as_secs_f64() * 1000.0 / f64::from(t.limit);
                throttles.insert(name.clone(), (interval_ms, t.key.is_some()));
                if let Some(key) = &t.key {
                    templates
                        .add_template_owned(format!("throttle:{name}"), key.clone())
                        .map_err(|e| anyhow::anyhow!("handler {name}: throttle.key: {e}"))?;
                }
            }
        }
        Ok(Self {
            templates,
            dedup_windows,
            throttles,
            schedule: Mutex::new(HashMap::new()),
            bucket: None,
        })
    }

    /// Opens the dedup bucket when any handler de-duplicates.
    pub async fn connect(
        &mut self,
        js: &jetstream::Context,
        replicas: usize,
    ) -> anyhow::Result<()> {
        if self.dedup_windows.is_empty() {
            return Ok(());
        }
        let bucket = js
            .create_or_update_key_value(kv::Config {
                bucket: DEDUP_BUCKET.into(),
                description: "Grizzly content de-duplication ledger".into(),
                history: 1,
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas,
                // Per-key TTLs (each handler's window).
                limit_markers: Some(Duration::from_secs(1)),
                ..Default::default()
            })
            .await?;
        self.bucket = Some(bucket);
        Ok(())
    }

    fn render(&self, name: &str, event: &EventEnvelope) -> anyhow::Result<String> {
        let template = self.templates.get_template(name)?;
        Ok(template.render(minijinja::context! { event => minijinja::value::Serde(event), data => minijinja::value::Serde(&event.data) })?)
    }

    /// Claims the event's dedup key for `handler` (no-op for handlers without `dedup`).
    pub async fn dedup(&self, handler: &str, event: &EventEnvelope) -> anyhow::Result<Dedup> {
        let (Some(window), Some(bucket)) = (self.dedup_windows.get(handler), &self.bucket) else {
            return Ok(Dedup::Route);
        };
        let content = match self.templates.get_template(&format!("dedup:{handler}")) {
            Ok(_) => self.render(&format!("dedup:{handler}"), event)?,
            Err(_) => format!(
                "{}\n{}\n{}",
                event.event_type,
                event.aggregate_key(),
                event.data
            ),
        };
        let key = format!(
            "{handler}.{}",
            hex(&Sha256::digest(content.as_bytes())[..16])
        );
        match bucket
            .create_with_ttl(&key, event.id.clone().into(), *window)
            .await
        {
            Ok(_) => Ok(Dedup::Route),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let first = bucket
                    .get(&key)
                    .await?
                    .map(|v| String::from_utf8_lossy(&v).into_owned());
                match first {
                    Some(first) if first != event.id => Ok(Dedup::Duplicate { first, key }),
                    // Our own claim (a redelivery), or it just expired: route.
                    _ => Ok(Dedup::Route),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The earliest start (unix ms) for `handler`'s next task, or `None` when it may start now.
    pub fn throttle(&self, handler: &str, event: &EventEnvelope) -> anyhow::Result<Option<u64>> {
        let Some((interval, keyed)) = self.throttles.get(handler) else {
            return Ok(None);
        };
        let key = if *keyed {
            self.render(&format!("throttle:{handler}"), event)?
        } else {
            String::new()
        };
        let now = now_ms();
        let mut schedule = self.schedule.lock().expect("throttle lock");
        if schedule.len() > 100_000 {
            schedule.retain(|_, next| *next > now);
        }
        let next = schedule.entry((handler.to_string(), key)).or_insert(now);
        let start = next.max(now);
        *next = start + interval;
        Ok((start > now).then_some(start.ceil() as u64))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use grizzly_shared::handler::parse_handler;
    use std::path::Path;

    #[test]
    fn throttle_spaces_starts_evenly() {
        let h = parse_handler(
            Path::new("t.yaml"),
            "name: t\non: [\"events.>\"]\nkind: exec\ncommand: [x]\nthrottle: { limit: 10, period: 1s }\n",
        )
        .unwrap();
        let flow = FlowControl::new(&[h]).unwrap();
        let subject = grizzly_shared::EventSubject::parse("events.a.b.c").unwrap();
        let event = EventEnvelope::new(&subject, "t", serde_json::json!({}));
        let starts: Vec<Option<u64>> = (0..12)
            .map(|_| flow.throttle("t", &event).unwrap())
            .collect();
        assert_eq!(starts[0], None, "the first runs at once");
        let last = starts[11].unwrap() as f64;
        assert!(
            last - now_ms() > 1000.0,
            "twelve at 10/s span over a second"
        );
        assert_eq!(flow.throttle("other", &event).unwrap(), None);
    }
}
