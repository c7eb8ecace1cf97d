//! Shared test helpers: a minimal hyper HTTP/1 client with SSE parsing, and a
//! driver for a warm Claude Code CLI process in stream-json mode.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use grizzly_devkit::{FakeApiHandle, find_claude_cli};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::time::timeout;

pub const DEADLINE: Duration = Duration::from_secs(10);

/// One request on a fresh connection; returns the response with its body
/// still unread (so stalls can be observed frame by frame).
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Response<Incoming>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .header("x-api-key", "sk-test")
        .body(Full::new(Bytes::from(bytes)))?;
    Ok(timeout(DEADLINE, sender.send_request(req)).await??)
}

pub async fn body_text(resp: Response<Incoming>) -> anyhow::Result<String> {
    let bytes = timeout(DEADLINE, resp.into_body().collect())
        .await??
        .to_bytes();
    Ok(String::from_utf8(bytes.to_vec())?)
}

/// Request + whole body parsed as JSON.
pub async fn send_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let resp = send(addr, method, path, body).await?;
    let status = resp.status().as_u16();
    let text = body_text(resp).await?;
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text)?
    };
    Ok((status, value))
}

/// Parses an SSE body into `(event name, data JSON)` pairs.
pub fn parse_sse(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let mut name = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            (name, serde_json::from_str(&data).unwrap_or(Value::Null))
        })
        .collect()
}

/// A streaming `/v1/messages` request body as Claude Code would send it.
pub fn messages_request(messages: Value, tools: Value) -> Value {
    json!({"model": "claude-test", "max_tokens": 1024, "stream": true,
           "messages": messages, "tools": tools})
}

/// Path of the real CLI, or a failing error: these tests must not skip.
pub fn claude_bin() -> anyhow::Result<PathBuf> {
    let bin = find_claude_cli().context(
        "Claude Code CLI not found: expected $GRIZZLY_CLAUDE_BIN, <workspace>/.tools/bin/claude \
         (run scripts/install-tools.sh) or `claude` on PATH",
    )?;
    anyhow::ensure!(
        bin.is_file(),
        "Claude Code CLI {} does not exist",
        bin.display()
    );
    Ok(bin)
}

/// A warm `claude -p` process in stream-json mode, talking to the fake.
pub struct Claude {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: Arc<Mutex<String>>,
    pub home: tempfile::TempDir,
}

impl Claude {
    pub fn spawn(fake: &FakeApiHandle, extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::spawn_with_env(fake, extra_args, &[])
    }

    pub fn spawn_with_env(
        fake: &FakeApiHandle,
        extra_args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let home = tempfile::tempdir()?;
        let mut cmd = Command::new(claude_bin()?);
        cmd.args([
            "-p",
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
            "--verbose",
            "--bare",
            "--system-prompt",
            "You are a test agent",
            "--strict-mcp-config",
            "--no-session-persistence",
        ])
        .args(extra_args)
        .envs(fake.claude_env())
        .env("HOME", home.path())
        .env("IS_SANDBOX", "1")
        .envs(extra_env.iter().copied())
        .current_dir(home.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
        let mut child = cmd.spawn().context("spawning claude")?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().context("stderr")?;
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Ok(Self {
            child,
            stdin,
            stdout,
            stderr,
            home,
        })
    }

    pub fn home_path(&self) -> &Path {
        self.home.path()
    }

    pub async fn send(&mut self, content: &str) -> anyhow::Result<()> {
        let line = json!({"type": "user", "message": {"role": "user", "content": content}});
        self.stdin.write_all(format!("{line}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// Reads stdout lines until a `result` line (returned with everything
    /// before it), failing after `deadline` with the CLI's stderr attached.
    pub async fn read_result(&mut self, deadline: Duration) -> anyhow::Result<(Value, Vec<Value>)> {
        let mut seen = Vec::new();
        let read = async {
            while let Some(line) = self.stdout.next_line().await? {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if v["type"] == "result" {
                    return Ok(v);
                }
                seen.push(v);
            }
            bail!("claude stdout closed before a result line")
        };
        match timeout(deadline, read).await {
            Ok(Ok(result)) => Ok((result, seen)),
            Ok(Err(e)) => Err(e.context(self.diagnostics(&seen))),
            Err(_) => bail!(
                "no result line within {deadline:?}; {}",
                self.diagnostics(&seen)
            ),
        }
    }

    /// One warm turn: send, then wait for its result line.
    pub async fn turn(&mut self, content: &str, deadline: Duration) -> anyhow::Result<Value> {
        self.send(content).await?;
        Ok(self.read_result(deadline).await?.0)
    }

    fn diagnostics(&self, seen: &[Value]) -> String {
        let lines: Vec<String> = seen.iter().map(|v| v.to_string()).collect();
        format!(
            "stdout so far:\n{}\nstderr:\n{}",
            lines.join("\n"),
            self.stderr.lock().unwrap()
        )
    }

    pub async fn close(mut self) -> anyhow::Result<()> {
        drop(self.stdin);
        match timeout(DEADLINE, self.child.wait()).await {
            Ok(status) => {
                status?;
            }
            Err(_) => self.child.kill().await?,
        }
        Ok(())
    }
}
