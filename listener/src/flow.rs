//! Flow control applied while routing: content de-duplication and throttling.
//!
//! - **Dedup**: the key (a minijinja template over `event`/`data`, default a hash of type +
//!   aggregate + data) is claimed in KV bucket `grizzly_dedup` with a TTL of the handler's window.
//!   The claim's value is the claiming event's id, so a redelivered event finds its own claim and
//!   is routed again (idempotent), while a different event with the same key is a duplicate:
//!   recorded as `events.<T>.<I>.duplicate_skipped`, not handled. Shared by every listener
//!   replica and kept across restarts.
//! - **Throttle**: a virtual schedule per (handler, key), kept in KV `grizzly_rate_limit`
//!   (`throttle.<handler>.<key hash>`) so that listener replicas routing different partitions
//!   share it: each task gets a start time at least `period / limit` after the previous one
//!   (`Task::not_before_ms`), and workers do not start it earlier. Lossless: over-limit events
//!   wait, none is dropped.
//! - **Rate limit** (lossy): per (handler, key) the newest `limit` admitted events (sequence,
//!   broker time) are kept in KV `grizzly_rate_limit`; an event is admitted when fewer than
//!   `limit` of them lie within `period` before its own broker time, else it is recorded as
//!   `handler_skipped` (`reason: rate_limited`) and gets no task. Broker times make the decision
//!   the same for every replica and after a restart; a re-routed event finds itself admitted.
//! - **Debounce**: per (handler, key) KV `grizzly_debounce` holds the newest event of the current
//!   burst; each task waits until `period` after its event (capped at the burst's first event +
//!   `max_wait`), and the worker runs it only if it is still the newest — the others are
//!   recorded as `handler_skipped` (`reason: debounced`, `superseded_by`).
//!
//! The state buckets are written with compare-and-set on the entry's revision; each listener
//! caches what it wrote, so an admitted event costs one KV write and a rejected one none.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grizzly_shared::clock::now_ms_f64 as now_ms;

use async_nats::jetstream::{self, kv};
use grizzly_shared::EventEnvelope;
use grizzly_shared::flowspec::{
    self, DEBOUNCE_BUCKET, DebounceSpec, DebounceState, KeyTemplate, RATE_LIMIT_BUCKET,
    RateLimitSpec, RateLimitState,
};
use grizzly_shared::handler::LoadedHandler;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tracing::debug;

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
    throttle_state: Option<Arc<Cas<ThrottleState>>>,
    bucket: Option<kv::Store>,
    rate_limits: HashMap<String, (RateLimitSpec, Option<KeyTemplate>)>,
    debounces: HashMap<String, (DebounceSpec, Option<KeyTemplate>)>,
    rate_state: Option<Arc<Cas<RateLimitState>>>,
    debounce_state: Option<Arc<Cas<DebounceState>>>,
}

/// A KV bucket written with compare-and-set, with a cache of what this listener last wrote.
struct Cas<S> {
    bucket: kv::Store,
    cache: Mutex<HashMap<String, (u64, S)>>,
}

impl<S: Clone + Serialize + DeserializeOwned> Cas<S> {
    fn new(bucket: kv::Store) -> Self {
        Self {
            bucket,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Applies `change` to the entry at `key`: `None` leaves it as it is, `Some` writes it (only
    /// if nobody wrote in between — else `change` runs again on the fresh state).
    async fn update(
        &self,
        key: &str,
        mut change: impl FnMut(Option<&S>) -> Option<S>,
    ) -> anyhow::Result<()> {
        for attempt in 0..8 {
            let cached = match attempt {
                0 => self.cache.lock().expect("cas lock").get(key).cloned(),
                _ => None,
            };
            let (revision, state) = match cached {
                Some((revision, state)) => (revision, Some(state)),
                None => match self.bucket.entry(key).await? {
                    Some(entry) => (entry.revision, serde_json::from_slice(&entry.value).ok()),
                    None => (0, None),
                },
            };
            let Some(new) = change(state.as_ref()) else {
                return Ok(());
            };
            let value = serde_json::to_vec(&new)?.into();
            let written = match revision {
                0 => self
                    .bucket
                    .create(key, value)
                    .await
                    .map_err(anyhow::Error::from),
                r => self
                    .bucket
                    .update(key, value, r)
                    .await
                    .map_err(anyhow::Error::from),
            };
            match written {
                Ok(revision) => {
                    let mut cache = self.cache.lock().expect("cas lock");
                    if cache.len() > 100_000 {
                        cache.clear();
                    }
                    cache.insert(key.to_string(), (revision, new));
                    return Ok(());
                }
                // Another listener (or an expired cache entry) moved it on: read and retry.
                Err(e) => {
                    debug!(key, error = %e, "flow-control state changed underneath; retrying");
                    self.cache.lock().expect("cas lock").remove(key);
                }
            }
        }
        anyhow::bail!("flow-control state {key} keeps changing; will retry the event")
    }
}

impl FlowControl {
    /// The same flow state (KV bucket, throttle schedules) for a new set of handlers.
    pub fn rebuilt(&self, handlers: &[LoadedHandler]) -> anyhow::Result<Self> {
        let mut next = Self::new(handlers)?;
        next.bucket = self.bucket.clone();
        next.rate_state = self.rate_state.clone();
        next.debounce_state = self.debounce_state.clone();
        next.throttle_state = self.throttle_state.clone();
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
        let template = |name: &str, what: &str, key: &Option<String>| {
            key.as_deref()
                .map(KeyTemplate::new)
                .transpose()
                .map_err(|e| anyhow::anyhow!("handler {name}: {what}.key: {e}"))
        };
        let mut rate_limits = HashMap::new();
        let mut debounces = HashMap::new();
        for h in handlers {
            let name = &h.spec.name;
            if let Some(r) = &h.spec.rate_limit {
                let key = template(name, "rate_limit", &r.key)?;
                rate_limits.insert(name.clone(), (r.clone(), key));
            }
            if let Some(d) = &h.spec.debounce {
                let key = template(name, "debounce", &d.key)?;
                debounces.insert(name.clone(), (d.clone(), key));
            }
        }
        Ok(Self {
            templates,
            dedup_windows,
            throttles,
            throttle_state: None,
            bucket: None,
            rate_limits,
            debounces,
            rate_state: None,
            debounce_state: None,
        })
    }

    /// Opens the dedup bucket when any handler de-duplicates.
    pub async fn connect(
        &mut self,
        js: &jetstream::Context,
        replicas: usize,
    ) -> anyhow::Result<()> {
        // Always: a handler registered later may need any of them (see `rebuilt`).
        let bucket = flowspec::state_bucket(js, RATE_LIMIT_BUCKET, replicas).await?;
        self.rate_state = Some(Arc::new(Cas::new(bucket.clone())));
        self.throttle_state = Some(Arc::new(Cas::new(bucket)));
        let bucket = flowspec::state_bucket(js, DEBOUNCE_BUCKET, replicas).await?;
        self.debounce_state = Some(Arc::new(Cas::new(bucket)));
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
    pub async fn throttle(
        &self,
        handler: &str,
        event: &EventEnvelope,
    ) -> anyhow::Result<Option<u64>> {
        let (Some((interval, keyed)), Some(state)) =
            (self.throttles.get(handler), &self.throttle_state)
        else {
            return Ok(None);
        };
        let key = if *keyed {
            self.render(&format!("throttle:{handler}"), event)?
        } else {
            String::new()
        };
        let now = now_ms();
        let mut start = now;
        state
            .update(
                &format!("throttle.{}", flowspec::kv_key(handler, &key)),
                |current| {
                    start = current.map_or(now, |s| s.next_ms.max(now));
                    Some(ThrottleState {
                        next_ms: start + interval,
                    })
                },
            )
            .await?;
        Ok((start > now).then_some(start.ceil() as u64))
    }
}

/// Throttle schedule of one (handler, key): when its next task may start (unix ms).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct ThrottleState {
    next_ms: f64,
}

/// Why a handler does not get an event, recorded as `handler_skipped`.
#[derive(Debug, PartialEq)]
pub struct RateLimited {
    pub key: String,
    pub limit: u32,
    pub period_ms: u64,
}

impl FlowControl {
    /// Whether `handler`'s rate limit admits the event stored at `seq` at broker time `at_ms`
    /// (`None`: admitted, or the handler has no rate limit).
    pub async fn rate_limit(
        &self,
        handler: &str,
        event: &EventEnvelope,
        seq: u64,
        at_ms: u64,
    ) -> anyhow::Result<Option<RateLimited>> {
        let (Some((spec, template)), Some(state)) =
            (self.rate_limits.get(handler), &self.rate_state)
        else {
            return Ok(None);
        };
        let key = KeyTemplate::render_opt(template.as_ref(), event)?;
        let period_ms = spec.period.as_millis() as u64;
        let limit = spec.limit as usize;
        let mut admitted = false;
        state
            .update(&flowspec::kv_key(handler, &key), |current| {
                let mut state = current.cloned().unwrap_or_default();
                // A re-routed event was admitted before: admit it again, change nothing.
                if state.admitted.iter().any(|(s, _)| *s == seq) {
                    admitted = true;
                    return None;
                }
                admitted = admits(&state.admitted, at_ms, period_ms, limit);
                if !admitted {
                    return None;
                }
                state.admitted.push((seq, at_ms));
                state.admitted.sort_unstable_by_key(|(_, t)| *t);
                let excess = state.admitted.len().saturating_sub(limit);
                state.admitted.drain(..excess);
                Some(state)
            })
            .await?;
        Ok((!admitted).then_some(RateLimited {
            key,
            limit: spec.limit,
            period_ms,
        }))
    }

    /// Records the event as the newest of its debounce burst and returns when its task may run
    /// (unix ms); `None` for handlers without `debounce`.
    pub async fn debounce(
        &self,
        handler: &str,
        event: &EventEnvelope,
        seq: u64,
        at_ms: u64,
    ) -> anyhow::Result<Option<u64>> {
        let (Some((spec, template)), Some(state)) =
            (self.debounces.get(handler), &self.debounce_state)
        else {
            return Ok(None);
        };
        let key = KeyTemplate::render_opt(template.as_ref(), event)?;
        let period = spec.period.as_millis() as u64;
        let max_wait = spec.max_wait.map(|d| d.as_millis() as u64);
        let mut due = at_ms + period;
        state
            .update(&flowspec::kv_key(handler, &key), |current| {
                due = at_ms + period;
                match current {
                    // This event again (re-routed), or an older one: the state stays; an older
                    // event's task finds itself superseded when due.
                    Some(s) if s.latest_seq >= seq => {
                        if s.latest_seq == seq {
                            due = s.due_ms;
                        }
                        None
                    }
                    _ => {
                        // A burst goes on while its newest event has not run yet.
                        let first_ms = match current {
                            Some(s) if s.due_ms > at_ms => s.first_ms,
                            _ => at_ms,
                        };
                        if let Some(max_wait) = max_wait {
                            due = due.min(first_ms + max_wait);
                        }
                        Some(DebounceState {
                            latest: event.id.clone(),
                            latest_seq: seq,
                            first_ms,
                            due_ms: due,
                        })
                    }
                }
            })
            .await?;
        Ok(Some(due))
    }
}

/// Whether an event at `at_ms` keeps every window of `period_ms` at `limit` admitted events at
/// most, given the newest `limit` admitted ones (by time, oldest first). An event older than all
/// of a full record is refused: the admitted events before it are no longer known.
fn admits(admitted: &[(u64, u64)], at_ms: u64, period_ms: u64, limit: usize) -> bool {
    if admitted.len() >= limit && admitted.first().is_some_and(|(_, t)| at_ms < *t) {
        return false;
    }
    let mut near: Vec<u64> = admitted
        .iter()
        .map(|(_, t)| *t)
        .filter(|t| t.abs_diff(at_ms) < period_ms)
        .collect();
    near.push(at_ms);
    near.sort_unstable();
    near.windows(limit + 1)
        .all(|w| w[limit] - w[0] >= period_ms)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_windows_hold_whatever_the_order_of_decisions() {
        // 2 per 1000 ms; admitted at 1000 and 1500.
        let admitted = [(1, 1000), (2, 1500)];
        assert!(!admits(&admitted, 1600, 1000, 2), "third in the window");
        assert!(admits(&admitted, 2000, 1000, 2), "the window moved on");
        // Decided late (another replica was ahead): 900 would make 900..1500 hold three.
        assert!(!admits(&admitted, 900, 1000, 2));
        assert!(admits(&[(2, 1500)], 400, 1000, 2), "a second one is room");
        assert!(admits(&[], 5, 1000, 1));
        assert!(!admits(&[(1, 10)], 5, 1000, 1), "older than a full record");
    }
}
