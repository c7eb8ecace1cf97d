//! `process`: a pool of persistent processes speaking JSON lines. Each request is one line (the
//! event envelope); the process answers with event lines and ends the reply with a terminator
//! `{"done": true, ...}` (see [`super::lines`]). One request at a time per process; the pool's
//! `max` is the handler's concurrency.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use grizzly_shared::HandlerSpec;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tracing::debug;

use super::lines::{OutputLine, TextOutput, parse_line};
use super::{HandlerResult, Invocation, InvokeError, Runtime};
use crate::pool::{Instance, Pool};

pub struct ProcessInstance {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    turns: u32,
    max_turns: u32,
    broken: bool,
}

impl ProcessInstance {
    async fn start(
        command: Vec<String>,
        env: BTreeMap<String, String>,
        max_turns: u32,
    ) -> Result<Self, String> {
        let (program, args) = command.split_first().ok_or("empty command")?;
        let mut child = Command::new(program)
            .args(args)
            .envs(&env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("{program}: {e}"))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped")).lines();
        Ok(Self {
            child,
            stdin,
            stdout,
            turns: 0,
            max_turns,
            broken: false,
        })
    }

    /// One request/reply exchange. `line` is the request with its terminating newline, written
    /// in one call: the pipe is unbuffered, so each write is a system call and may wake the
    /// process once more (a line-at-a-time reader such as `sed -u` reads it byte by byte).
    async fn turn(&mut self, line: &[u8]) -> Result<HandlerResult, InvokeError> {
        self.turns += 1;
        let write = async {
            self.stdin.write_all(line).await?;
            self.stdin.flush().await
        };
        if let Err(e) = write.await {
            self.broken = true;
            return Err(InvokeError::Crashed(format!("writing request: {e}")));
        }
        let mut result = HandlerResult::default();
        let mut text = TextOutput::default();
        loop {
            match self.stdout.next_line().await {
                Ok(Some(line)) => match parse_line(&line) {
                    OutputLine::Event(e) => result.emitted.push(e),
                    OutputLine::Text(t) => text.push(&t),
                    OutputLine::Done(Ok(output)) => {
                        result.output = if output.is_null() {
                            text.into_value()
                        } else {
                            output
                        };
                        return Ok(result);
                    }
                    OutputLine::Done(Err(error)) => return Err(InvokeError::Failed(error)),
                },
                Ok(None) => {
                    self.broken = true;
                    let status = self.child.try_wait().ok().flatten();
                    return Err(InvokeError::Crashed(format!(
                        "process closed its output before the terminator (exit: {status:?})"
                    )));
                }
                Err(e) => {
                    self.broken = true;
                    return Err(InvokeError::Crashed(format!("reading reply: {e}")));
                }
            }
        }
    }
}

impl Instance for ProcessInstance {
    fn is_alive(&mut self) -> bool {
        !self.broken && matches!(self.child.try_wait(), Ok(None))
    }

    fn needs_recycle(&mut self) -> bool {
        self.max_turns > 0 && self.turns >= self.max_turns
    }

    fn stop(mut self) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            // Closing stdin asks a well-behaved process to exit; force after a grace period.
            drop(self.stdin);
            if tokio::time::timeout(Duration::from_secs(2), self.child.wait())
                .await
                .is_err()
            {
                let _ = self.child.kill().await;
            }
        })
    }
}

pub struct ProcessRuntime {
    pool: Pool<ProcessInstance>,
}

impl ProcessRuntime {
    pub fn new(spec: &HandlerSpec) -> Self {
        let command = spec.command.clone();
        let env = spec.env.clone();
        // 0 = never: a persistent script is replaced only when asked for.
        let max_turns = spec.recycle.as_ref().map_or(0, |r| r.max_turns);
        let spawner = Arc::new(move || {
            let command = command.clone();
            let env = env.clone();
            Box::pin(ProcessInstance::start(command, env, max_turns)) as BoxFuture<'static, _>
        });
        Self {
            pool: Pool::new(
                spec.pool.min,
                spec.pool_max(),
                Duration::from_secs(60),
                spawner,
            ),
        }
    }

    pub fn pool(&self) -> &Pool<ProcessInstance> {
        &self.pool
    }
}

impl Runtime for ProcessRuntime {
    fn invoke<'a>(
        &'a self,
        invocation: Invocation<'a>,
    ) -> BoxFuture<'a, Result<HandlerResult, InvokeError>> {
        Box::pin(async move {
            let mut lease = self.pool.checkout(None).await.map_err(InvokeError::Start)?;
            let mut line = invocation.request();
            line.push(b'\n');
            let outcome =
                tokio::time::timeout(invocation.timeout, lease.instance.turn(&line)).await;
            let (result, healthy) = match outcome {
                Ok(Ok(r)) => (Ok(r), true),
                // A handler-reported error leaves the process in a clean state.
                Ok(Err(InvokeError::Failed(e))) => (Err(InvokeError::Failed(e)), true),
                Ok(Err(e)) => (Err(e), false),
                Err(_) => {
                    debug!("process turn timed out; replacing the instance");
                    (Err(InvokeError::Timeout(invocation.timeout)), false)
                }
            };
            self.pool.checkin(lease, healthy).await;
            result.map(|mut r| {
                r.details.insert(
                    "pool".into(),
                    serde_json::to_value(self.pool.stats_now()).unwrap_or(Value::Null),
                );
                r
            })
        })
    }

    fn state(&self) -> Value {
        serde_json::to_value(self.pool.stats_now()).unwrap_or(Value::Null)
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.pool.shutdown(Duration::from_secs(30)))
    }
}
