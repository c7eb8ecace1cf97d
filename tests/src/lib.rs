//! Test kit for cross-component tests: a real `nats-server` on a free port with a temporary
//! store, components run in-process (or as real child processes for crash tests), and an event
//! watcher that synchronises on events in the log with a deadline — never on sleeps.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::{self};
use futures::StreamExt;
use grizzly_shared::Settings;
use grizzly_shared::envelope::{EventEnvelope, StoredMessage};
use grizzly_shared::handler::load_handlers;
use grizzly_shared::nats::{self, EVENTS_STREAM, Nats};
use grizzly_shared::nats_server::NatsServer;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One event read back from `EVENTS`.
#[derive(Debug, Clone)]
pub struct LoggedEvent {
    pub seq: u64,
    pub subject: String,
    /// `None` when the body could not become an event (it is dead-lettered).
    pub event: Option<EventEnvelope>,
    pub payload: bytes::Bytes,
}

impl LoggedEvent {
    pub fn event_type(&self) -> &str {
        self.subject.rsplit('.').next().unwrap_or("")
    }
    pub fn data(&self) -> serde_json::Value {
        self.event
            .as_ref()
            .map(|e| e.data.clone())
            .unwrap_or_default()
    }
}

/// A component running in this process; stopped (gracefully) on drop.
pub struct Component {
    pub stop: CancellationToken,
    pub handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Component {
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        match self.handle.take() {
            Some(h) => h.await?,
            None => Ok(()),
        }
    }
    /// Simulates a crash of an in-process component: its task is aborted mid-flight.
    pub fn abort(mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A real broker plus a scratch directory for handlers and workflows.
pub struct TestEnv {
    pub server: NatsServer,
    pub nats: Nats,
    pub settings: Settings,
    pub dir: tempfile::TempDir,
}

impl TestEnv {
    /// Starts a fresh nats-server (fails loudly when it is not installed).
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| {}, NatsServer::url).await
    }

    /// As [`Self::start`] with the server's options changed by `adjust`; `url` gives the URL
    /// the components use (e.g. with credentials).
    pub async fn start_with(
        adjust: impl FnOnce(&mut grizzly_shared::nats_server::NatsServerOptions),
        url: impl FnOnce(&NatsServer) -> String,
    ) -> anyhow::Result<Self> {
        // Logs only when asked for (GRIZZLY_LOG=debug cargo test ...): test output stays readable.
        if let Ok(filter) = std::env::var("GRIZZLY_LOG") {
            grizzly_shared::telemetry::init("text", &filter);
        }
        let server = NatsServer::start_temp_with(adjust)
            .await
            .context("a real nats-server is required (run scripts/install-tools.sh)")?;
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("handlers"))?;
        std::fs::create_dir_all(dir.path().join("workflows"))?;
        let mut settings = Settings {
            nats_url: url(&server),
            handlers_dir: dir.path().join("handlers"),
            workflows_dir: dir.path().join("workflows"),
            partitions: 4,
            // Components under test serve metrics on a free port: tests run side by side.
            metrics_addr: "127.0.0.1:0".into(),
            ..Settings::default()
        };
        // Short timings so failover and redelivery happen within a test's deadline.
        settings.worker.lease_ttl = Duration::from_secs(2);
        settings.worker.ack_wait = Duration::from_secs(5);
        settings.worker.drain_timeout = Duration::from_secs(10);
        settings.worker.claude_bin = tool_path("claude").display().to_string();
        settings.worker.mcp_bin = Some(bin_path("grizzly-worker").display().to_string());
        let nats = nats::connect(&settings.nats_url, "grizzly-test", false).await?;
        nats::ensure_streams(&nats.js, &settings.streams).await?;
        Ok(Self {
            server,
            nats,
            settings,
            dir,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `handlers/<name>.yaml`.
    pub fn write_handler(&self, name: &str, yaml: &str) -> PathBuf {
        let path = self.settings.handlers_dir.join(format!("{name}.yaml"));
        std::fs::write(&path, yaml).expect("write handler");
        path
    }

    /// Writes a helper script into the scratch dir and returns its path.
    pub fn write_script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.path().join(name);
        std::fs::write(&path, body).expect("write script");
        path
    }

    pub fn handlers(&self) -> Vec<grizzly_shared::handler::LoadedHandler> {
        load_handlers(&self.settings.handlers_dir).expect("handlers load")
    }

    pub async fn start_listener(&self) -> anyhow::Result<Component> {
        self.start_listener_with(self.settings.clone()).await
    }

    /// The entries of the lease bucket whose key starts with `prefix` (`task.<handler>.`,
    /// `route.`, …): key → holder.
    pub async fn leases(
        &self,
        prefix: &str,
    ) -> anyhow::Result<std::collections::HashMap<String, String>> {
        let mut held = std::collections::HashMap::new();
        for (key, owner) in nats::entries(&self.nats.js, nats::LEASES_BUCKET, prefix)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
        {
            held.insert(key, String::from_utf8(owner.to_vec())?);
        }
        Ok(held)
    }

    /// Owner of each partition of the log (listener lease `route.<p>`).
    pub async fn route_owners(&self) -> anyhow::Result<std::collections::HashMap<u16, String>> {
        Ok(self
            .leases("route.")
            .await?
            .into_iter()
            .filter_map(|(key, owner)| Some((key.strip_prefix("route.")?.parse().ok()?, owner)))
            .collect())
    }

    /// Waits until the workflow projector has applied (and acked) every workflow event in the
    /// log: its consumer has nothing pending. The projector recreates that consumer now and
    /// then; a missing one is not caught up.
    pub async fn workflow_view_caught_up(&self, deadline: Duration) -> anyhow::Result<()> {
        let until = tokio::time::Instant::now() + deadline;
        while !grizzly_coordinator::engine::current_consumer(
            &self.nats.js,
            grizzly_coordinator::projection::PROJECTOR_CONSUMER,
        )
        .await
        .is_ok_and(|i| i.is_some_and(|i| i.num_pending == 0 && i.num_ack_pending == 0))
        {
            anyhow::ensure!(
                tokio::time::Instant::now() < until,
                "the workflow read model did not catch up with the log"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Waits until every partition of the log is routed and `replicas` listeners share them.
    pub async fn listeners_spread(
        &self,
        replicas: usize,
        deadline: Duration,
    ) -> anyhow::Result<std::collections::HashMap<u16, String>> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let owners = self.route_owners().await?;
            let distinct: std::collections::HashSet<&String> = owners.values().collect();
            if owners.len() == usize::from(self.settings.partitions) && distinct.len() == replicas {
                return Ok(owners);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < until,
                "partitions never spread over {replicas} listeners: {owners:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A listener replica with its own settings (e.g. `listener.id`).
    pub async fn start_listener_with(&self, settings: Settings) -> anyhow::Result<Component> {
        let nats = nats::connect(&settings.nats_url, "test-listener", false).await?;
        let listener = grizzly_listener::Listener::new(nats, settings, &self.handlers())?;
        Ok(spawn(|stop| listener.run(stop)))
    }

    pub async fn start_coordinator(&self) -> anyhow::Result<Component> {
        let nats = nats::connect(&self.settings.nats_url, "test-coordinator", false).await?;
        let coordinator = grizzly_coordinator::Coordinator::new(nats, self.settings.clone());
        Ok(spawn(|stop| coordinator.run(stop)))
    }

    /// The `grizzly` CLI against this environment (broker, handler and workflow directories).
    /// Async on purpose: the components under test run on the test's runtime, which a blocking
    /// wait for the CLI would stall.
    pub fn grizzly(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(bin_path("grizzly"));
        cmd.args(["--nats-url", &self.settings.nats_url])
            .env("GRIZZLY_HANDLERS_DIR", &self.settings.handlers_dir)
            .env("GRIZZLY_WORKFLOWS_DIR", &self.settings.workflows_dir)
            .kill_on_drop(true);
        cmd
    }

    pub async fn start_worker(&self) -> anyhow::Result<Component> {
        self.start_worker_with(self.settings.clone()).await
    }

    pub async fn start_worker_with(&self, mut settings: Settings) -> anyhow::Result<Component> {
        // In-process workers share a pid: give each its own identity (leases, heartbeats).
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        if settings.worker.id.is_none() {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            settings.worker.id = Some(format!("test-{}-{n}", std::process::id()));
        }
        let nats = nats::connect(&settings.nats_url, "test-worker", false).await?;
        let handlers = load_handlers(&settings.handlers_dir).expect("handlers load");
        let worker = grizzly_worker::Worker::new(nats, settings, &handlers)?;
        Ok(spawn(|stop| worker.run(stop)))
    }

    /// Publishes a body with a plain JetStream publish (no envelope, no headers).
    pub async fn publish_raw(
        &self,
        subject: &str,
        payload: impl Into<bytes::Bytes>,
    ) -> anyhow::Result<u64> {
        let ack = self
            .nats
            .js
            .publish(subject.to_string(), payload.into())
            .await?
            .await?;
        Ok(ack.sequence)
    }

    /// Deletes the coordinators' KV state (checkpoints, cursors, pinned versions), which a
    /// region promoted after a failover does not have.
    pub async fn delete_workflow_state(&self) -> anyhow::Result<()> {
        for bucket in [
            grizzly_coordinator::engine::INSTANCES_BUCKET,
            grizzly_coordinator::reader::CURSORS_BUCKET,
            grizzly_coordinator::registry::WORKFLOWS_BUCKET,
        ] {
            self.nats.js.delete_key_value(bucket).await?;
        }
        Ok(())
    }

    /// `grizzly workflow restore` for this deployment (its partition count).
    pub fn restore_command(&self) -> tokio::process::Command {
        let mut cmd = self.grizzly();
        cmd.args(["workflow", "restore"])
            .env("GRIZZLY_PARTITIONS", self.settings.partitions.to_string());
        cmd
    }

    /// `grizzly workflow restore` after [`Self::delete_workflow_state`]: whether it succeeded,
    /// and what it said.
    pub async fn restore_workflows(&self) -> anyhow::Result<(bool, String)> {
        self.delete_workflow_state().await?;
        let out = self.restore_command().output().await?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        ))
    }

    /// A watcher over `EVENTS` from the beginning.
    pub async fn watch(&self) -> anyhow::Result<EventWatcher> {
        EventWatcher::new(&self.nats.js, EVENTS_STREAM, "events.>").await
    }

    /// A watcher over the dead letters.
    pub async fn watch_dlq(&self) -> anyhow::Result<EventWatcher> {
        EventWatcher::new(&self.nats.js, nats::DLQ_STREAM, "dlq.>").await
    }
}

fn spawn<F, Fut>(f: F) -> Component
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let stop = CancellationToken::new();
    let handle = tokio::spawn(f(stop.clone()));
    Component {
        stop,
        handle: Some(handle),
    }
}

/// Reads a stream in order from the start and keeps everything it has read.
pub struct EventWatcher {
    messages: pull::Ordered,
    pub seen: Vec<LoggedEvent>,
}

impl EventWatcher {
    async fn new(js: &jetstream::Context, stream: &str, filter: &str) -> anyhow::Result<Self> {
        let stream = js.get_stream(stream).await?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: filter.to_string(),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await?;
        Ok(Self {
            messages: consumer.messages().await?,
            seen: Vec::new(),
        })
    }

    /// Reads until `done(&seen)` holds; fails with what was seen when `deadline` passes.
    pub async fn wait_until(
        &mut self,
        deadline: Duration,
        mut done: impl FnMut(&[LoggedEvent]) -> bool,
    ) -> anyhow::Result<&[LoggedEvent]> {
        let until = tokio::time::Instant::now() + deadline;
        while !done(&self.seen) {
            let next = tokio::time::timeout_at(until, self.messages.next()).await;
            match next {
                Ok(Some(Ok(msg))) => {
                    let stored = StoredMessage::from_jetstream(&msg).map_err(anyhow::Error::msg)?;
                    let event = EventEnvelope::from_stored(&stored, usize::MAX).ok();
                    self.seen.push(LoggedEvent {
                        seq: stored.stream_sequence,
                        subject: msg.subject.to_string(),
                        event,
                        payload: msg.payload.clone(),
                    });
                }
                Ok(Some(Err(e))) => bail!("reading the stream failed: {e}"),
                Ok(None) => bail!("stream of messages ended"),
                Err(_) => bail!(
                    "deadline of {deadline:?} passed; saw {} messages; last ones: {:#?}",
                    self.seen.len(),
                    self.seen
                        .iter()
                        .rev()
                        .take(5)
                        .map(|e| (&e.subject, String::from_utf8_lossy(&e.payload)))
                        .collect::<Vec<_>>()
                ),
            }
        }
        Ok(&self.seen)
    }

    /// Waits until `n` messages of `event_type` have been seen and returns them.
    pub async fn wait_for_type(
        &mut self,
        event_type: &str,
        n: usize,
        deadline: Duration,
    ) -> anyhow::Result<Vec<LoggedEvent>> {
        self.wait_until(deadline, |seen| {
            seen.iter().filter(|e| e.event_type() == event_type).count() >= n
        })
        .await?;
        Ok(self.of_type(event_type))
    }

    pub fn of_type(&self, event_type: &str) -> Vec<LoggedEvent> {
        self.seen
            .iter()
            .filter(|e| e.event_type() == event_type)
            .cloned()
            .collect()
    }
}

/// Path of a workspace binary (`cargo build --workspace` must have run; the README's test
/// command does that).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test-binary> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    dir.join(name)
}

/// Path of a tool from the project's tool directory (or PATH); panics with the fix if missing.
pub fn tool_path(name: &str) -> PathBuf {
    grizzly_shared::nats_server::find_in_tools_dir(name)
        .or_else(|| grizzly_shared::nats_server::find_on_path(name))
        .unwrap_or_else(|| {
            panic!("`{name}` is required by the tests: run `bash scripts/install-tools.sh`")
        })
}

/// A component running as a real child process (for crash tests): SIGKILL on drop.
pub struct ChildProcess {
    pub child: Child,
}

impl ChildProcess {
    /// Starts a workspace binary with `GRIZZLY_*` settings taken from `settings`.
    pub fn start(
        binary: &str,
        settings: &Settings,
        extra_env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let path = bin_path(binary);
        if !path.exists() {
            bail!(
                "{} is missing: run `cargo build --workspace` before the tests",
                path.display()
            );
        }
        let mut cmd = Command::new(&path);
        cmd.env("GRIZZLY_NATS_URL", &settings.nats_url)
            .env("GRIZZLY_HANDLERS_DIR", &settings.handlers_dir)
            .env("GRIZZLY_WORKFLOWS_DIR", &settings.workflows_dir)
            .env("GRIZZLY_PARTITIONS", settings.partitions.to_string())
            .env(
                "GRIZZLY_WORKER__LEASE_TTL",
                humantime::format_duration(settings.worker.lease_ttl).to_string(),
            )
            .env(
                "GRIZZLY_WORKER__ACK_WAIT",
                humantime::format_duration(settings.worker.ack_wait).to_string(),
            )
            .env("GRIZZLY_WORKER__CLAUDE_BIN", &settings.worker.claude_bin)
            .env("GRIZZLY_METRICS_ADDR", &settings.metrics_addr)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(mcp) = &settings.worker.mcp_bin {
            cmd.env("GRIZZLY_WORKER__MCP_BIN", mcp);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        Ok(Self {
            child: cmd.spawn()?,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for the process to drain and exit (SIGKILL after 20 s).
    pub async fn terminate(mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let until = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::time::Instant::now() < until && matches!(self.child.try_wait(), Ok(None)) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
