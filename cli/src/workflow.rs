//! `grizzly workflow ...`: validate, start and inspect workflows (being built).

use std::process::ExitCode;

use grizzly_shared::Settings;

#[derive(clap::Subcommand)]
pub enum WorkflowCommand {
    /// Validate workflow files.
    Validate { paths: Vec<std::path::PathBuf> },
}

pub async fn run(_settings: &Settings, _cmd: WorkflowCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("workflows are not available yet")
}
