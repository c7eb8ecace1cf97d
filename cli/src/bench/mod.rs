//! `grizzly bench`: measured figures, each beside a baseline measured in the same run.
//!
//! - `all`: everything below in one run, then one table with each figure beside its target
//!   (PASS/MISS) and, with `--json`, every figure plus cores, date and git commit.
//! - `handlers`: event published → outcome event, for cold `claude -p` per event (`exec`) and the
//!   warm Claude Code pool at sizes 1, 2, 4, 8, against the fake Messages API.
//! - `throughput`: the full path (publish → listener → worker → outcome) with a no-op `process`
//!   handler versus raw JetStream (publish + pull consume + ack, and a consume → publish → ack
//!   relay) on the same server, with fsync on every write and with the broker default.
//! - `success`: a `process` handler failing 1% of first attempts at random, retries on: the
//!   share of events that succeed in the end and on the first attempt.
//! - `workflows`: sequential workflows of three no-op steps against the same handler called by
//!   plain events: what the coordinator adds per step.
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

use crate::thread::{Component, spawn_component};
use crate::usage::{self, CpuPerEvent, ProcessMemory};

mod workflows;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Workflows of three no-op steps vs the same handler called by plain events.
    Workflows {
        /// Workflow instances in the burst (the plain baseline runs three events per instance).
        #[arg(long, default_value_t = 2_000)]
        instances: usize,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Every bench in one run; one table with each figure beside its target (PASS/MISS).
    All {
        /// Write every figure (with cores, date and git commit) as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Smaller runs (about a minute): noisier figures, same keys.
        #[arg(long)]
        quick: bool,
    },
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
    /// Success rate of a `process` handler failing 1% of first attempts, retries on.
    Success {
        #[arg(long, default_value_t = 2_000)]
        events: usize,
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

pub async fn run(settings: &Settings, cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    let (report, path) = match cmd {
        BenchCommand::All { json, quick } => (all(settings, quick).await?, json),
        BenchCommand::Handlers {
            events,
            cold_events,
            json,
        } => (
            handlers(settings, events, cold_events, MODEL_TURNS)
                .await?
                .json(),
            json,
        ),
        BenchCommand::Throughput {
            events,
            fsync,
            json,
        } => {
            let modes = match fsync.as_deref() {
                Some("always") => vec![true],
                Some("default") => vec![false],
                Some(other) => anyhow::bail!("--fsync takes `always` or `default`, not `{other}`"),
                None => vec![true, false],
            };
            let figures = throughput(events, &modes).await?;
            (throughput_json(events, &figures), json)
        }
        BenchCommand::Success { events, json } => (success(events).await?.json(), json),
        BenchCommand::Workflows { instances, json } => {
            (workflows::workflows(instances).await?.json(), json)
        }
    };
    if let Some(path) = path {
        write(&path, &serde_json::to_string_pretty(&report)?)?;
        eprintln!("figures written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// A temporary broker plus a listener and worker over the handlers in `dir` (and a coordinator,
/// for [`workflows`]).
struct Bench {
    server: NatsServer,
    nats: Nats,
    stop: CancellationToken,
    tasks: Vec<futures::future::BoxFuture<'static, anyhow::Result<()>>>,
}

impl Bench {
    async fn start(
        store: &Path,
        sync_always: bool,
        handlers_dir: &Path,
        tune: impl FnOnce(&mut Settings),
    ) -> anyhow::Result<Self> {
        Self::start_with(store, sync_always, handlers_dir, None, tune).await
    }

    /// [`Bench::start`], plus a coordinator running the workflows in `workflows_dir`, on the
    /// bench's runtime as in `grizzly dev`.
    async fn start_with(
        store: &Path,
        sync_always: bool,
        handlers_dir: &Path,
        workflows_dir: Option<&Path>,
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
        let start = |component, client| {
            let (settings, handlers, stop) = (settings.clone(), handlers.clone(), stop.clone());
            spawn_component(component, client, settings, handlers, stop, |_, _| {})
        };
        let listener = start(Component::Listener, "bench-listener").await?;
        let worker = start(Component::Worker, "bench-worker").await?;
        let mut tasks = vec![listener, worker];
        if let Some(dir) = workflows_dir {
            let settings = Settings {
                workflows_dir: dir.to_path_buf(),
                ..settings.clone()
            };
            let nats = nats::connect(&settings.nats_url, "bench-coordinator", false).await?;
            let run = tokio::spawn(
                grizzly_coordinator::Coordinator::new(nats, settings).run(stop.clone()),
            );
            tasks.push(Box::pin(async move { run.await? }));
        }
        Ok(Self {
            server,
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

    /// The sequence the next event will get, and a reader of the log's `subjects` from there on.
    ///
    /// A task of its own drains the reader from the start: left unread while the bench published
    /// its burst (on the same connection), it cut the whole system's rate to a third (1.8k/s
    /// against 5.9k/s with the reader drained alongside, same run conditions) — the bench must
    /// not be the slow consumer it measures.
    async fn read_log_from_next(&self, subjects: &[&str]) -> anyhow::Result<(u64, LogReader)> {
        let start_seq = self.next_seq().await?;
        Ok((start_seq, self.read_log_from(start_seq, subjects).await?))
    }

    /// The sequence the next event will get.
    async fn next_seq(&self) -> anyhow::Result<u64> {
        let stream = self.nats.js.get_stream(EVENTS_STREAM).await?;
        Ok(stream.get_info().await?.state.last_sequence + 1)
    }

    /// A reader of the log's `subjects` from `start_seq` on (see [`Bench::read_log_from_next`]),
    /// in log order per subject.
    ///
    /// One consumer per subject, each with that one filter: a consumer with several filters
    /// costs the broker a search of the block's subject index for every message it looks for
    /// (`firstMatchingMulti`), which grows with the subjects in the log — reading back 40,000
    /// outcomes took the broker ≈ 8 s of CPU — and one with none had every event the bench
    /// published delivered back to it, a third delivery beside the listener's in the middle of
    /// the dispatch being measured.
    async fn read_log_from(&self, start_seq: u64, subjects: &[&str]) -> anyhow::Result<LogReader> {
        let stream = self.nats.js.get_stream(EVENTS_STREAM).await?;
        let (tx, rx) = futures::channel::mpsc::unbounded();
        for subject in subjects {
            let consumer = stream
                .create_consumer(pull::OrderedConfig {
                    filter_subject: subject.to_string(),
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: start_seq,
                    },
                    ..Default::default()
                })
                .await?;
            let mut messages = consumer.messages().await?;
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(msg) = messages.next().await {
                    if tx.unbounded_send(msg.map_err(anyhow::Error::from)).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(rx)
    }

    /// Waits until the log holds `n` messages on `subjects` from `start_seq` on, asking the
    /// broker for the count (an unpulled consumer's pending) rather than reading them.
    async fn wait_count(
        &self,
        start_seq: u64,
        subjects: &[&str],
        n: usize,
        deadline: Duration,
    ) -> anyhow::Result<()> {
        let stream = self.nats.js.get_stream(EVENTS_STREAM).await?;
        let mut counter = stream
            .create_consumer(pull::Config {
                filter_subjects: subjects.iter().map(|s| s.to_string()).collect(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start_seq,
                },
                ack_policy: AckPolicy::None,
                // Never pulled, only asked for its count: it must outlive the wait.
                inactive_threshold: deadline + Duration::from_secs(60),
                ..Default::default()
            })
            .await?;
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let pending = counter.info().await?.num_pending;
            if pending >= n as u64 {
                break;
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < until,
                "only {pending} of {n} outcomes within {deadline:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let name = counter.cached_info().name.clone();
        let _ = stream.delete_consumer(&name).await;
        Ok(())
    }

    /// Publishes `n` events on `subject_for(i)`, keeping at most `in_flight` without an outcome
    /// (closed loop: `in_flight = n` is a burst), waits for the `n` outcomes of `handler`, and
    /// measures each event's published → outcome latency.
    async fn run_batch(
        &self,
        handler: &str,
        n: usize,
        in_flight: usize,
        subject_for: impl Fn(usize) -> String,
        deadline: Duration,
    ) -> anyhow::Result<Measured> {
        Ok(self
            .run_batch_with_dispatch(handler, n, in_flight, subject_for, Duration::ZERO, deadline)
            .await?
            .measured())
    }

    /// [`Bench::run_batch`], plus each event's dispatch latency: event stored (and event handed
    /// to the client) → the handler process has it, with the first `in_flight` events
    /// published `spread / in_flight` apart instead of all at once when `spread` is not zero
    /// (see [`handlers`] for why), for handlers that answer with the event's `time` (for an
    /// event published without a CloudEvents time, the broker's timestamp) and their receipt
    /// time `t` (Unix seconds) in `output`.
    ///
    /// Only outcome events are read back (a reader of every event would double the bench's own
    /// load, which the raw baseline does not carry). A burst (`in_flight >= n`) does not need them
    /// while it runs: the bench asks the broker how many there are and reads them back once all
    /// are in, so its observer takes no CPU from the path it measures (four interleaved pairs of
    /// runs: 9.1k/s with a concurrent reader, 9.5k/s without — within the machine's noise).
    /// Latency runs from the moment an event is handed to the client to its outcome's broker
    /// timestamp.
    async fn run_batch_with_dispatch(
        &self,
        handler: &str,
        n: usize,
        in_flight: usize,
        subject_for: impl Fn(usize) -> String,
        spread: Duration,
        deadline: Duration,
    ) -> anyhow::Result<Batch> {
        const OUTCOMES: [&str; 2] = ["events.*.*.handler_succeeded", "events.*.*.handler_failed"];
        let burst = in_flight >= n;
        let start_seq = self.next_seq().await?;
        let mut messages = if burst {
            None
        } else {
            Some(self.read_log_from(start_seq, &OUTCOMES).await?)
        };
        let id = |i: usize| format!("bench-{handler}-{i}-{start_seq}");
        let mut published: HashMap<String, time::OffsetDateTime> = HashMap::with_capacity(n);
        let publish = |i: usize, published: &mut HashMap<_, _>| {
            let id = id(i);
            published.insert(id.clone(), time::OffsetDateTime::now_utc());
            let msg = PublishMessage::build()
                .payload(json!({"i": i}).to_string().into())
                .message_id(id);
            (subject_for(i), msg)
        };
        let first_wave = in_flight.min(n);
        let broker_pid = self.server.pid();
        let cpu_before = broker_pid.and_then(usage::sample);
        let started = time::OffsetDateTime::now_utc();
        if spread.is_zero() {
            let wave: Vec<_> = (0..first_wave)
                .map(|i| publish(i, &mut published))
                .collect();
            publish_all(&self.nats.js, wave.into_iter()).await?;
        } else {
            let gap = spread / first_wave.max(1) as u32;
            for i in 0..first_wave {
                if i > 0 {
                    tokio::time::sleep(gap).await;
                }
                publish_all(&self.nats.js, std::iter::once(publish(i, &mut published))).await?;
            }
        }
        let mut sent = first_wave;
        let mut cpu_after = None;
        if burst {
            self.wait_count(start_seq, &OUTCOMES, n, deadline).await?;
            // Before reading the outcomes back, which costs the broker more than the burst.
            cpu_after = broker_pid.and_then(usage::sample);
        }
        let messages = match &mut messages {
            Some(m) => m,
            None => messages.insert(self.read_log_from(start_seq, &OUTCOMES).await?),
        };
        let mut latencies = Vec::with_capacity(n);
        let mut last = started;
        let mut dispatch = Vec::new();
        let mut dispatch_sent = Vec::new();
        let mut stages = [Vec::new(), Vec::new()];
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
            let at = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?.published;
            let Ok(Outcome { data }) = serde_json::from_slice::<Outcome>(&msg.payload) else {
                continue;
            };
            if data.handler != handler {
                continue;
            }
            if msg.subject.ends_with(".handler_failed") {
                anyhow::bail!("{handler} failed during the bench: {}", data.error);
            }
            let Some(sent_at) = data.event_id.and_then(|e| published.get(e.as_ref())) else {
                continue;
            };
            latencies.push((at - *sent_at).as_seconds_f64() * 1000.0);
            last = last.max(at);
            let output = &data.output;
            let unix_s = |t: &str| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                    .ok()
                    .map(|t| t.unix_timestamp_nanos() as f64 / 1e9)
            };
            if let (Some(t), Some(stored)) = (
                output["t"].as_f64(),
                output["time"].as_str().and_then(unix_s),
            ) {
                dispatch.push((t - stored) * 1000.0);
                dispatch_sent.push((t - sent_at.unix_timestamp_nanos() as f64 / 1e9) * 1000.0);
                if let Some(scheduled) = data.scheduled_at.as_deref().and_then(unix_s) {
                    stages[0].push((scheduled - stored) * 1000.0);
                    stages[1].push((t - scheduled) * 1000.0);
                }
            }
            if sent < n {
                let next = publish(sent, &mut published);
                publish_all(&self.nats.js, std::iter::once(next)).await?;
                sent += 1;
            }
        }
        let cpu_after = cpu_after.or_else(|| broker_pid.and_then(usage::sample));
        Ok(Batch {
            latencies,
            span_s: (last - started).as_seconds_f64(),
            dispatch,
            dispatch_sent,
            stages,
            cpu: cpu_before.zip(cpu_after).map(|(a, b)| a.per_event(&b, n)),
        })
    }
}

/// What [`Bench::run_batch_with_dispatch`] measured.
struct Batch {
    /// Per event: handed to the client → its outcome stored, ms.
    latencies: Vec<f64>,
    /// First publish → last outcome stored, s.
    span_s: f64,
    /// Per event: stored → the handler process had it, ms.
    dispatch: Vec<f64>,
    /// Per event: handed to the client → the handler process had it, ms.
    dispatch_sent: Vec<f64>,
    /// `dispatch` in two, per event (ms): stored → its task stored (the listener's routing and
    /// the task's write), and task stored → the handler process had it (the worker).
    stages: [Vec<f64>; 2],
    /// CPU per event from the first publish until every outcome was stored.
    cpu: Option<CpuPerEvent>,
}

impl Batch {
    fn measured(&self) -> Measured {
        Measured::new(self.latencies.clone(), self.span_s)
    }
}

/// What the bench reads of an outcome event: only `data`'s members it needs are kept (parsing
/// whole outcomes into `Value`s cost the bench process a tenth of its CPU).
#[derive(serde::Deserialize)]
struct Outcome<'a> {
    #[serde(borrow)]
    data: OutcomeData<'a>,
}

#[derive(serde::Deserialize)]
struct OutcomeData<'a> {
    #[serde(borrow)]
    handler: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    event_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    error: Value,
    #[serde(default)]
    output: Value,
    #[serde(borrow, default)]
    scheduled_at: Option<std::borrow::Cow<'a, str>>,
}

/// Messages of a log reader, in order per subject, as [`Bench::read_log_from_next`] drains them.
type LogReader = futures::channel::mpsc::UnboundedReceiver<anyhow::Result<jetstream::Message>>;

#[derive(Debug, Clone, serde::Serialize)]
struct Measured {
    events: usize,
    p50_ms: f64,
    p99_ms: f64,
    events_per_s: f64,
}

impl Measured {
    /// A table row: `name` in a column of `width`, then rate, p50 and p99.
    fn row(&self, name: &str, width: usize) -> String {
        format!(
            "{name:<width$} {:>10.0} {:>10.2} {:>10.2}",
            self.events_per_s, self.p50_ms, self.p99_ms
        )
    }

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

/// Warm pools and the cold baseline, as measured by [`handlers`].
struct HandlerFigures {
    cold: Measured,
    /// Pool size (= turns in flight) → figures.
    warm: Vec<(usize, Measured)>,
    /// The same pools while each model call takes [`MODEL_LATENCY`] (as a real one takes
    /// seconds): how throughput scales with concurrent turns when turns wait on the model.
    with_model_latency: Vec<(usize, Measured)>,
    /// The largest pool again with the model latency, its first turns all started at once.
    lockstep: (usize, Measured),
    /// What the warm instances of every pool hold together, once each has served its first turns
    /// (Linux only).
    memory: Option<ProcessMemory>,
}

/// The fake Messages API's reply delay for the scaling run.
const MODEL_LATENCY: Duration = Duration::from_millis(400);

/// Turns per pooled instance in the scaling run with [`MODEL_LATENCY`] (see [`handlers`]).
const MODEL_TURNS: usize = 12;

/// Turns in flight for the cold baseline (and the warm pool it is compared with).
const COLD_IN_FLIGHT: usize = 4;

/// The warm pools measured, each as many turns in flight as instances.
const POOL_SIZES: [usize; 4] = [1, 2, 4, 8];

impl HandlerFigures {
    /// Warm instances alive during the bench: one per pool slot.
    fn instances() -> usize {
        POOL_SIZES.iter().sum()
    }

    /// PSS per warm instance, its MCP server and anything else it started included.
    fn pss_per_instance_mib(&self) -> Option<f64> {
        self.memory.map(|m| m.pss_mib / Self::instances() as f64)
    }

    fn warm(&self, size: usize) -> &Measured {
        &self
            .warm
            .iter()
            .find(|(s, _)| *s == size)
            .expect("every pool size is measured")
            .1
    }

    fn warm_vs_cold_throughput(&self) -> f64 {
        self.warm(COLD_IN_FLIGHT).events_per_s / self.cold.events_per_s.max(1e-9)
    }

    fn json(&self) -> Value {
        json!({
            "bench": "handlers",
            "cold": self.cold,
            "cold_in_flight": COLD_IN_FLIGHT,
            "warm": self.warm.iter().map(|(s, m)| json!({"pool": s, "figures": m})).collect::<Vec<_>>(),
            "warm4_vs_cold_throughput": self.warm_vs_cold_throughput(),
            "warm4_p50_ms": self.warm(COLD_IN_FLIGHT).p50_ms,
            "model_latency_ms": MODEL_LATENCY.as_millis() as u64,
            "with_model_latency": self.with_model_latency.iter().map(|(s, m)| json!({"pool": s, "figures": m})).collect::<Vec<_>>(),
            "with_model_latency_started_together": json!({"pool": self.lockstep.0, "figures": self.lockstep.1}),
            "memory": self.memory.map(|m| json!({"instances": Self::instances(), "total": m, "pss_per_instance_mib": self.pss_per_instance_mib()})),
        })
    }
}

async fn handlers(
    settings: &Settings,
    events: usize,
    cold_events: usize,
    model_turns: usize,
) -> anyhow::Result<HandlerFigures> {
    let claude = claude_bin()?;
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
            "name: cold\non: [\"events.bench.*.cold\"]\nkind: exec\nconcurrency: {COLD_IN_FLIGHT}\ntimeout: 60s\ncommand: [{:?}, \"-p\", \"--bare\", \"--setting-sources\", \"\", \"--tools\", \"\", \"--no-session-persistence\", \"--system-prompt\", \"You are a benchmark agent.\", \"--output-format\", \"text\"]\n{env_yaml}  HOME: {:?}\n",
            claude.display().to_string(),
            cold_home.display().to_string()
        ),
    )?;
    let sizes = POOL_SIZES;
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

    // Every pool first finishes its pre-warm (start-up and `pool.warmup`, which the first event
    // of a handler waits for) and serves each of its instances one turn, so no pool is still
    // starting while the cold baseline or a smaller pool is measured.
    for size in sizes {
        bench
            .run_batch(
                &format!("warm{size}"),
                size * 2,
                size * 2,
                |i| format!("events.bench.w{i}.warm{size}"),
                Duration::from_secs(300),
            )
            .await?;
    }
    // Every warm instance is up and has served turns; no cold process is running yet.
    let memory = bench.server.pid().and_then(usage::descendants_memory);
    eprintln!("cold: {cold_events} events, `claude -p` per event, {COLD_IN_FLIGHT} in flight ...");
    let cold = bench
        .run_batch(
            "cold",
            cold_events,
            COLD_IN_FLIGHT,
            |i| format!("events.bench.c{i}.cold"),
            Duration::from_secs(600),
        )
        .await?;
    let mut warm_by_size = Vec::new();
    for size in sizes {
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
        warm_by_size.push((size, m));
    }
    // Scaling while turns wait on the model: the pools are warm already. The first turns start
    // spread over one model latency, as independent arrivals would. Started together, with a
    // model that always takes the same time, they run in lock-step at first: every model reply
    // wakes all n Claude Code processes at once on the same cores. With 4 turns per instance,
    // 8 turns started together measured p50 619 ms and ×5.8 the 1-turn rate, against 453 ms
    // and ×6.6 spread; with 12 turns per instance ([`MODEL_TURNS`]) the ramp and the last
    // wave's tail weigh less and the turns drift apart: ×7.3 together, ×7.4 spread. The
    // largest pool is also measured started together and reported beside, without a target.
    fake.set_latency(MODEL_LATENCY);
    let mut slow_by_size = Vec::new();
    for size in sizes {
        let n = model_turns * size;
        eprintln!(
            "warm pool of {size}, model replies after {MODEL_LATENCY:?}: {n} events, {size} in flight ..."
        );
        let m = bench
            .run_batch_with_dispatch(
                &format!("warm{size}"),
                n,
                size,
                |i| format!("events.bench.l{i}.warm{size}"),
                MODEL_LATENCY,
                Duration::from_secs(300),
            )
            .await?
            .measured();
        slow_by_size.push((size, m));
    }
    let largest = *sizes.last().expect("sizes");
    eprintln!(
        "warm pool of {largest}, model replies after {MODEL_LATENCY:?}, all started together ..."
    );
    let lockstep = bench
        .run_batch(
            &format!("warm{largest}"),
            model_turns * largest,
            largest,
            |i| format!("events.bench.s{i}.warm{largest}"),
            Duration::from_secs(300),
        )
        .await?;
    fake.set_latency(Duration::ZERO);
    bench.shutdown().await;
    let figures = HandlerFigures {
        cold,
        warm: warm_by_size,
        with_model_latency: slow_by_size,
        lockstep: (largest, lockstep),
        memory,
    };
    println!(
        "\nhandler invocation, event published → outcome event (fake Messages API, fsync always)"
    );
    println!(
        "{:<34} {:>8} {:>10} {:>10} {:>10}",
        "path", "events", "p50 ms", "p99 ms", "events/s"
    );
    let rows = std::iter::once((
        format!("cold exec, {COLD_IN_FLIGHT} in flight"),
        &figures.cold,
    ))
    .chain(
        figures
            .warm
            .iter()
            .map(|(s, m)| (format!("warm pool of {s}, {s} in flight"), m)),
    );
    for (name, m) in rows {
        println!(
            "{name:<34} {:>8} {:>10.1} {:>10.1} {:>10.1}",
            m.events, m.p50_ms, m.p99_ms, m.events_per_s
        );
    }
    let warm = figures.warm(COLD_IN_FLIGHT);
    println!(
        "\nwarm pool of {COLD_IN_FLIGHT} vs cold, both {COLD_IN_FLIGHT} in flight: throughput ×{:.1} (target ≥ 10), p50 latency ÷{:.1}; warm p50 {:.1} ms (target < 100)",
        figures.warm_vs_cold_throughput(),
        figures.cold.p50_ms / warm.p50_ms.max(1e-9),
        warm.p50_ms
    );
    if let (Some(m), Some(pss)) = (figures.memory, figures.pss_per_instance_mib()) {
        println!(
            "memory of the {} warm instances (with their MCP servers; {} processes): PSS {:.0} MiB, {:.0} MiB per instance (RSS {:.0} MiB, counting shared pages in each)",
            HandlerFigures::instances(),
            m.processes,
            m.pss_mib,
            pss,
            m.rss_mib
        );
    }
    Ok(figures)
}

fn claude_bin() -> anyhow::Result<PathBuf> {
    grizzly_shared::nats_server::find_in_tools_dir("claude")
        .or_else(|| grizzly_shared::nats_server::find_on_path("claude"))
        .context(
            "Claude Code is required: run `bash scripts/install-tools.sh` (puts it in .tools/bin)",
        )
}

/// An empty file stream `name` taking `<name in lower case>.>`.
async fn fresh_stream(js: &jetstream::Context, name: &str) -> anyhow::Result<stream::Stream> {
    let _ = js.delete_stream(name).await;
    Ok(js
        .create_stream(stream::Config {
            name: name.into(),
            subjects: vec![format!("{}.>", name.to_lowercase())],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?)
}

/// Milliseconds from a broker timestamp until now.
fn ms_since(stored: time::OffsetDateTime) -> f64 {
    (time::OffsetDateTime::now_utc() - stored).as_seconds_f64() * 1000.0
}

/// Raw JetStream on the same server: publish n (pipelined) while a pull consumer acks them;
/// and a relay (consume → publish to a second stream → ack). Each with the CPU it cost per
/// message, when `broker_pid` can be read.
async fn raw_baseline(
    js: &jetstream::Context,
    n: usize,
    broker_pid: Option<u32>,
) -> anyhow::Result<[(Measured, Option<CpuPerEvent>); 2]> {
    for name in ["BENCH_IN", "BENCH_OUT"] {
        fresh_stream(js, name).await?;
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
                latencies.push(ms_since(info.published));
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
        let cpu = broker_pid.and_then(usage::sample);
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
        let span = started.elapsed().as_secs_f64();
        let cost = cpu.zip(broker_pid.and_then(usage::sample));
        figures.push((
            Measured::new(latencies, span),
            cost.map(|(a, b)| a.per_event(&b, n)),
        ));
        js.get_stream("BENCH_IN").await?.purge().await?;
        let _ = js
            .get_stream("BENCH_IN")
            .await?
            .delete_consumer(&format!("bench-{relay}"))
            .await;
    }
    let relay = figures.pop().context("relay run")?;
    let raw = figures.pop().context("raw run")?;
    Ok([raw, relay])
}

/// Raw JetStream, one message at a time: publish, a pull consumer receives it, ack. Latency
/// from the broker's stored timestamp to receipt, and from the publish call to receipt (as for
/// [`Bench::run_batch_with_dispatch`]).
struct HopProbe {
    messages: pull::Stream,
    /// Per message, ms: stored → received, published → received.
    stored: Vec<f64>,
    sent: Vec<f64>,
    span_s: f64,
}

impl HopProbe {
    async fn new(js: &jetstream::Context) -> anyhow::Result<Self> {
        let consumer = fresh_stream(js, "BENCH_HOP")
            .await?
            .create_consumer(pull::Config {
                durable_name: Some("bench-hop".into()),
                ack_policy: AckPolicy::Explicit,
                ..Default::default()
            })
            .await?;
        Ok(Self {
            messages: consumer.messages().await?,
            stored: Vec::new(),
            sent: Vec::new(),
            span_s: 0.0,
        })
    }

    /// `n` more hops, one after another.
    async fn run(&mut self, js: &jetstream::Context, n: usize) -> anyhow::Result<()> {
        let started = Instant::now();
        for _ in 0..n {
            let i = self.stored.len();
            let sent = time::OffsetDateTime::now_utc();
            let ack = js.publish(format!("bench_hop.{i}"), "x".into()).await?;
            let msg = tokio::time::timeout(Duration::from_secs(10), self.messages.next())
                .await
                .context("raw hop: no delivery within 10 s")?
                .context("ended")??;
            let info = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?;
            self.stored.push(ms_since(info.published));
            self.sent.push(ms_since(sent));
            msg.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            ack.await?;
        }
        self.span_s += started.elapsed().as_secs_f64();
        Ok(())
    }

    /// Stored → received and published → received; deletes the probe's stream.
    async fn finish(self, js: &jetstream::Context) -> anyhow::Result<[Measured; 2]> {
        drop(self.messages);
        js.delete_stream("BENCH_HOP").await?;
        Ok([
            Measured::new(self.stored, self.span_s),
            Measured::new(self.sent, self.span_s),
        ])
    }
}

/// One broker mode of [`throughput`].
struct ModeFigures {
    sync_always: bool,
    raw: Measured,
    relay: Measured,
    full: Measured,
    /// One event at a time: stored → a raw pull consumer has it.
    hop: Measured,
    /// One event at a time: stored → the handler process has it (listener, task, worker).
    dispatch: Measured,
    /// `hop` and `dispatch` from the publish call instead of the broker's stored timestamp.
    hop_sent: Measured,
    dispatch_sent: Measured,
    /// `dispatch` in two: stored → task stored, task stored → handler.
    routing: Measured,
    delivery: Measured,
    /// One event at a time: handed to the client → its outcome stored.
    at_rest: Measured,
    /// CPU per event of `raw`, `relay` and `full` (Linux only).
    cpu_raw: Option<CpuPerEvent>,
    cpu_relay: Option<CpuPerEvent>,
    cpu_full: Option<CpuPerEvent>,
}

impl ModeFigures {
    fn mode(&self) -> &'static str {
        if self.sync_always {
            "fsync always"
        } else {
            "fsync default"
        }
    }
    fn full_over_raw(&self) -> f64 {
        self.full.events_per_s / self.raw.events_per_s.max(1e-9)
    }
    fn full_over_relay(&self) -> f64 {
        self.full.events_per_s / self.relay.events_per_s.max(1e-9)
    }
    fn dispatch_over_hop(&self) -> f64 {
        self.dispatch.p50_ms / self.hop.p50_ms.max(1e-9)
    }
    fn dispatch_over_hop_sent(&self) -> f64 {
        self.dispatch_sent.p50_ms / self.hop_sent.p50_ms.max(1e-9)
    }
}

fn throughput_json(events: usize, modes: &[ModeFigures]) -> Value {
    let modes: Vec<Value> = modes
        .iter()
        .map(|m| {
            json!({"mode": m.mode(), "raw": m.raw, "relay": m.relay, "full": m.full,
                "hop": m.hop, "dispatch": m.dispatch, "at_rest": m.at_rest,
                "hop_from_publish": m.hop_sent, "dispatch_from_publish": m.dispatch_sent,
                "dispatch_routing": m.routing, "dispatch_worker": m.delivery,
                "full_over_raw": m.full_over_raw(), "full_over_relay": m.full_over_relay(),
                "dispatch_over_hop": m.dispatch_over_hop(),
                "dispatch_over_hop_from_publish": m.dispatch_over_hop_sent(),
                "cpu_per_event": {"raw": m.cpu_raw, "relay": m.cpu_relay, "full": m.cpu_full}})
        })
        .collect();
    json!({"bench": "throughput", "events": events, "modes": modes})
}

/// The no-op `process` handler: answers every request line at once with the event's `time` and
/// its own receipt time (for the dispatch latency), so the figures are Grizzly's path. Perl (part
/// of every Debian base) reads buffered; `sed -u` read one byte per system call and cost as much
/// CPU as Grizzly itself.
const NOOP_HANDLER: &str = "name: noop\non: [\"events.bench.*.noop\"]\nkind: process\ncommand: [\"perl\", \"-MTime::HiRes=time\", \"-ne\", '$|=1; /\"time\":\"([^\"]+)\"/; printf qq({\"done\":true,\"output\":{\"t\":%.6f,\"time\":\"%s\"}}\\n), time, $1']\nconcurrency: 256\npool: { min: 4, max: 8 }\n";

/// Rounds the one-at-a-time latencies are measured in, raw hop and dispatch alternating.
const LATENCY_ROUNDS: usize = 10;

/// Full path vs raw JetStream on the same broker, for each mode in `modes` (`true` = fsync
/// always).
async fn throughput(events: usize, modes: &[bool]) -> anyhow::Result<Vec<ModeFigures>> {
    let latency_events = (events / 40).clamp(50, 500);
    let dir = tempfile::tempdir()?;
    let handlers_dir = dir.path().join("handlers");
    std::fs::create_dir_all(&handlers_dir)?;
    write(&handlers_dir.join("noop.yaml"), NOOP_HANDLER)?;
    let mut out = Vec::new();
    println!(
        "\nfull path (publish → listener → worker → outcome) vs raw JetStream, {events} events of ~256 B"
    );
    println!(
        "{:<36} {:>10} {:>10} {:>10}",
        "", "events/s", "p50 ms", "p99 ms"
    );
    for &sync_always in modes {
        let bench = Bench::start(
            &dir.path().join(format!("store-{sync_always}")),
            sync_always,
            &handlers_dir,
            |s| {
                s.partitions = 32;
                // A slot is held until the outcome is confirmed by the broker: with 64 the
                // worker waited on those round trips with the CPU partly idle.
                s.worker.max_concurrency = 256;
            },
        )
        .await?;
        let broker_pid = bench.server.pid();
        let [(raw, cpu_raw), (relay, cpu_relay)] =
            raw_baseline(&bench.nats.js, events, broker_pid).await?;
        // Warm-up, the latencies one event at a time, then the measured burst.
        bench
            .run_batch(
                "noop",
                500,
                500,
                |i| format!("events.bench.w{}.noop", i % 100),
                Duration::from_secs(120),
            )
            .await?;
        // The raw hop and the dispatch in alternating rounds: this machine's speed drifts by a
        // third within minutes (the same raw hop measured 0.166 and 0.217 ms in one run), and
        // measured one after the other their ratio carried that drift.
        let mut probe = HopProbe::new(&bench.nats.js).await?;
        let (mut at_rest, mut dispatch, mut dispatch_sent) = (Vec::new(), Vec::new(), Vec::new());
        let [mut routing, mut delivery] = [Vec::new(), Vec::new()];
        let mut at_rest_s = 0.0;
        let per_round = latency_events.div_ceil(LATENCY_ROUNDS);
        for round in 0..LATENCY_ROUNDS {
            let n = per_round.min(latency_events.saturating_sub(round * per_round));
            if n == 0 {
                break;
            }
            probe.run(&bench.nats.js, n).await?;
            let batch = bench
                .run_batch_with_dispatch(
                    "noop",
                    n,
                    1,
                    |i| format!("events.bench.l{}.noop", (round * per_round + i) % 100),
                    Duration::ZERO,
                    Duration::from_secs(120),
                )
                .await?;
            anyhow::ensure!(
                batch.dispatch.len() == n,
                "the no-op handler's receipt times are missing from its outcomes"
            );
            at_rest_s += batch.span_s;
            at_rest.extend(batch.latencies);
            dispatch.extend(batch.dispatch);
            dispatch_sent.extend(batch.dispatch_sent);
            let [r, d] = batch.stages;
            routing.extend(r);
            delivery.extend(d);
        }
        let [hop, hop_sent] = probe.finish(&bench.nats.js).await?;
        // Dispatches happened over the one-at-a-time runs' time.
        let at_rest = Measured::new(at_rest, at_rest_s);
        let dispatch = Measured::new(dispatch, at_rest_s);
        let dispatch_sent = Measured::new(dispatch_sent, at_rest_s);
        let routing = Measured::new(routing, at_rest_s);
        let delivery = Measured::new(delivery, at_rest_s);
        let full = bench
            .run_batch_with_dispatch(
                "noop",
                events,
                events,
                |i| format!("events.bench.a{}.noop", i % 1000),
                Duration::ZERO,
                Duration::from_secs(600),
            )
            .await?;
        let (cpu_full, full) = (full.cpu, full.measured());
        bench.shutdown().await;
        let m = ModeFigures {
            sync_always,
            raw,
            relay,
            full,
            hop,
            dispatch,
            hop_sent,
            dispatch_sent,
            routing,
            delivery,
            at_rest,
            cpu_raw,
            cpu_relay,
            cpu_full,
        };
        let mode = m.mode();
        for (name, f) in [
            ("raw publish + consume + ack", &m.raw),
            ("raw relay (consume→publish→ack)", &m.relay),
            ("grizzly full path", &m.full),
        ] {
            println!("{}   [{mode}]", f.row(name, 36));
        }
        println!(
            "  one event at a time ({latency_events} events, in {LATENCY_ROUNDS} rounds alternating with the raw hop):"
        );
        for (name, f) in [
            ("raw hop (stored → consumer)", &m.hop),
            ("dispatch (stored → handler)", &m.dispatch),
            ("  routing (stored → task stored)", &m.routing),
            ("  worker (task stored → handler)", &m.delivery),
            ("raw hop (publish → consumer)", &m.hop_sent),
            ("dispatch (publish → handler)", &m.dispatch_sent),
            ("full path (publish → outcome stored)", &m.at_rest),
        ] {
            println!(
                "{:<36} {:>10} {:>10.3} {:>10.3}   [{mode}]",
                name, "", f.p50_ms, f.p99_ms
            );
        }
        for (name, cost) in [
            ("raw", m.cpu_raw),
            ("relay", m.cpu_relay),
            ("full path", m.cpu_full),
        ] {
            if let Some(c) = cost {
                println!(
                    "  CPU per event, {name}: bench/grizzly process {:.1} µs, broker {:.1} µs, handler processes {:.1} µs",
                    c.own_us, c.broker_us, c.handlers_us
                );
            }
        }
        println!(
            "  [{mode}] full/raw = {:.2}, full/relay = {:.2}, dispatch p50 / raw hop p50 = {:.1} from the store, {:.1} from the publish",
            m.full_over_raw(),
            m.full_over_relay(),
            m.dispatch_over_hop(),
            m.dispatch_over_hop_sent()
        );
        out.push(m);
    }
    Ok(out)
}

/// Fails 1% of first attempts at random (a marker file per event id tells a first attempt from
/// a retry across the pool's processes); everything else succeeds at once.
const FLAKY_PY: &str = r#"
import json, os, random, sys
marks = sys.argv[1]
for line in sys.stdin:
    event = json.loads(line)
    try:
        os.close(os.open(os.path.join(marks, event["id"]), os.O_CREAT | os.O_EXCL))
        first = True
    except FileExistsError:
        first = False
    if first and random.random() < 0.01:
        print(json.dumps({"done": True, "error": "injected failure"}), flush=True)
    else:
        print(json.dumps({"done": True, "output": {"ok": True}}), flush=True)
"#;

/// What [`success`] measured.
#[derive(Debug, Clone, serde::Serialize)]
struct SuccessFigures {
    events: usize,
    /// Events with a `handler_succeeded` (after retries).
    succeeded: usize,
    /// ... of which on the first attempt.
    first_attempt: usize,
    /// Failed attempts seen (`handler_failed`), i.e. the injected failures.
    failed_attempts: usize,
    dead_lettered: usize,
    success_pct: f64,
    first_attempt_success_pct: f64,
    events_per_s: f64,
}

impl SuccessFigures {
    fn json(&self) -> Value {
        json!({"bench": "success", "figures": self})
    }
}

/// Success rate under injected failures: `events` events (200 aggregates, fsync always) for a
/// `process` handler that fails 1% of first attempts, with retries on.
async fn success(events: usize) -> anyhow::Result<SuccessFigures> {
    let dir = tempfile::tempdir()?;
    let handlers_dir = dir.path().join("handlers");
    let marks = dir.path().join("marks");
    std::fs::create_dir_all(&handlers_dir)?;
    std::fs::create_dir_all(&marks)?;
    let script = dir.path().join("flaky.py");
    write(&script, FLAKY_PY)?;
    write(
        &handlers_dir.join("flaky.yaml"),
        &format!(
            "name: flaky\non: [\"events.bench.*.flaky\"]\nkind: process\ncommand: [\"python3\", {:?}, {:?}]\nconcurrency: 16\npool: {{ min: 4, max: 4 }}\nretry: {{ max_attempts: 3, initial_backoff: 20ms, max_backoff: 200ms }}\n",
            script.display().to_string(),
            marks.display().to_string()
        ),
    )?;
    let bench = Bench::start(&dir.path().join("store"), true, &handlers_dir, |_| {}).await?;
    eprintln!("success: {events} events, 1% of first attempts fail, 3 attempts ...");
    let seen = bench
        .outcomes(
            "flaky",
            events,
            |i| format!("events.bench.s{}.flaky", i % 200),
            Duration::from_secs(300),
        )
        .await?;
    bench.shutdown().await;
    let pct = |n: usize| 100.0 * n as f64 / events.max(1) as f64;
    let figures = SuccessFigures {
        events,
        succeeded: seen.succeeded,
        first_attempt: seen.first_attempt,
        failed_attempts: seen.failed_attempts,
        dead_lettered: seen.dead_lettered,
        success_pct: pct(seen.succeeded),
        first_attempt_success_pct: pct(seen.first_attempt),
        events_per_s: events as f64 / seen.span_s.max(1e-9),
    };
    println!(
        "\nsuccess under 1% injected first-attempt failures (retries on), {events} events: {:.2}% succeeded ({:.2}% on the first attempt, {} failed attempts, {} dead-lettered), {:.0} events/s",
        figures.success_pct,
        figures.first_attempt_success_pct,
        figures.failed_attempts,
        figures.dead_lettered,
        figures.events_per_s
    );
    Ok(figures)
}

/// Final outcomes of one handler, read back from the log.
#[derive(Default)]
struct Outcomes {
    succeeded: usize,
    first_attempt: usize,
    failed_attempts: usize,
    dead_lettered: usize,
    /// First publish → last final outcome (broker timestamps).
    span_s: f64,
}

impl Bench {
    /// Publishes `n` events at once and reads the log until each has a final outcome of
    /// `handler` (success, or failure with the event dead-lettered).
    async fn outcomes(
        &self,
        handler: &str,
        n: usize,
        subject_for: impl Fn(usize) -> String,
        deadline: Duration,
    ) -> anyhow::Result<Outcomes> {
        let (start_seq, mut messages) = self.read_log_from_next(&["events.>"]).await?;
        publish_all(
            &self.nats.js,
            (0..n).map(|i| {
                let msg = PublishMessage::build()
                    .payload(json!({"i": i}).to_string().into())
                    .message_id(format!("bench-{handler}-{i}-{start_seq}"));
                (subject_for(i), msg)
            }),
        )
        .await?;
        let mut out = Outcomes::default();
        let mut first: Option<time::OffsetDateTime> = None;
        let until = tokio::time::Instant::now() + deadline;
        while out.succeeded + out.dead_lettered < n {
            let msg = tokio::time::timeout_at(until, messages.next())
                .await
                .with_context(|| {
                    format!(
                        "{handler}: only {} of {n} final outcomes within {deadline:?}",
                        out.succeeded + out.dead_lettered
                    )
                })?
                .context("log ended")??;
            let at = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?.published;
            let first = *first.get_or_insert(at);
            let body: Value = serde_json::from_slice(&msg.payload).unwrap_or_default();
            if body["data"]["handler"] != handler {
                continue;
            }
            if msg.subject.ends_with(".handler_succeeded") {
                out.succeeded += 1;
                out.first_attempt += usize::from(body["data"]["attempt"] == 1);
            } else if msg.subject.ends_with(".handler_failed") {
                out.failed_attempts += 1;
                out.dead_lettered += usize::from(body["data"]["dead_lettered"] == true);
            } else {
                continue;
            }
            out.span_s = (at - first).as_seconds_f64();
        }
        Ok(out)
    }
}

/// One row of the summary: a figure beside its target.
#[derive(Debug, Clone, serde::Serialize)]
struct Target {
    /// Stable key (also in `figures`).
    key: String,
    figure: String,
    value: f64,
    unit: &'static str,
    target: String,
    pass: bool,
}

fn target(
    key: impl Into<String>,
    figure: impl Into<String>,
    value: f64,
    unit: &'static str,
    target: impl Into<String>,
    pass: bool,
) -> Target {
    Target {
        key: key.into(),
        figure: figure.into(),
        value,
        unit,
        target: target.into(),
        pass,
    }
}

/// Sizes of one `bench all` run.
struct Sizes {
    warm_events: usize,
    cold_events: usize,
    model_turns: usize,
    throughput_events: usize,
    success_events: usize,
    workflow_instances: usize,
}

/// `grizzly bench all`: every bench on one machine in one run, a PASS/MISS table, and the
/// figures as JSON (with the machine, date and commit) to compare runs over time.
async fn all(settings: &Settings, quick: bool) -> anyhow::Result<Value> {
    let sizes = if quick {
        Sizes {
            warm_events: 12,
            cold_events: 3,
            model_turns: 4,
            throughput_events: 2_000,
            success_events: 400,
            workflow_instances: 60,
        }
    } else {
        Sizes {
            warm_events: 100,
            cold_events: 8,
            model_turns: MODEL_TURNS,
            throughput_events: 20_000,
            success_events: 2_000,
            workflow_instances: 2_000,
        }
    };
    let started = Instant::now();
    let machine = machine_info();
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let handlers = handlers(
        settings,
        sizes.warm_events,
        sizes.cold_events,
        sizes.model_turns,
    )
    .await?;
    let modes = throughput(sizes.throughput_events, &[true, false]).await?;
    let success = success(sizes.success_events).await?;
    let flows = workflows::workflows(sizes.workflow_instances).await?;
    let (always, default) = (&modes[0], &modes[1]);

    let mut figures = serde_json::Map::new();
    let mut put = |k: String, v: f64| {
        figures.insert(k, json!(v));
    };
    put("cold_p50_ms".into(), handlers.cold.p50_ms);
    put("cold_p99_ms".into(), handlers.cold.p99_ms);
    put("cold_events_per_s".into(), handlers.cold.events_per_s);
    for (size, m) in &handlers.warm {
        put(format!("warm{size}_p50_ms"), m.p50_ms);
        put(format!("warm{size}_p99_ms"), m.p99_ms);
        put(format!("warm{size}_events_per_s"), m.events_per_s);
    }
    put(
        "warm_vs_cold_throughput".into(),
        handlers.warm_vs_cold_throughput(),
    );
    if let Some(pss) = handlers.pss_per_instance_mib() {
        put("warm_instance_pss_mib".into(), pss);
    }
    let one = handlers.warm(1).events_per_s.max(1e-9);
    for (size, m) in handlers.warm.iter().filter(|(s, _)| *s > 1) {
        put(
            format!("cpu_bound_scaling{size}_vs_1"),
            m.events_per_s / one,
        );
    }
    let slow_one = handlers
        .with_model_latency
        .first()
        .map_or(1e-9, |(_, m)| m.events_per_s.max(1e-9));
    for (size, m) in &handlers.with_model_latency {
        put(format!("latency{size}_events_per_s"), m.events_per_s);
        put(format!("latency{size}_p50_ms"), m.p50_ms);
        if *size > 1 {
            put(format!("scaling{size}_vs_1"), m.events_per_s / slow_one);
        }
    }
    let (together, m) = &handlers.lockstep;
    put(format!("latency{together}_together_p50_ms"), m.p50_ms);
    put(
        format!("scaling{together}_together_vs_1"),
        m.events_per_s / slow_one,
    );
    for m in &modes {
        let suffix = if m.sync_always { "always" } else { "default" };
        put(format!("raw_events_per_s_{suffix}"), m.raw.events_per_s);
        put(format!("relay_events_per_s_{suffix}"), m.relay.events_per_s);
        put(format!("full_events_per_s_{suffix}"), m.full.events_per_s);
        put(format!("full_p50_ms_{suffix}"), m.full.p50_ms);
        put(format!("full_p99_ms_{suffix}"), m.full.p99_ms);
        put(format!("full_over_raw_{suffix}"), m.full_over_raw());
        put(format!("full_over_relay_{suffix}"), m.full_over_relay());
        put(format!("hop_p50_ms_{suffix}"), m.hop.p50_ms);
        put(format!("hop_p99_ms_{suffix}"), m.hop.p99_ms);
        put(format!("dispatch_p50_ms_{suffix}"), m.dispatch.p50_ms);
        put(format!("dispatch_p99_ms_{suffix}"), m.dispatch.p99_ms);
        // The dispatch in two, at the task's store (the outcomes' `scheduled_at`).
        put(
            format!("dispatch_routing_p50_ms_{suffix}"),
            m.routing.p50_ms,
        );
        put(
            format!("dispatch_worker_p50_ms_{suffix}"),
            m.delivery.p50_ms,
        );
        put(format!("at_rest_p50_ms_{suffix}"), m.at_rest.p50_ms);
        put(format!("dispatch_over_hop_{suffix}"), m.dispatch_over_hop());
        put(
            format!("hop_from_publish_p50_ms_{suffix}"),
            m.hop_sent.p50_ms,
        );
        put(
            format!("dispatch_from_publish_p50_ms_{suffix}"),
            m.dispatch_sent.p50_ms,
        );
        put(
            format!("dispatch_from_publish_p99_ms_{suffix}"),
            m.dispatch_sent.p99_ms,
        );
        put(
            format!("dispatch_over_hop_from_publish_{suffix}"),
            m.dispatch_over_hop_sent(),
        );
        // What one event costs each process (Linux only): where the full path's time goes.
        for (path, cost) in [("raw", m.cpu_raw), ("full", m.cpu_full)] {
            if let Some(c) = cost {
                put(format!("cpu_{path}_own_us_{suffix}"), c.own_us);
                put(format!("cpu_{path}_broker_us_{suffix}"), c.broker_us);
            }
        }
        if let Some(c) = m.cpu_full {
            put(format!("cpu_full_handlers_us_{suffix}"), c.handlers_us);
        }
    }
    put("success_pct".into(), success.success_pct);
    for (key, value) in flows.figures() {
        put(key.into(), value);
    }
    put(
        "first_attempt_success_pct".into(),
        success.first_attempt_success_pct,
    );

    let warm1 = handlers.warm(1);
    let warm4 = handlers.warm(COLD_IN_FLIGHT);
    let mut targets = vec![
        target(
            "warm1_p50_ms",
            "warm turn p50, 1 in flight",
            warm1.p50_ms,
            "ms",
            "< 100",
            warm1.p50_ms < 100.0,
        ),
        target(
            "warm4_p50_ms",
            format!("warm turn p50, {COLD_IN_FLIGHT} in flight"),
            warm4.p50_ms,
            "ms",
            "< 100",
            warm4.p50_ms < 100.0,
        ),
        target(
            "warm_vs_cold_throughput",
            format!("warm pool vs cold spawn, {COLD_IN_FLIGHT} in flight"),
            handlers.warm_vs_cold_throughput(),
            "×",
            "≥ 10",
            handlers.warm_vs_cold_throughput() >= 10.0,
        ),
    ];
    // Turns that wait on the model should scale linearly with the turns in flight; the target
    // is 80% of that. (With an instant fake model, turns are CPU-bound and cannot scale past
    // the cores: those figures are reported, `cpu_bound_scaling*`, without a target.)
    for (size, m) in handlers.with_model_latency.iter().filter(|(s, _)| *s > 1) {
        let want = 0.8 * *size as f64;
        let got = m.events_per_s / slow_one;
        targets.push(target(
            format!("scaling{size}_vs_1"),
            format!(
                "events/s, {size} vs 1 turns ({} ms model)",
                MODEL_LATENCY.as_millis()
            ),
            got,
            "×",
            format!("≥ {want:.1} (0.8 × {size})"),
            got >= want,
        ));
    }
    targets.extend([
        target(
            "full_events_per_s_default",
            "full path events/s, fsync default",
            default.full.events_per_s,
            "ev/s",
            "≥ 1,000 (stretch 10,000)",
            default.full.events_per_s >= 1_000.0,
        ),
        target(
            "full_over_raw_default",
            "full path / raw JetStream, fsync default",
            default.full_over_raw(),
            "×",
            "≥ 0.15",
            default.full_over_raw() >= 0.15,
        ),
        // Both from the publish call, as a client sees a hop; from the broker's store
        // timestamp (the raw "hop" then only its delivery half) it is reported beside, above.
        target(
            "dispatch_over_hop_from_publish_default",
            "dispatch p50 / raw hop p50 (from the publish), fsync default",
            default.dispatch_over_hop_sent(),
            "×",
            "≤ 4",
            default.dispatch_over_hop_sent() <= 4.0,
        ),
        target(
            "full_over_relay_always",
            "full path / raw relay, fsync always",
            always.full_over_relay(),
            "×",
            "≥ 0.5",
            always.full_over_relay() >= 0.5,
        ),
        target(
            "success_pct",
            "success after retries, 1% injected failures",
            success.success_pct,
            "%",
            "≥ 99.9",
            success.success_pct >= 99.9,
        ),
    ]);

    print_summary(&targets, &machine, quick, &handlers, &modes, &success);
    println!("  {}", flows.summary());
    let duration = started.elapsed().as_secs_f64();
    eprintln!("bench all took {duration:.0} s");
    Ok(json!({
        "bench": "all",
        "schema": 1,
        "quick": quick,
        "date": date,
        "git_commit": git(&["rev-parse", "HEAD"]),
        "git_dirty": git(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty()),
        "machine": machine,
        "duration_s": duration,
        "figures": figures,
        "targets": targets,
        "handlers": handlers.json(),
        "throughput": throughput_json(sizes.throughput_events, &modes),
        "success": success.json(),
        "workflows": flows.json(),
    }))
}

fn print_summary(
    targets: &[Target],
    machine: &Value,
    quick: bool,
    handlers: &HandlerFigures,
    modes: &[ModeFigures],
    success: &SuccessFigures,
) {
    println!(
        "\ngrizzly bench all{} — {} cores, every figure measured in this run on this machine",
        if quick { " --quick" } else { "" },
        machine["cores"]
    );
    let w = targets
        .iter()
        .map(|t| t.figure.chars().count())
        .max()
        .unwrap_or(0)
        .max(6);
    println!(
        "\n| {:<w$} | {:>10} | {:<34} | {:<4} |",
        "figure", "measured", "target", ""
    );
    println!("|{:-<w2$}|{:->12}|{:-<36}|------|", "", "", "", w2 = w + 2);
    for t in targets {
        let value = match t.unit {
            "ms" => format!("{:.1} ms", t.value),
            "ev/s" => format!("{:.0}/s", t.value),
            "%" => format!("{:.2}%", t.value),
            _ => format!("×{:.2}", t.value),
        };
        println!(
            "| {:<w$} | {:>10} | {:<34} | {:<4} |",
            t.figure,
            value,
            format!("{} {}", t.target, if t.unit == "×" { "×" } else { t.unit }),
            if t.pass { "PASS" } else { "MISS" }
        );
    }
    println!("\nconcurrency scaling (warm pool = turns in flight, fake Messages API):");
    for ((size, m), (_, slow)) in handlers.warm.iter().zip(&handlers.with_model_latency) {
        println!(
            "  {size} turns: instant model {:>6.1} events/s (p50 {:>6.1} ms); {} ms model {:>6.1} events/s (p50 {:>6.1} ms)",
            m.events_per_s,
            m.p50_ms,
            MODEL_LATENCY.as_millis(),
            slow.events_per_s,
            slow.p50_ms
        );
    }
    let (together, m) = &handlers.lockstep;
    println!(
        "  {together} turns started together, {} ms model: {:.1} events/s (p50 {:.1} ms), ×{:.2} the 1-turn rate (no target, see ARCHITECTURE.md)",
        MODEL_LATENCY.as_millis(),
        m.events_per_s,
        m.p50_ms,
        m.events_per_s
            / handlers
                .with_model_latency
                .first()
                .map_or(1e-9, |(_, m)| m.events_per_s.max(1e-9)),
    );
    for m in modes {
        println!(
            "  [{}] raw {:.0}/s, relay {:.0}/s, full path {:.0}/s (p50 {:.1} ms); one at a time, from the publish: raw hop p50 {:.3} ms, dispatch p50 {:.3} ms (p99 {:.3}), outcome p50 {:.3} ms; from the store: raw hop p50 {:.3} ms, dispatch p50 {:.3} ms (×{:.1})",
            m.mode(),
            m.raw.events_per_s,
            m.relay.events_per_s,
            m.full.events_per_s,
            m.full.p50_ms,
            m.hop_sent.p50_ms,
            m.dispatch_sent.p50_ms,
            m.dispatch_sent.p99_ms,
            m.at_rest.p50_ms,
            m.hop.p50_ms,
            m.dispatch.p50_ms,
            m.dispatch_over_hop()
        );
        if let (Some(raw), Some(full)) = (m.cpu_raw, m.cpu_full) {
            println!(
                "  [{}] CPU per event: raw {:.1} µs client + {:.1} µs broker; full path {:.1} µs grizzly (listener, worker, bench client) + {:.1} µs broker + {:.1} µs handler processes",
                m.mode(),
                raw.own_us,
                raw.broker_us,
                full.own_us,
                full.broker_us,
                full.handlers_us
            );
        }
    }
    println!(
        "  first-attempt success {:.2}% ({} injected failures), after retries {:.2}%",
        success.first_attempt_success_pct, success.failed_attempts, success.success_pct
    );
}

/// Cores, OS and the tool versions the figures depend on.
fn machine_info() -> Value {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|m| m.trim().to_string())
    });
    let version = |bin: Option<PathBuf>| {
        let out = std::process::Command::new(bin?)
            .arg("--version")
            .output()
            .ok()?;
        Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    json!({
        "cores": cores,
        "cpu": cpu,
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "nats_server": version(grizzly_shared::nats_server::find_binary().ok()),
        "claude_code": version(claude_bin().ok()),
    })
}

/// `git <args>` in the working directory, else beside the binary (`target/release` of a
/// clone), trimmed; `None` outside a repository.
fn git(args: &[&str]) -> Option<String> {
    let near_exe = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    [Some(PathBuf::from(".")), near_exe]
        .into_iter()
        .flatten()
        .find_map(|dir| {
            let out = std::process::Command::new("git")
                .arg("-C")
                .arg(dir)
                .args(args)
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
}
