//! `grizzly bench`: measured figures, each beside a baseline measured in the same run.
//!
//! - `handlers`: event published → outcome event, for cold `claude -p` per event (`exec`) and the
//!   warm Claude Code pool at sizes 1, 2, 4, 8, against the fake Messages API.
//! - `throughput`: the full path (publish → listener → worker → outcome) with a no-op `process`
//!   handler versus raw JetStream (publish + pull consume + ack, and a consume → publish → ack
//!   relay) on the same server, with fsync on every write and with the broker default.
//!
//! Every bench starts its own temporary `nats-server`, so it never touches a running system.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use grizzly_shared::Settings;
use grizzly_shared::handler::load_handlers;
use grizzly_shared::nats::{self, EVENTS_STREAM, Nats};
use grizzly_shared::nats_server::{NatsServer, NatsServerOptions};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Warm Claude Code pool vs cold spawn (fake Messages API).
    Handlers {
        /// Events per warm pool size.
        #[arg(long, default_value_t = 40)]
        events: usize,
        /// Events for the cold baseline (each spawns Claude Code).
        #[arg(long, default_value_t = 8)]
        cold_events: usize,
        /// Write the figures as JSON here too.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Full path vs raw JetStream, fsync-always and broker-default.
    Throughput {
        #[arg(long, default_value_t = 20_000)]
        events: usize,
        /// Only this broker mode (`always` or `default`); both when absent.
        #[arg(long)]
        fsync: Option<String>,
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

pub async fn run(settings: &Settings, cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    let (report, path) = match cmd {
        BenchCommand::Handlers {
            events,
            cold_events,
            json,
        } => (handlers(settings, events, cold_events).await?, json),
        BenchCommand::Throughput {
            events,
            fsync,
            json,
        } => (throughput(events, fsync.as_deref()).await?, json),
    };
    if let Some(path) = path {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("figures written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// A temporary broker plus a listener and worker over the handlers in `dir`.
struct Bench {
    _server: NatsServer,
    nats: Nats,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Bench {
    async fn start(
        store: &Path,
        sync_always: bool,
        handlers_dir: &Path,
        tune: impl FnOnce(&mut Settings),
    ) -> anyhow::Result<Self> {
        let mut options = NatsServerOptions::new(store);
        options.sync_always = sync_always;
        let server = NatsServer::start(options).await?;
        let mut settings = Settings {
            nats_url: server.url(),
            handlers_dir: handlers_dir.to_path_buf(),
            ..Settings::default()
        };
        settings.worker.lease_ttl = Duration::from_secs(2);
        tune(&mut settings);
        let handlers = load_handlers(&settings.handlers_dir)?;
        let nats = nats::connect(&settings.nats_url, "grizzly-bench", false).await?;
        nats::ensure_streams(&nats.js, &settings.streams).await?;
        let stop = CancellationToken::new();
        let listener = grizzly_listener::Listener::new(
            nats::connect(&settings.nats_url, "bench-listener", false).await?,
            settings.clone(),
            &handlers,
        )?;
        let worker = grizzly_worker::Worker::new(
            nats::connect(&settings.nats_url, "bench-worker", false).await?,
            settings.clone(),
            &handlers,
        )?;
        let tasks = vec![
            tokio::spawn(listener.run(stop.clone())),
            tokio::spawn(worker.run(stop.clone())),
        ];
        Ok(Self {
            _server: server,
            nats,
            stop,
            tasks,
        })
    }

    async fn shutdown(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// Publishes `n` events on `subject_for(i)`, keeping at most `in_flight` without an outcome
    /// (closed loop: `in_flight = n` is a burst), waits for the `n` outcomes of `handler`, and
    /// measures each event's published → outcome latency from the broker's timestamps.
    async fn run_batch(
        &self,
        handler: &str,
        n: usize,
        in_flight: usize,
        subject_for: impl Fn(usize) -> String,
        deadline: Duration,
    ) -> anyhow::Result<Measured> {
        let stream = self.nats.js.get_stream(EVENTS_STREAM).await?;
        let start_seq = stream.get_info().await?.state.last_sequence + 1;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: "events.>".into(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start_seq,
                },
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        let publish = |i: usize| {
            let msg = PublishMessage::build()
                .payload(json!({"i": i}).to_string().into())
                .message_id(format!("bench-{handler}-{i}-{start_seq}"));
            (subject_for(i), msg)
        };
        let first_wave = in_flight.min(n);
        publish_all(&self.nats.js, (0..first_wave).map(&publish)).await?;
        let mut sent = first_wave;
        let mut published: HashMap<String, time::OffsetDateTime> = HashMap::new();
        let mut latencies = Vec::with_capacity(n);
        let mut first: Option<time::OffsetDateTime> = None;
        let mut last: Option<time::OffsetDateTime> = None;
        let mut pending_outcomes: Vec<(String, time::OffsetDateTime)> = Vec::new();
        let until = tokio::time::Instant::now() + deadline;
        while latencies.len() < n {
            let msg = tokio::time::timeout_at(until, messages.next())
                .await
                .with_context(|| {
                    format!(
                        "{handler}: only {} of {n} outcomes within {deadline:?}",
                        latencies.len()
                    )
                })?
                .context("log ended")??;
            let info = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?;
            let at = info.published;
            let body: Value = serde_json::from_slice(&msg.payload).unwrap_or_default();
            if msg.subject.ends_with(".handler_succeeded") && body["data"]["handler"] == handler {
                pending_outcomes.push((
                    body["data"]["event_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    at,
                ));
                last = Some(at);
                if sent < n {
                    publish_all(&self.nats.js, std::iter::once(publish(sent))).await?;
                    sent += 1;
                }
            } else if msg.subject.ends_with(".handler_failed") && body["data"]["handler"] == handler
            {
                anyhow::bail!(
                    "{handler} failed during the bench: {}",
                    body["data"]["error"]
                );
            } else if let Some(id) = msg.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")) {
                published.insert(id.to_string(), at);
                first = Some(first.map_or(at, |f| f.min(at)));
            }
            pending_outcomes.retain(|(cause, done)| match published.get(cause) {
                Some(p) => {
                    latencies.push((*done - *p).as_seconds_f64() * 1000.0);
                    false
                }
                None => true,
            });
        }
        let span = match (first, last) {
            (Some(f), Some(l)) => (l - f).as_seconds_f64(),
            _ => 0.0,
        };
        Ok(Measured::new(latencies, span))
    }
}

#[derive(Debug, Clone, serde::Serialize)]
struct Measured {
    events: usize,
    p50_ms: f64,
    p99_ms: f64,
    events_per_s: f64,
}

impl Measured {
    fn new(mut latencies_ms: Vec<f64>, span_s: f64) -> Self {
        latencies_ms.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| {
            latencies_ms
                .get(((latencies_ms.len() as f64 * p).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or(0.0)
        };
        Self {
            events: latencies_ms.len(),
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            events_per_s: latencies_ms.len() as f64 / span_s.max(1e-9),
        }
    }
}

/// Publishes as fast as the broker confirms, with a bounded window of unconfirmed publishes
/// (each holds one of the context's in-flight slots until it is awaited).
async fn publish_all(
    js: &jetstream::Context,
    publishes: impl Iterator<Item = (String, PublishMessage)>,
) -> anyhow::Result<()> {
    let mut window = std::collections::VecDeque::new();
    for (subject, publish) in publishes {
        if window.len() >= 2048 {
            let oldest: jetstream::context::PublishAckFuture =
                window.pop_front().expect("non-empty");
            oldest.await?;
        }
        window.push_back(js.send_publish(subject, publish).await?);
    }
    for ack in window {
        ack.await?;
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

async fn handlers(settings: &Settings, events: usize, cold_events: usize) -> anyhow::Result<Value> {
    let claude = grizzly_shared::nats_server::find_in_tools_dir("claude")
        .or_else(|| grizzly_shared::nats_server::find_on_path("claude"))
        .context("Claude Code is required: run scripts/install-tools.sh")?;
    let fake = grizzly_devkit::FakeMessagesApi::start(Default::default()).await?;
    let dir = tempfile::tempdir()?;
    let handlers_dir = dir.path().join("handlers");
    std::fs::create_dir_all(&handlers_dir)?;
    let mut env_yaml = String::from("env:\n");
    for (k, v) in fake.claude_env() {
        env_yaml.push_str(&format!("  {k}: \"{v}\"\n"));
    }
    let cold_home = dir.path().join("cold-home");
    std::fs::create_dir_all(&cold_home)?;
    // Cold baseline: `claude -p` per event, the prompt (the event JSON) on stdin.
    write(
        &handlers_dir.join("cold.yaml"),
        &format!(
            "name: cold\non: [\"events.bench.*.cold\"]\nkind: exec\nconcurrency: 4\ntimeout: 60s\ncommand: [{:?}, \"-p\", \"--bare\", \"--setting-sources\", \"\", \"--tools\", \"\", \"--no-session-persistence\", \"--system-prompt\", \"You are a benchmark agent.\", \"--output-format\", \"text\"]\n{env_yaml}  HOME: {:?}\n",
            claude.display().to_string(),
            cold_home.display().to_string()
        ),
    )?;
    let sizes = [1usize, 2, 4, 8];
    for size in sizes {
        write(
            &handlers_dir.join(format!("warm{size}.yaml")),
            &format!(
                "name: warm{size}\non: [\"events.bench.*.warm{size}\"]\nkind: claude\ntemplate: \"Summarise: {{{{ data }}}}\"\npool: {{ min: {size}, max: {size} }}\nconcurrency: {size}\ntimeout: 60s\n{env_yaml}"
            ),
        )?;
    }
    let mut settings = settings.clone();
    settings.worker.claude_bin = claude.display().to_string();
    if settings.worker.mcp_bin.is_none() {
        settings.worker.mcp_bin = Some(std::env::current_exe()?.display().to_string());
    }
    let bench = Bench::start(&dir.path().join("store"), true, &handlers_dir, |s| {
        s.worker.claude_bin = settings.worker.claude_bin.clone();
        s.worker.mcp_bin = settings.worker.mcp_bin.clone();
    })
    .await?;

    eprintln!("cold: {cold_events} events, `claude -p` per event, concurrency 4 ...");
    let cold = bench
        .run_batch(
            "cold",
            cold_events,
            4,
            |i| format!("events.bench.c{i}.cold"),
            Duration::from_secs(600),
        )
        .await?;
    let mut rows = vec![("cold exec, 4 in flight".to_string(), cold.clone())];
    let mut warm_by_size = Vec::new();
    for size in sizes {
        // Warm-up: every instance serves one turn before the measured run.
        bench
            .run_batch(
                &format!("warm{size}"),
                size * 2,
                size * 2,
                |i| format!("events.bench.w{i}.warm{size}"),
                Duration::from_secs(300),
            )
            .await?;
        eprintln!("warm pool of {size}: {events} events, {size} in flight ...");
        let m = bench
            .run_batch(
                &format!("warm{size}"),
                events,
                size,
                |i| format!("events.bench.a{i}.warm{size}"),
                Duration::from_secs(600),
            )
            .await?;
        rows.push((format!("warm pool of {size}, {size} in flight"), m.clone()));
        warm_by_size.push((size, m));
    }
    bench.shutdown().await;

    println!(
        "\nhandler invocation, event published → outcome event (fake Messages API, fsync always)"
    );
    println!(
        "{:<34} {:>8} {:>10} {:>10} {:>10}",
        "path", "events", "p50 ms", "p99 ms", "events/s"
    );
    for (name, m) in &rows {
        println!(
            "{name:<34} {:>8} {:>10.1} {:>10.1} {:>10.1}",
            m.events, m.p50_ms, m.p99_ms, m.events_per_s
        );
    }
    let warm4 = &warm_by_size
        .iter()
        .find(|(s, _)| *s == 4)
        .expect("size 4 measured")
        .1;
    println!(
        "\nwarm pool of 4 vs cold, both 4 in flight: throughput ×{:.1} (target ≥ 10), p50 latency ÷{:.1}; warm p50 {:.1} ms (target < 100, stretch < 50)",
        warm4.events_per_s / cold.events_per_s.max(1e-9),
        cold.p50_ms / warm4.p50_ms.max(1e-9),
        warm4.p50_ms
    );
    Ok(json!({
        "bench": "handlers",
        "cold": cold,
        "warm": warm_by_size.iter().map(|(s, m)| json!({"pool": s, "figures": m})).collect::<Vec<_>>(),
        "warm4_vs_cold_throughput": warm4.events_per_s / cold.events_per_s.max(1e-9),
        "warm4_p50_ms": warm4.p50_ms,
    }))
}

/// Raw JetStream on the same server: publish n (pipelined) while a pull consumer acks them;
/// and a relay (consume → publish to a second stream → ack).
async fn raw_baseline(js: &jetstream::Context, n: usize) -> anyhow::Result<(Measured, Measured)> {
    for name in ["BENCH_IN", "BENCH_OUT"] {
        let _ = js.delete_stream(name).await;
        js.create_stream(stream::Config {
            name: name.into(),
            subjects: vec![format!("{}.>", name.to_lowercase())],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    }
    let consume = |stream_name: &'static str, relay: bool| {
        let js = js.clone();
        async move {
            let consumer = js
                .get_stream(stream_name)
                .await?
                .create_consumer(pull::Config {
                    durable_name: Some(format!("bench-{}", relay)),
                    ack_policy: AckPolicy::Explicit,
                    max_ack_pending: 20_000,
                    ..Default::default()
                })
                .await?;
            let mut messages = consumer
                .stream()
                .max_messages_per_batch(512)
                .messages()
                .await?;
            let mut latencies = Vec::with_capacity(n);
            let mut acks = Vec::new();
            while latencies.len() < n {
                let msg = messages.next().await.context("ended")??;
                let info = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?;
                latencies.push(
                    (time::OffsetDateTime::now_utc() - info.published).as_seconds_f64() * 1000.0,
                );
                if relay {
                    acks.push(
                        js.publish(
                            format!("bench_out.{}", latencies.len()),
                            msg.payload.clone(),
                        )
                        .await?,
                    );
                    if acks.len() >= 256 {
                        for a in acks.drain(..) {
                            a.await?;
                        }
                    }
                }
                msg.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            for a in acks {
                a.await?;
            }
            anyhow::Ok(latencies)
        }
    };
    let payload = bytes::Bytes::from(vec![b'x'; 256]);
    let mut figures = Vec::new();
    for relay in [false, true] {
        let started = Instant::now();
        let consumer = tokio::spawn(consume("BENCH_IN", relay));
        publish_all(
            js,
            (0..n).map(|i| {
                (
                    format!("bench_in.{}", i % 1000),
                    PublishMessage::build().payload(payload.clone()),
                )
            }),
        )
        .await?;
        let latencies = consumer.await??;
        figures.push(Measured::new(latencies, started.elapsed().as_secs_f64()));
        js.get_stream("BENCH_IN").await?.purge().await?;
        let _ = js
            .get_stream("BENCH_IN")
            .await?
            .delete_consumer(&format!("bench-{relay}"))
            .await;
    }
    Ok((figures[0].clone(), figures[1].clone()))
}

async fn throughput(events: usize, only: Option<&str>) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let handlers_dir = dir.path().join("handlers");
    std::fs::create_dir_all(&handlers_dir)?;
    // The no-op handler: `sed -u` answers every request line with the terminator at once, so
    // the figure is Grizzly's path, not an interpreter's.
    write(
        &handlers_dir.join("noop.yaml"),
        "name: noop\non: [\"events.bench.*.noop\"]\nkind: process\ncommand: [\"sed\", \"-u\", \"s/.*/{\\\"done\\\":true}/\"]\nconcurrency: 64\npool: { min: 4, max: 8 }\n",
    )?;
    let mut report = Vec::new();
    println!(
        "full path (publish → listener → worker → outcome) vs raw JetStream, {events} events of ~256 B"
    );
    println!(
        "{:<36} {:>10} {:>10} {:>10}",
        "", "events/s", "p50 ms", "p99 ms"
    );
    let modes: Vec<bool> = match only {
        Some("always") => vec![true],
        Some("default") => vec![false],
        Some(other) => anyhow::bail!("--fsync takes `always` or `default`, not `{other}`"),
        None => vec![true, false],
    };
    for sync_always in modes {
        let mode = if sync_always {
            "fsync always"
        } else {
            "fsync default"
        };
        let bench = Bench::start(
            &dir.path().join(format!("store-{sync_always}")),
            sync_always,
            &handlers_dir,
            |s| {
                s.partitions = 32;
            },
        )
        .await?;
        let (raw, relay) = raw_baseline(&bench.nats.js, events).await?;
        // Warm-up, then the measured run.
        bench
            .run_batch(
                "noop",
                500,
                500,
                |i| format!("events.bench.w{}.noop", i % 100),
                Duration::from_secs(120),
            )
            .await?;
        let full = bench
            .run_batch(
                "noop",
                events,
                events,
                |i| format!("events.bench.a{}.noop", i % 1000),
                Duration::from_secs(600),
            )
            .await?;
        bench.shutdown().await;
        for (name, m) in [
            ("raw publish + consume + ack", &raw),
            ("raw relay (consume→publish→ack)", &relay),
            ("grizzly full path", &full),
        ] {
            println!(
                "{:<36} {:>10.0} {:>10.2} {:>10.2}   [{mode}]",
                name, m.events_per_s, m.p50_ms, m.p99_ms
            );
        }
        println!(
            "  [{mode}] full/raw = {:.2}, full/relay = {:.2}, full p50 / raw hop p50 = {:.1}",
            full.events_per_s / raw.events_per_s.max(1e-9),
            full.events_per_s / relay.events_per_s.max(1e-9),
            full.p50_ms / raw.p50_ms.max(1e-9)
        );
        report.push(
            json!({"mode": mode, "raw": raw, "relay": relay, "full": full,
            "full_over_raw": full.events_per_s / raw.events_per_s.max(1e-9),
            "full_over_relay": full.events_per_s / relay.events_per_s.max(1e-9)}),
        );
    }
    Ok(json!({"bench": "throughput", "events": events, "modes": report}))
}
