//! `grizzly handler validate`: check handler files without starting anything.

use std::path::PathBuf;
use std::process::ExitCode;

use grizzly_shared::Settings;
use grizzly_shared::handler::{load_handlers, parse_handler};

#[derive(clap::Subcommand)]
pub enum HandlerCommand {
    /// Validate handler files (or directories of them); prints every problem with file:line:column.
    Validate {
        /// Files or directories (default: the handlers directory).
        paths: Vec<PathBuf>,
    },
}

pub fn run(settings: &Settings, cmd: HandlerCommand) -> anyhow::Result<ExitCode> {
    let HandlerCommand::Validate { mut paths } = cmd;
    if paths.is_empty() {
        paths.push(settings.handlers_dir.clone());
    }
    let mut problems = 0;
    let mut ok = 0;
    for path in paths {
        let result = if path.is_dir() {
            load_handlers(&path).map(|hs| hs.len()).map_err(|e| e.0)
        } else {
            match std::fs::read_to_string(&path) {
                Ok(text) => parse_handler(&path, &text).map(|_| 1),
                Err(e) => {
                    eprintln!("{}: cannot read: {e}", path.display());
                    problems += 1;
                    continue;
                }
            }
        };
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
