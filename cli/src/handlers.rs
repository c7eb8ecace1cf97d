//! `grizzly handler ...`: validate handler files, and manage the handler registry (register,
//! list, drain, activate, retire, pin) that listeners route from and workers run from.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::stream::RawMessageErrorKind;
use grizzly_shared::Settings;
use grizzly_shared::handler::{LoadedHandler, load_handlers, parse_handler};
use grizzly_shared::nats::{Nats, TASKS_STREAM};
use grizzly_shared::registry::{HandlerRegistry, Registered, VersionState};
use grizzly_shared::subject::task_filter;

#[derive(clap::Subcommand)]
pub enum HandlerCommand {
    /// Every registered handler version: its state, whether new events go to it, the live
    /// workers serving the handler and their health.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Validate handler files (or directories of them); prints every problem with file:line:column.
    Validate {
        /// Files or directories (default: the handlers directory).
        paths: Vec<PathBuf>,
    },
    /// Register handler files (or directories) as new versions; running listeners and workers
    /// pick them up at once. A version is immutable: changed content needs a new `version`.
    Register {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Stop sending new events to a version; tasks already routed to it still run on it.
    Drain {
        name: String,
        #[arg(long)]
        version: u32,
        /// Drain even the handler's only active version (its events then go nowhere).
        #[arg(long)]
        force: bool,
    },
    /// Send new events to a draining version again.
    Activate {
        name: String,
        #[arg(long)]
        version: u32,
    },
    /// Drain a version, wait until no task of it is left, then retire it (workers drop it).
    Retire {
        name: String,
        #[arg(long)]
        version: u32,
        #[arg(long)]
        force: bool,
        /// How long to wait for its tasks to finish.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Send new events of a handler to this version instead of the newest.
    Pin {
        name: String,
        #[arg(long)]
        version: u32,
    },
    /// Undo `pin`: new events go to the newest active version.
    Unpin { name: String },
}

pub async fn run(settings: &Settings, cmd: HandlerCommand) -> anyhow::Result<ExitCode> {
    let mut paths = match cmd {
        HandlerCommand::Validate { paths } => paths,
        HandlerCommand::List { json } => return list(settings, json).await,
        HandlerCommand::Register { paths } => return register(settings, paths).await,
        HandlerCommand::Drain {
            name,
            version,
            force,
        } => {
            let (_, registry) = open(settings).await?;
            let r = registry.drain(&name, version, force).await?;
            println!("{name} v{version} {}", r.state);
            return Ok(ExitCode::SUCCESS);
        }
        HandlerCommand::Activate { name, version } => {
            let (_, registry) = open(settings).await?;
            let r = registry.activate(&name, version).await?;
            println!("{name} v{version} {}", r.state);
            return Ok(ExitCode::SUCCESS);
        }
        HandlerCommand::Retire {
            name,
            version,
            force,
            timeout,
        } => return retire(settings, &name, version, force, timeout).await,
        HandlerCommand::Pin { name, version } => {
            let (_, registry) = open(settings).await?;
            registry.pin(&name, Some(version)).await?;
            println!("new events of {name} go to v{version}");
            return Ok(ExitCode::SUCCESS);
        }
        HandlerCommand::Unpin { name } => {
            let (_, registry) = open(settings).await?;
            registry.pin(&name, None).await?;
            println!("new events of {name} go to its newest active version");
            return Ok(ExitCode::SUCCESS);
        }
    };
    if paths.is_empty() {
        paths.push(settings.handlers_dir.clone());
    }
    let (handlers, mut problems) = load_paths(&paths);
    // Checks against this deployment's settings (a batch must close before `ack_wait`).
    for e in handlers
        .iter()
        .flat_map(|h| h.settings_errors(settings.worker.ack_wait))
    {
        eprintln!("{e}");
        problems += 1;
    }
    if problems > 0 {
        eprintln!("{problems} problem(s)");
        return Ok(ExitCode::FAILURE);
    }
    let ok = handlers.len();
    println!("{ok} handler(s) valid");
    Ok(ExitCode::SUCCESS)
}

/// Loads handler files and directories of them; prints every problem (file:line:column) and
/// returns what loaded with the number of problems.
fn load_paths(paths: &[PathBuf]) -> (Vec<LoadedHandler>, usize) {
    let mut handlers = Vec::new();
    let mut problems = 0;
    for path in paths {
        let loaded = if path.is_dir() {
            load_handlers(path).map_err(|e| e.0)
        } else {
            match std::fs::read_to_string(path) {
                Ok(text) => parse_handler(path, &text).map(|h| vec![h]),
                Err(e) => {
                    eprintln!("{}: cannot read: {e}", path.display());
                    problems += 1;
                    continue;
                }
            }
        };
        match loaded {
            Ok(mut hs) => handlers.append(&mut hs),
            Err(errors) => {
                for e in &errors {
                    eprintln!("{e}");
                }
                problems += errors.len();
            }
        }
    }
    (handlers, problems)
}

async fn open(settings: &Settings) -> anyhow::Result<(Nats, HandlerRegistry)> {
    let nats = grizzly_shared::nats::connect(&settings.nats_url, "grizzly-handler", false).await?;
    let registry = HandlerRegistry::open(&nats.js, settings.streams.replicas).await?;
    Ok((nats, registry))
}

/// Validates every file first; registers only when all are valid.
async fn register(settings: &Settings, paths: Vec<PathBuf>) -> anyhow::Result<ExitCode> {
    let (handlers, problems) = load_paths(&paths);
    if problems > 0 {
        eprintln!("{problems} problem(s); nothing registered");
        return Ok(ExitCode::FAILURE);
    }
    let (_, registry) = open(settings).await?;
    let mut failed = false;
    for h in &handlers {
        let (name, version) = (&h.spec.name, h.spec.version);
        match registry.register(h).await {
            Ok(Registered::New) => println!("{name} v{version} registered"),
            Ok(Registered::Unchanged(state)) => {
                println!("{name} v{version} already registered ({state})")
            }
            Err(e) => {
                eprintln!("{}: {e}", h.path.display());
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Drain, wait until `TASKS` holds no task of the version (a task stays there until its
/// outcome is written and it is acked), then retire.
async fn retire(
    settings: &Settings,
    name: &str,
    version: u32,
    force: bool,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let (nats, registry) = open(settings).await?;
    let record = registry.record(name, version).await?;
    if record.state == VersionState::Retired {
        println!("{name} v{version} retired");
        return Ok(ExitCode::SUCCESS);
    }
    registry.drain(name, version, force).await?;
    println!("{name} v{version} draining");
    // Listeners see the drain within moments; a task routed just before then is in TASKS by
    // the time this grace has passed, so the scan below sees it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let until = tokio::time::Instant::now() + timeout;
    loop {
        let left = tasks_of(&nats, name, version).await?;
        if left == 0 {
            break;
        }
        if tokio::time::Instant::now() >= until {
            eprintln!(
                "{name} v{version}: {left} task(s) still to run after {timeout:?}; it stays draining (run retire again to finish)"
            );
            return Ok(ExitCode::FAILURE);
        }
        println!("{name} v{version}: waiting for {left} task(s)");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    registry.mark_retired(name, version).await?;
    println!("{name} v{version} retired");
    Ok(ExitCode::SUCCESS)
}

/// Tasks of `name` at `version` still in `TASKS` (waiting or running): a walk over the
/// stored tasks of the handler (a work queue allows no second consumer, so by direct reads).
async fn tasks_of(nats: &Nats, name: &str, version: u32) -> anyhow::Result<usize> {
    let stream = nats.js.get_stream(TASKS_STREAM).await.context("TASKS")?;
    let mut next = 1;
    let mut count = 0;
    loop {
        let msg = match stream
            .raw_message_builder()
            .sequence(next)
            .next_by_subject(task_filter(name))
            .send()
            .await
        {
            Ok(m) => m,
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return Ok(count),
            Err(e) => return Err(e).context("reading TASKS"),
        };
        next = msg.sequence + 1;
        let task: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap_or_default();
        if task["handler_version"].as_u64() == Some(u64::from(version)) {
            count += 1;
        }
    }
}

async fn list(settings: &Settings, as_json: bool) -> anyhow::Result<ExitCode> {
    let (nats, registry) = open(settings).await?;
    let snapshot = registry.snapshot().await?;
    let leases = grizzly_shared::nats::ensure_lease_bucket(
        &nats.js,
        settings.worker.lease_ttl,
        settings.streams.replicas,
    )
    .await?;
    let health = grizzly_listener::health::HandlerHealth::read(&leases).await?;
    let mut rows = Vec::new();
    for (name, versions) in &snapshot.handlers {
        let routed = snapshot.routing_version(name).map(|r| r.version);
        let health = match health.workers(name) {
            (0, _) => "no workers".to_string(),
            (live, open) if open >= live => format!("breaker open ({live})"),
            (live, _) => format!("healthy ({live})"),
        };
        for r in versions.values() {
            let spec = r.handler(&settings.handlers_dir).ok().map(|h| h.spec);
            rows.push(serde_json::json!({
                "handler": name,
                "version": r.version,
                "state": r.state,
                "routed": routed == Some(r.version),
                "pinned": snapshot.pins.get(name) == Some(&r.version),
                "health": health,
                "kind": spec.as_ref().map(|s| s.kind.to_string()),
                "capabilities": spec.as_ref().map(|s| s.capabilities.clone()).unwrap_or_default(),
                "on": spec.as_ref().map(|s| s.on.clone()).unwrap_or_default(),
            }));
        }
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:>7} {:<9} {:<6} {:<8} {:<18} {:<24} on",
        "handler", "version", "state", "routed", "kind", "health", "capabilities"
    );
    for r in &rows {
        let text = |k: &str| r[k].as_str().unwrap_or("-").to_string();
        let list = |k: &str| {
            r[k].as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(if k == "on" { " " } else { "," })
                })
                .unwrap_or_default()
        };
        let routed = match (r["routed"].as_bool(), r["pinned"].as_bool()) {
            (Some(true), Some(true)) => "pinned",
            (Some(true), _) => "yes",
            _ => "",
        };
        println!(
            "{:<20} {:>7} {:<9} {:<6} {:<8} {:<18} {:<24} {}",
            text("handler"),
            r["version"],
            text("state"),
            routed,
            text("kind"),
            text("health"),
            list("capabilities"),
            list("on")
        );
    }
    Ok(ExitCode::SUCCESS)
}
