//! `grizzly dev`: the whole system on one machine — an embedded `nats-server` child (store in
//! `.grizzly/`, fsync on every write), then the listener, coordinator and worker in-process,
//! loading `./handlers` and `./workflows`. Ctrl-C drains the components and stops the broker
//! cleanly; the store stays for the next start.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use grizzly_shared::Settings;
use grizzly_shared::handler::load_handlers;
use grizzly_shared::http::ObservabilityServer;
use grizzly_shared::nats;
use grizzly_shared::nats_server::{NatsServer, NatsServerOptions};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::thread::{Component, spawn_component};

#[derive(clap::Args)]
pub struct DevArgs {
    /// Where the broker keeps its store.
    #[arg(long, default_value = ".grizzly")]
    pub state_dir: PathBuf,
    /// Offline demo: start the bundled fake Anthropic API and point Claude Code at it
    /// (no API key needed; replies are canned).
    #[arg(long)]
    pub fake_api: bool,
    /// Let the broker use its default fsync interval (faster, not crash-safe).
    #[arg(long)]
    pub no_fsync: bool,
}

pub async fn run(mut settings: Settings, args: DevArgs) -> anyhow::Result<ExitCode> {
    let (host, port) = host_port(&settings.nats_url)?;
    let mut options = NatsServerOptions::new(args.state_dir.join("nats"));
    options.host = host;
    options.port = Some(port);
    options.sync_always = !args.no_fsync;
    let mut server = NatsServer::start(options)
        .await
        .context("starting the embedded nats-server")?;
    settings.nats_url = server.url();
    info!(url = %settings.nats_url, store = %server.store_dir().display(), "nats-server ready");

    let _fake = if args.fake_api {
        let fake = grizzly_devkit::FakeMessagesApi::start(Default::default()).await?;
        eprintln!(
            "OFFLINE DEMO: Claude Code talks to the fake Anthropic API at {} (canned replies)",
            fake.base_url()
        );
        for (k, v) in fake.claude_env() {
            settings.worker.handler_env.insert(k.to_string(), v);
        }
        Some(fake)
    } else {
        None
    };
    if settings.worker.mcp_bin.is_none() {
        settings.worker.mcp_bin = Some(std::env::current_exe()?.display().to_string());
    }
    let handlers = load_handlers(&settings.handlers_dir)
        .with_context(|| format!("loading handlers from {}", settings.handlers_dir.display()))?;
    let shutdown = grizzly_shared::shutdown::on_signal();
    let connect = |name: &'static str| nats::connect(&settings.nats_url, name, false);
    nats::ensure_streams(&connect("grizzly-dev").await?.js, &settings.streams).await?;
    // One endpoint for the three components; loopback unless configured otherwise.
    if settings.metrics_addr == grizzly_shared::config::DEFAULT_METRICS_ADDR {
        settings.metrics_addr = "127.0.0.1:9090".into();
    }
    let ops = ObservabilityServer::start_or_warn(&settings.metrics_addr).await;
    // Registers a component's connection with the health endpoint.
    let track = |component: &'static str| {
        let (health, stop) = (
            ops.as_ref().map(|ops| ops.health().clone()),
            shutdown.clone(),
        );
        move |nats: &nats::Nats, settings: &Settings| {
            if let Some(health) = &health {
                health.track(component, nats, settings, stop);
            }
        }
    };

    // The listener and the worker each on a thread of their own, as their binaries run.
    let start = |component: Component, client| {
        let (settings, handlers, stop) = (settings.clone(), handlers.clone(), shutdown.clone());
        let connected = track(component.name());
        spawn_component(component, client, settings, handlers, stop, connected)
    };
    let listener = start(Component::Listener, "grizzly-listener").await?;
    let worker = start(Component::Worker, "grizzly-worker").await?;
    let nats = connect("grizzly-coordinator").await?;
    track("coordinator")(&nats, &settings);
    let coordinator = grizzly_coordinator::Coordinator::new(nats, settings.clone());
    eprintln!(
        "grizzly dev: broker {} | {} handler(s) from {} | Ctrl-C to stop\n  try: grizzly emit events.agent.a1.ping '{{\"x\":1}}'  and  grizzly events tail",
        settings.nats_url,
        handlers.len(),
        settings.handlers_dir.display()
    );
    if let Some(ops) = &ops {
        eprintln!("  metrics: {0}/metrics  health: {0}/readyz", ops.url());
    }
    let results = tokio::join!(
        component("listener", shutdown.clone(), listener),
        component(
            "coordinator",
            shutdown.clone(),
            coordinator.run(shutdown.clone())
        ),
        component("worker", shutdown.clone(), worker),
    );
    server.stop();
    eprintln!(
        "grizzly dev stopped; the store in {} is kept",
        args.state_dir.display()
    );
    for r in [results.0, results.1, results.2] {
        r?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs one component; if it fails, the others are stopped too.
async fn component(
    name: &str,
    shutdown: CancellationToken,
    run: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let result = run.await.with_context(|| format!("{name} failed"));
    if result.is_err() {
        shutdown.cancel();
    }
    result
}

fn host_port(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .split("://")
        .nth(1)
        .with_context(|| format!("GRIZZLY_NATS_URL `{url}` has no scheme"))?;
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    let (host, port) = rest.rsplit_once(':').unwrap_or((rest, "4222"));
    let port = port
        .trim_end_matches('/')
        .parse()
        .with_context(|| format!("bad port in `{url}`"))?;
    Ok((host.to_string(), port))
}
