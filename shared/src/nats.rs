//! Connecting to NATS and the idempotent set-up of Grizzly's streams and buckets.
//!
//! | stream | subjects | retention | role |
//! |---|---|---|---|
//! | `EVENTS` | `events.>` | limits, discard new | the system of record |
//! | `TASKS` | `tasks.>` | work queue | routed work, one message per (event, handler), or a bundle of them |
//! | `DLQ` | `dlq.>` | limits, discard new | dead letters |
//!
//! KV bucket `grizzly_leases` holds partition leases (which worker consumes which task partition,
//! which listener routes which partition of the log); `grizzly_listener` holds, per partition of
//! the log, the stream sequence from which it is still to be routed.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use async_nats::{Client, ConnectOptions};
use thiserror::Error;

use crate::config::StreamSettings;
use crate::subject::{DLQ_ALL, EVENTS_ALL, TASKS_ALL};

pub const EVENTS_STREAM: &str = "EVENTS";
pub const TASKS_STREAM: &str = "TASKS";
pub const DLQ_STREAM: &str = "DLQ";
pub const LEASES_BUCKET: &str = "grizzly_leases";
pub const CURSORS_BUCKET: &str = "grizzly_listener";
pub const DONE_BUCKET: &str = "grizzly_done";
/// How long a bundle's record of done tasks is kept: longer than a bundle stays unacked.
pub const DONE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Name under which the listeners' lag is reported (`grizzly_consumer_pending`).
pub const LISTENER_CONSUMER: &str = "grizzly-listener";

#[derive(Debug, Error)]
pub enum SetupError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("cannot create or update stream {stream}: {source}")]
    Stream {
        stream: &'static str,
        source: jetstream::context::CreateStreamError,
    },
    #[error("cannot create key-value bucket {bucket}: {source}")]
    Bucket {
        bucket: &'static str,
        source: jetstream::context::CreateKeyValueError,
    },
}

/// A connection plus its JetStream context.
#[derive(Clone)]
pub struct Nats {
    pub client: Client,
    pub js: jetstream::Context,
}

/// Connects with a client name. Components retry the first connection (a broker may start after
/// them in Kubernetes); the CLI fails fast.
pub async fn connect(url: &str, name: &str, retry_initial: bool) -> Result<Nats, SetupError> {
    let mut options = ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(10)));
    if retry_initial {
        options = options.retry_on_initial_connect();
    }
    // async-nats ignores credentials in the URL: hand them over explicitly.
    let (address, credentials) = split_credentials(url);
    options = match credentials {
        Some((user, Some(password))) => options.user_and_password(user, password),
        Some((token, None)) => options.token(token),
        None => options,
    };
    let client = options
        .connect(address.as_str())
        .await
        .map_err(|source| SetupError::Connect {
            url: redact(url),
            source,
        })?;
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        // Many publishes in flight at once is how the hot path reaches broker throughput;
        // waiting (not failing) when the window is full is the back-pressure.
        .max_ack_inflight(8192)
        .backpressure_on_inflight(true)
        .build(client.clone());
    Ok(Nats { client, js })
}

/// Splits `nats://user:password@host:port` (or `nats://token@host:port`) into the address
/// without credentials and the credentials: (user, Some(password)) or (token, None).
fn split_credentials(url: &str) -> (String, Option<(String, Option<String>)>) {
    let (Some((scheme, _)), Some(at)) = (url.split_once("://"), url.rfind('@')) else {
        return (url.to_string(), None);
    };
    let userinfo = &url[scheme.len() + 3..at];
    let host = &url[at + 1..];
    let credentials = match userinfo.split_once(':') {
        Some((user, password)) => (user.to_string(), Some(password.to_string())),
        None => (userinfo.to_string(), None),
    };
    (format!("{scheme}://{host}"), Some(credentials))
}

/// `url` without the credentials it may carry (`nats://user:password@host`), for messages.
pub fn redact(url: &str) -> String {
    match split_credentials(url) {
        (address, Some(_)) => address.replacen("://", "://***@", 1),
        (address, None) => address,
    }
}

pub fn events_stream_config(s: &StreamSettings) -> stream::Config {
    stream::Config {
        name: EVENTS_STREAM.into(),
        description: Some("Grizzly event log: the system of record".into()),
        subjects: vec![EVENTS_ALL.into()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::New,
        max_bytes: s.events_max_bytes,
        max_age: s.events_max_age,
        duplicate_window: s.duplicate_window,
        num_replicas: s.replicas,
        ..Default::default()
    }
}

pub fn tasks_stream_config(s: &StreamSettings) -> stream::Config {
    stream::Config {
        name: TASKS_STREAM.into(),
        description: Some("Grizzly routed tasks, one per (event, handler)".into()),
        subjects: vec![TASKS_ALL.into()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::WorkQueue,
        discard: stream::DiscardPolicy::New,
        max_bytes: s.tasks_max_bytes,
        duplicate_window: s.duplicate_window,
        num_replicas: s.replicas,
        ..Default::default()
    }
}

pub fn dlq_stream_config(s: &StreamSettings) -> stream::Config {
    stream::Config {
        name: DLQ_STREAM.into(),
        description: Some("Grizzly dead letters".into()),
        subjects: vec![DLQ_ALL.into()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::New,
        max_bytes: s.dlq_max_bytes,
        duplicate_window: s.duplicate_window,
        num_replicas: s.replicas,
        ..Default::default()
    }
}

/// Creates or updates every stream. Safe to run from every component at every start.
pub async fn ensure_streams(js: &jetstream::Context, s: &StreamSettings) -> Result<(), SetupError> {
    for (name, config) in [
        (EVENTS_STREAM, events_stream_config(s)),
        (TASKS_STREAM, tasks_stream_config(s)),
        (DLQ_STREAM, dlq_stream_config(s)),
    ] {
        js.create_or_update_stream(config)
            .await
            .map_err(|source| SetupError::Stream {
                stream: name,
                source,
            })?;
    }
    Ok(())
}

/// The partition-lease bucket: an entry not renewed within `ttl` expires, freeing the partition.
pub async fn ensure_lease_bucket(
    js: &jetstream::Context,
    ttl: Duration,
    replicas: usize,
) -> Result<kv::Store, SetupError> {
    ensure_bucket(js, LEASES_BUCKET, "Grizzly partition leases", ttl, replicas).await
}

/// A key-value bucket of Grizzly's: one value per key, on disk, `max_age` (zero: no expiry);
/// created, or brought to this configuration.
pub async fn ensure_bucket(
    js: &jetstream::Context,
    bucket: &'static str,
    description: &str,
    max_age: Duration,
    replicas: usize,
) -> Result<kv::Store, SetupError> {
    js.create_or_update_key_value(kv::Config {
        bucket: bucket.into(),
        description: description.into(),
        history: 1,
        max_age,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|source| SetupError::Bucket { bucket, source })
}

/// Until when a partition lease is surely still ours: the owner moves it on with every confirmed
/// renewal ([`LeaseFence::margin`] after it *asked*). Past it, a partition runner pulls and
/// starts nothing, because another replica may own the partition by now. A replica whose lease
/// rounds stalled (SIGSTOP, a broker restart) otherwise kept pulling from the consumer its
/// successor had just recreated under the same name, took some of its messages, and the
/// successor handled later messages of the same aggregate or instance first.
#[derive(Clone)]
pub struct LeaseFence(Arc<std::sync::Mutex<tokio::time::Instant>>);

impl LeaseFence {
    /// How long after asking for a lease (or its renewal) it is surely still ours: the bucket
    /// expires it `lease_ttl` after the write; a third of that is left as margin.
    pub fn margin(lease_ttl: Duration) -> Duration {
        lease_ttl * 2 / 3
    }

    pub fn new(until: tokio::time::Instant) -> Self {
        Self(Arc::new(std::sync::Mutex::new(until)))
    }

    pub fn extend(&self, until: tokio::time::Instant) {
        *self.0.lock().expect("fence lock") = until;
    }

    pub fn until(&self) -> tokio::time::Instant {
        *self.0.lock().expect("fence lock")
    }

    pub fn held(&self) -> bool {
        tokio::time::Instant::now() < self.until()
    }

    /// Resolves once the fence holds again (a renewal moved it on), looking every 50 ms: a
    /// fenced runner waits on it before it pulls again.
    pub async fn renewed(&self) {
        while !self.held() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Resolves once the fence has lapsed (at once if it has): a runner selects on it to close
    /// its pull the moment the lease is no longer surely its own.
    pub async fn lapsed(&self) {
        loop {
            let until = self.until();
            if tokio::time::Instant::now() >= until {
                return;
            }
            // Renewed meanwhile? Look again at the (possibly later) deadline.
            tokio::time::sleep_until(until).await;
        }
    }
}

/// The listeners' routing cursors: `cursor.<partition>` → the stream sequence from which that
/// partition of `EVENTS` is still to be routed (everything of it below is routed and confirmed).
/// Never expires: a partition nobody routes for a while resumes where it stopped.
pub async fn ensure_cursor_bucket(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<kv::Store, SetupError> {
    ensure_bucket(
        js,
        CURSORS_BUCKET,
        "Grizzly listener cursors per partition of the log",
        Duration::ZERO,
        replicas,
    )
    .await
}

/// The workers' record of which tasks of a long-open bundle are done
/// (`<handler>.<partition>.<TASKS sequence>`): a worker taking the partition over after a crash
/// starts only the others (see ARCHITECTURE.md, *Bundles*).
pub async fn ensure_done_bucket(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<kv::Store, SetupError> {
    ensure_bucket(
        js,
        DONE_BUCKET,
        "Grizzly: done tasks of open bundles",
        DONE_TTL,
        replicas,
    )
    .await
}

/// The listeners' cursors by partition (see [`ensure_cursor_bucket`]); empty before any
/// listener ran.
pub async fn listener_cursors(
    js: &jetstream::Context,
) -> Result<std::collections::BTreeMap<u16, u64>, async_nats::Error> {
    cursors_in(js, CURSORS_BUCKET).await
}

/// The key of a partition's cursor, in the listeners' bucket and in the coordinators' alike.
pub fn cursor_key(partition: u16) -> String {
    format!("cursor.{partition}")
}

/// The `cursor.<partition>` entries of `bucket` (the listeners' or the coordinators'); empty
/// when the bucket does not exist.
pub async fn cursors_in(
    js: &jetstream::Context,
    bucket: &str,
) -> Result<std::collections::BTreeMap<u16, u64>, async_nats::Error> {
    Ok(entries(js, bucket, "cursor.")
        .await?
        .into_iter()
        .filter_map(|(key, value)| {
            let partition = key.strip_prefix("cursor.")?.parse().ok()?;
            let seq = std::str::from_utf8(&value).ok()?.parse().ok()?;
            Some((partition, seq))
        })
        .collect())
}

/// Refuses a `partitions` setting below the deployment's: one of `buckets` (cursor buckets)
/// has a cursor for a partition at or beyond it. A tool run with too few partitions would
/// leave the partitions beyond them as they were and write tasks where no worker reads.
pub async fn check_partitions(
    js: &jetstream::Context,
    buckets: &[&str],
    partitions: u16,
) -> Result<(), String> {
    for bucket in buckets {
        let existing = cursors_in(js, bucket).await.map_err(|e| e.to_string())?;
        // The highest: it tells the deployment's count.
        if let Some(p) = existing.keys().next_back().filter(|p| **p >= partitions) {
            return Err(format!(
                "{bucket} has a cursor for partition {p}, but `partitions` is {partitions}: set it to the deployment's (GRIZZLY_PARTITIONS)"
            ));
        }
    }
    Ok(())
}

/// The live leases whose key starts with `prefix`: key → holder.
pub async fn lease_holders(
    js: &jetstream::Context,
    prefix: &str,
) -> Result<std::collections::BTreeMap<String, String>, async_nats::Error> {
    Ok(entries(js, LEASES_BUCKET, prefix)
        .await?
        .into_iter()
        .map(|(key, holder)| (key, String::from_utf8_lossy(&holder).into_owned()))
        .collect())
}

/// The entries of `bucket` whose key starts with `prefix` (key → value); empty when the bucket
/// does not exist. One read per key: for the small buckets of leases and cursors.
pub async fn entries(
    js: &jetstream::Context,
    bucket: &str,
    prefix: &str,
) -> Result<std::collections::BTreeMap<String, bytes::Bytes>, async_nats::Error> {
    use futures::StreamExt as _;
    let mut found = std::collections::BTreeMap::new();
    let Ok(kv) = js.get_key_value(bucket).await else {
        return Ok(found);
    };
    let mut keys = kv.keys().await?;
    while let Some(key) = keys.next().await {
        let key = key?;
        if key.starts_with(prefix)
            && let Some(value) = kv.get(&key).await?
        {
            found.insert(key, value);
        }
    }
    Ok(found)
}

/// The pauses between attempts of a broker write that is retried until it succeeds: from 50 ms,
/// doubling with jitter up to `max`, never ending.
pub fn retry_delays(max: Duration) -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Publishes and waits until the broker confirms the write, re-sending with back-off until it
/// does. Every Grizzly write carries a `Nats-Msg-Id`, so a re-send stores at most one copy.
/// Callers ack their input only after this returns: a full or unreachable stream delays work,
/// it never loses it. `first` is an already-issued publish (pipelined callers).
pub async fn publish_confirmed(
    js: &jetstream::Context,
    subject: &str,
    publish: jetstream::message::PublishMessage,
    first: Option<jetstream::context::PublishAckFuture>,
) -> jetstream::publish::PublishAck {
    let mut delays = retry_delays(Duration::from_secs(5));
    let mut pending = first;
    loop {
        if pending.is_none() {
            match js.send_publish(subject.to_string(), publish.clone()).await {
                Ok(future) => pending = Some(future),
                Err(e) => tracing::warn!(error = %e, subject, "publish failed; retrying"),
            }
        }
        if let Some(future) = pending.take() {
            match future.await {
                Ok(ack) => return ack,
                Err(e) => tracing::warn!(error = %e, subject, "publish not confirmed; retrying"),
            }
        }
        tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(5))).await;
    }
}

/// Issues every publish, then waits until the broker confirmed each, in order, re-sending as
/// [`publish_confirmed`] does: one round trip for the lot instead of one per message. On one
/// connection the broker stores them in the order they were issued.
pub async fn publish_all_confirmed(
    js: &jetstream::Context,
    publishes: Vec<(String, jetstream::message::PublishMessage)>,
) -> Vec<jetstream::publish::PublishAck> {
    let mut issued = Vec::with_capacity(publishes.len());
    for (subject, publish) in publishes {
        let ack = js.send_publish(subject.clone(), publish.clone()).await.ok();
        issued.push((subject, publish, ack));
    }
    let mut acks = Vec::with_capacity(issued.len());
    for (subject, publish, ack) in issued {
        acks.push(publish_confirmed(js, &subject, publish, ack).await);
    }
    acks
}

#[cfg(test)]
mod redact_tests {
    #[test]
    fn credentials_never_reach_a_message() {
        assert_eq!(
            super::redact("nats://grizzly:s3cret@nats:4222"),
            "nats://***@nats:4222"
        );
        assert_eq!(super::redact("tls://tok@n1:4222"), "tls://***@n1:4222");
        assert_eq!(
            super::redact("nats://127.0.0.1:4222"),
            "nats://127.0.0.1:4222"
        );
        assert_eq!(
            super::split_credentials("nats://grizzly:s3cret@nats:4222"),
            (
                "nats://nats:4222".to_string(),
                Some(("grizzly".to_string(), Some("s3cret".to_string())))
            )
        );
        assert_eq!(
            super::split_credentials("tls://tok@n1:4222"),
            ("tls://n1:4222".to_string(), Some(("tok".to_string(), None)))
        );
        assert_eq!(
            super::split_credentials("nats://127.0.0.1:4222"),
            ("nats://127.0.0.1:4222".to_string(), None)
        );
    }
}
