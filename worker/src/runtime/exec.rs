//! `exec`: one process per event — the legacy path, kept as the cold baseline.
//! The event envelope is written to stdin (then closed); stdout follows the JSON-lines contract
//! of [`super::lines`]; exit status 0 is success.

use std::collections::BTreeMap;
use std::process::Stdio;

use futures::future::BoxFuture;
use grizzly_shared::HandlerSpec;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use super::lines::{OutputLine, TextOutput, parse_line};
use super::{HandlerResult, Invocation, InvokeError, Runtime};

pub struct ExecRuntime {
    command: Vec<String>,
    env: BTreeMap<String, String>,
}

impl ExecRuntime {
    pub fn new(spec: &HandlerSpec) -> Self {
        Self {
            command: spec.command.clone(),
            env: spec.env.clone(),
        }
    }

    async fn run(&self, invocation: &Invocation<'_>) -> Result<HandlerResult, InvokeError> {
        let (program, args) = self
            .command
            .split_first()
            .ok_or_else(|| InvokeError::Start("empty command".into()))?;
        let mut child = Command::new(program)
            .args(args)
            .envs(&self.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| InvokeError::Start(format!("{program}: {e}")))?;
        let mut stdin = child.stdin.take().expect("piped");
        let input = invocation.request();
        // A handler that does not read stdin must not fail the event: ignore a broken pipe.
        let _ = stdin.write_all(&input).await;
        let _ = stdin.write_all(b"\n").await;
        drop(stdin);

        let mut stderr = child.stderr.take().expect("piped");
        let stderr_task = tokio::spawn(async move {
            let mut buf = Vec::new();
            let _ = stderr.read_to_end(&mut buf).await;
            String::from_utf8_lossy(&buf).into_owned()
        });
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut result = HandlerResult::default();
        let mut text = TextOutput::default();
        while let Ok(Some(line)) = lines.next_line().await {
            match parse_line(&line) {
                OutputLine::Event(e) => result.emitted.push(e),
                // `done` lines mean nothing special to a one-shot process: keep them as text.
                OutputLine::Done(_) | OutputLine::Text(_) => text.push(&line),
            }
        }
        let status = child
            .wait()
            .await
            .map_err(|e| InvokeError::Crashed(e.to_string()))?;
        let stderr = stderr_task.await.unwrap_or_default();
        if !status.success() {
            return Err(InvokeError::Failed(format!(
                "{program} exited with {status}: {}",
                tail(&stderr)
            )));
        }
        result.output = text.into_value();
        result.details.insert("exit_code".into(), Value::from(0));
        Ok(result)
    }
}

/// The last few lines of a process's stderr, for error messages.
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    let joined: Vec<&str> = lines.into_iter().rev().collect();
    joined.join(" | ")
}

impl Runtime for ExecRuntime {
    fn invoke<'a>(
        &'a self,
        invocation: Invocation<'a>,
    ) -> BoxFuture<'a, Result<HandlerResult, InvokeError>> {
        Box::pin(async move {
            // Dropping the future on timeout kills the child (kill_on_drop).
            match tokio::time::timeout(invocation.timeout, self.run(&invocation)).await {
                Ok(result) => result,
                Err(_) => Err(InvokeError::Timeout(invocation.timeout)),
            }
        })
    }
}
