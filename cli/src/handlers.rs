//! `grizzly handler validate`: check handler files without starting anything.

use std::path::PathBuf;
use std::process::ExitCode;

use grizzly_shared::Settings;
use grizzly_shared::flowspec::settings_problems;
use grizzly_shared::handler::{load_handlers, locate_error, parse_handler};

#[derive(clap::Subcommand)]
pub enum HandlerCommand {
    /// The handlers defined here, with the live workers serving each and their health.
    List,
    /// Validate handler files (or directories of them); prints every problem with file:line:column.
    Validate {
        /// Files or directories (default: the handlers directory).
        paths: Vec<PathBuf>,
    },
}

pub async fn run(settings: &Settings, cmd: HandlerCommand) -> anyhow::Result<ExitCode> {
    let mut paths = match cmd {
        HandlerCommand::List => return list(settings).await,
        HandlerCommand::Validate { paths } => paths,
    };
    if paths.is_empty() {
        paths.push(settings.handlers_dir.clone());
    }
    let mut problems = 0;
    let mut ok = 0;
    for path in paths {
        let result = if path.is_dir() {
            load_handlers(&path).map_err(|e| e.0)
        } else {
            match std::fs::read_to_string(&path) {
                Ok(text) => parse_handler(&path, &text).map(|h| vec![h]),
                Err(e) => {
                    eprintln!("{}: cannot read: {e}", path.display());
                    problems += 1;
                    continue;
                }
            }
        };
        // Checks against this deployment's settings (a batch must close before `ack_wait`).
        let result = result.and_then(|handlers| {
            let errors: Vec<_> = handlers
                .iter()
                .flat_map(|h| {
                    let text = std::fs::read_to_string(&h.path).unwrap_or_default();
                    settings_problems(&h.spec, settings.worker.ack_wait)
                        .into_iter()
                        .map(move |m| locate_error(&h.path, &text, m))
                })
                .collect();
            if errors.is_empty() {
                Ok(handlers.len())
            } else {
                Err(errors)
            }
        });
        match result {
            Ok(n) => ok += n,
            Err(errors) => {
                for e in &errors {
                    eprintln!("{e}");
                }
                problems += errors.len();
            }
        }
    }
    if problems > 0 {
        eprintln!("{problems} problem(s)");
        return Ok(ExitCode::FAILURE);
    }
    println!("{ok} handler(s) valid");
    Ok(ExitCode::SUCCESS)
}

async fn list(settings: &Settings) -> anyhow::Result<ExitCode> {
    let handlers = load_handlers(&settings.handlers_dir)?;
    let nats =
        grizzly_shared::nats::connect(&settings.nats_url, "grizzly-handler-list", false).await?;
    let leases = grizzly_shared::nats::ensure_lease_bucket(
        &nats.js,
        settings.worker.lease_ttl,
        settings.streams.replicas,
    )
    .await?;
    let health = grizzly_listener::health::HandlerHealth::read(&leases).await?;
    println!(
        "{:<20} {:>7} {:<8} {:<18} {:<24} on",
        "handler", "version", "kind", "health", "capabilities"
    );
    for h in &handlers {
        let s = &h.spec;
        let state = match health.workers(&s.name) {
            (0, _) => "no workers".to_string(),
            (live, open) if open >= live => format!("breaker open ({live})"),
            (live, _) => format!("healthy ({live})"),
        };
        println!(
            "{:<20} {:>7} {:<8} {:<18} {:<24} {}",
            s.name,
            s.version,
            s.kind.to_string(),
            state,
            s.capabilities.join(","),
            s.on.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}
