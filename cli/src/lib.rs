//! The `grizzly` command line. Each subcommand lives in its own module; this file only parses
//! and dispatches.

pub mod bench;
pub mod causation;
pub mod cursors;
pub mod dev;
pub mod dlq;
pub mod emit;
pub mod events;
pub mod fold;
pub mod handlers;
pub mod thread;
pub mod usage;
pub mod workflow;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use grizzly_shared::config::ComponentArgs;

#[derive(Parser)]
#[command(
    name = "grizzly",
    version,
    about = "Grizzly: event-sourced agentic workflows on NATS JetStream"
)]
pub struct Cli {
    #[command(flatten)]
    pub args: ComponentArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run everything on this machine: embedded nats-server, listener, coordinator, worker.
    Dev(dev::DevArgs),
    /// Append an event: `grizzly emit events.agent.a1.ping '{"x":1}'`.
    Emit(emit::EmitArgs),
    /// Read the event log.
    #[command(subcommand)]
    Events(events::EventsCommand),
    /// Inspect and redrive dead letters.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Handler definitions.
    #[command(subcommand)]
    Handler(handlers::HandlerCommand),
    /// Workflows: validate, schema, start, status, list, suspend, resume, cancel, test, docs.
    #[command(subcommand)]
    Workflow(workflow::WorkflowCommand),
    /// Where each listener and coordinator partition resumes reading the log; set them all to
    /// one point when taking over a log whose routing state is gone (e.g. after a failover).
    #[command(subcommand)]
    Cursors(cursors::CursorsCommand),
    /// Benchmarks, each against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// MCP stdio server exposing `emit_event` (what pooled Claude Code instances use).
    Mcp,
    /// Fake Anthropic Messages API for offline demos and tests (never used unless asked for).
    FakeApi {
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if matches!(cli.command, Command::Mcp) {
        // stdout is the MCP protocol: nothing else may print there.
        grizzly_worker::mcp::serve_stdio().await?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut settings = cli.args.load()?;
    if matches!(cli.command, Command::Bench(_)) && std::env::var_os("GRIZZLY_LOG").is_none() {
        // A bench prints tables; the components it runs log errors only unless asked.
        settings.log = "error".into();
    }
    // Held until the command ends: flushes its spans (e.g. `emit`'s root span) on the way out.
    let _telemetry = grizzly_shared::telemetry::init(&settings.log_format, &settings.log);
    match cli.command {
        Command::Dev(args) => dev::run(settings, args).await,
        Command::Emit(args) => emit::run(&settings, args).await,
        Command::Bench(cmd) => bench::run(&settings, cmd).await,
        Command::Events(cmd) => events::run(&settings, cmd).await,
        Command::Dlq(cmd) => dlq::run(&settings, cmd).await,
        Command::Handler(cmd) => handlers::run(&settings, cmd).await,
        Command::Workflow(cmd) => workflow::run(&settings, cmd).await,
        Command::Cursors(cmd) => cursors::run(&settings, cmd).await,
        Command::FakeApi { port } => {
            grizzly_devkit::serve_forever(grizzly_devkit::FakeApiConfig::with_port(port)).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Mcp => unreachable!("handled above"),
    }
}
