//! One warm Claude Code process: how it is launched (flags, environment, its own HOME, working
//! directory and MCP config) and the stream-json turn protocol — one user line in, JSON lines
//! out until the `result` line, under a deadline and a silence watchdog.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use grizzly_shared::handler::{HandlerSpec, RecycleSpec};
use grizzly_shared::nats_server::{find_in_tools_dir, find_on_path};
use grizzly_shared::{EventEnvelope, Settings};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::time::{Instant, timeout_at};
use tracing::debug;

use crate::mcp::{NATS_URL_ENV, TURN_FILE_ENV, TurnContext};
use crate::pool::Instance;

const DEFAULT_SYSTEM_PROMPT: &str = "You are an event handler inside the Grizzly workflow engine. \
Do what the user message asks. Use the emit_event tool to append events to the log.";
/// With `--include-partial-messages` a live turn prints a line per streamed chunk, so this long
/// without any output means the CLI is stuck (anthropics/claude-code#39700, #53584), not slow.
const SILENCE_LIMIT: Duration = Duration::from_secs(120);
/// How long an interrupted turn gets to answer before its process is killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(2);
/// `/clear` makes no API request; it answers in ~10 ms.
const CLEAR_TIMEOUT: Duration = Duration::from_secs(15);
/// A fresh process answers its first line once started (~0.3–0.9 s; much longer while several
/// start at once on a loaded machine).
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STDERR_TAIL_LINES: usize = 20;

/// Everything needed to start an instance; built once per handler.
#[derive(Debug)]
pub struct Launch {
    pub handler: String,
    program: PathBuf,
    args: Vec<String>,
    mcp_program: PathBuf,
    nats_url: String,
    env: Vec<(String, String)>,
    /// Inherited variables that would change the CLI's behaviour behind our back.
    env_remove: Vec<OsString>,
    recycle: RecycleSpec,
    warmup: u32,
}

/// An absolute program path: names without a `/` are looked up in `.tools/bin`, then `PATH`.
fn resolve(program: &str) -> anyhow::Result<PathBuf> {
    if program.contains('/') {
        let path = PathBuf::from(program);
        anyhow::ensure!(path.is_file(), "`{program}` does not exist");
        return Ok(path);
    }
    find_in_tools_dir(program)
        .or_else(|| find_on_path(program))
        .ok_or_else(|| anyhow::anyhow!("`{program}` is not in .tools/bin or on PATH"))
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

impl Launch {
    pub fn new(spec: &HandlerSpec, settings: &Settings) -> anyhow::Result<Self> {
        let program = resolve(&settings.worker.claude_bin).map_err(|e| {
            anyhow::anyhow!(
                "worker.claude_bin: {e} (install Claude Code: scripts/install-tools.sh)"
            )
        })?;
        let mcp_program = match &settings.worker.mcp_bin {
            Some(bin) => resolve(bin).map_err(|e| anyhow::anyhow!("worker.mcp_bin: {e}"))?,
            None => std::env::current_exe()?,
        };
        let mut args: Vec<String> = [
            "-p",
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
            "--verbose",
            // Feeds the silence watchdog: a live turn streams a line per chunk.
            "--include-partial-messages",
            // Lean start: no hooks, plugins, CLAUDE.md discovery; ~50x smaller requests.
            "--bare",
            "--setting-sources",
            "",
            "--no-session-persistence",
            "--strict-mcp-config",
            "--permission-mode",
            "bypassPermissions",
        ]
        .map(String::from)
        .to_vec();
        let system_prompt = spec
            .system_prompt
            .as_deref()
            .unwrap_or(DEFAULT_SYSTEM_PROMPT);
        args.extend(["--system-prompt".into(), system_prompt.into()]);
        args.extend(["--tools".into(), spec.tools.join(",")]);
        args.push("--allowedTools".into());
        args.push(format!("mcp__grizzly__{}", crate::mcp::TOOL_NAME));
        args.extend(spec.allowed_tools.iter().cloned());
        if let Some(model) = &spec.model {
            args.extend(["--model".into(), model.clone()]);
        }
        if let Some(budget) = spec.max_budget_usd {
            args.extend(["--max-budget-usd".into(), budget.to_string()]);
        }
        let mut env = vec![
            ("DISABLE_TELEMETRY".to_string(), "1".to_string()),
            (
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".into(),
                "1".into(),
            ),
        ];
        if running_as_root() {
            // bypassPermissions refuses to run as root otherwise.
            env.push(("IS_SANDBOX".into(), "1".into()));
        }
        // Worker-wide handler environment, then the handler's own (which wins).
        env.extend(
            settings
                .worker
                .handler_env
                .iter()
                .chain(&spec.env)
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        let env_remove = std::env::vars_os()
            .map(|(k, _)| k)
            .filter(|k| {
                let k = k.to_string_lossy();
                k == "CLAUDECODE"
                    || k == "CLAUDE_CONFIG_DIR"
                    || (k.starts_with("CLAUDE_CODE_") && k != "CLAUDE_CODE_MAX_RETRIES")
            })
            .collect();
        Ok(Self {
            handler: spec.name.clone(),
            program,
            args,
            mcp_program,
            nats_url: settings.nats_url.clone(),
            env,
            env_remove,
            recycle: spec.recycle.clone().unwrap_or_default(),
            warmup: spec.pool.warmup(),
        })
    }
}

/// Why a turn produced no `result` line.
#[derive(Debug)]
pub enum TurnError {
    /// The turn's deadline passed.
    Deadline,
    /// No output at all for [`SILENCE_LIMIT`].
    Silent,
    /// The process exited or its pipes broke.
    Died(String),
}

/// The `result` line that ends a turn. Every other line (init, assistant messages, streamed
/// chunks) only proves liveness, so it is not parsed at all.
fn as_result(line: &str) -> Option<Value> {
    // An escaped `\"result\"` inside text never matches: the cheap test is sound.
    if !line.contains("\"result\"") {
        return None;
    }
    serde_json::from_str::<Value>(line)
        .ok()
        .filter(|v| v["type"] == "result")
}

/// The last lines the CLI wrote to stderr, for error messages.
type StderrTail = Arc<Mutex<VecDeque<String>>>;

pub struct ClaudeInstance {
    child: Child,
    pub pid: u32,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: StderrTail,
    /// HOME, working directory, MCP config and turn files; removed with the instance.
    dir: tempfile::TempDir,
    /// Event turns so far (`/clear` not counted).
    pub turns: u64,
    recycle: RecycleSpec,
    /// `/clear` exchanges to make when started ahead of demand (`pool.warmup`).
    warmup: u32,
    /// Aggregate whose conversation the process holds (`None`: a clean conversation).
    pub holds: Option<String>,
    broken: bool,
}

impl ClaudeInstance {
    /// Starts the process without waiting for it: it gets ready (~0.3–0.9 s) while idle in the
    /// pool, or during its first turn.
    pub async fn start(launch: &Launch) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("grizzly-claude-{}-", launch.handler))
            .tempdir()
            .map_err(|e| format!("cannot create instance directory: {e}"))?;
        let (home, work) = (dir.path().join("home"), dir.path().join("work"));
        let mcp_config = dir.path().join("mcp.json");
        let mut mcp_env = json!({
            TURN_FILE_ENV: dir.path().join("turn.json"),
            NATS_URL_ENV: launch.nats_url,
        });
        // Claude Code gives MCP servers a minimal environment: hand the trace export set-up on
        // (the server names itself `grizzly-mcp`).
        for (k, v) in
            std::env::vars().filter(|(k, _)| k.starts_with("OTEL_") && k != "OTEL_SERVICE_NAME")
        {
            mcp_env[k] = v.into();
        }
        let servers = json!({"mcpServers": {"grizzly": {
            "type": "stdio",
            "command": launch.mcp_program,
            "args": ["mcp"],
            "env": mcp_env,
        }}});
        std::fs::create_dir_all(&home)
            .and_then(|()| std::fs::create_dir_all(&work))
            .and_then(|()| std::fs::write(&mcp_config, servers.to_string()))
            .map_err(|e| format!("cannot prepare instance directory: {e}"))?;
        let mut cmd = Command::new(&launch.program);
        cmd.args(&launch.args).arg("--mcp-config").arg(&mcp_config);
        for k in &launch.env_remove {
            cmd.env_remove(k);
        }
        let mut child = cmd
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .env("HOME", &home)
            .current_dir(&work)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", launch.program.display()))?;
        let pid = child.id().unwrap_or_default();
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped")).lines();
        let stderr = StderrTail::default();
        let mut err_pipe = BufReader::new(child.stderr.take().expect("piped")).lines();
        let tail = stderr.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = err_pipe.next_line().await {
                debug!(pid, "claude stderr: {line}");
                let mut tail = tail.lock().expect("stderr lock");
                if tail.len() == STDERR_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        debug!(pid, dir = %dir.path().display(), "claude instance started");
        Ok(Self {
            child,
            pid,
            stdin,
            stdout,
            stderr,
            dir,
            turns: 0,
            recycle: launch.recycle.clone(),
            warmup: launch.warmup,
            holds: None,
            broken: false,
        })
    }

    fn emitted_file(&self) -> PathBuf {
        self.dir.path().join("emitted.jsonl")
    }

    /// Tells this instance's MCP server which event the next turn handles.
    pub fn write_turn_context(
        &self,
        handler: &str,
        nats_url: &str,
        emits: &[String],
        event: &EventEnvelope,
    ) -> std::io::Result<()> {
        let emitted_file = self.emitted_file();
        match std::fs::remove_file(&emitted_file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut event = event.clone();
        event.data = Value::Null;
        TurnContext {
            turn: self.turns + 1,
            handler: handler.to_string(),
            nats_url: nats_url.to_string(),
            event,
            emitted_file,
            emits: emits.to_vec(),
        }
        .write(&self.dir.path().join("turn.json"))
    }

    /// Events the MCP server emitted during the last turn (`{id, subject, stream_sequence}`).
    pub fn emitted(&self) -> Vec<Value> {
        std::fs::read_to_string(self.emitted_file())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    async fn write_line(&mut self, line: &Value) -> Result<(), TurnError> {
        // serde_json escapes newlines, so this is always exactly one well-formed line: a
        // malformed one would make the CLI exit.
        let mut bytes = serde_json::to_vec(line).expect("JSON value serializes");
        bytes.push(b'\n');
        let written = async {
            self.stdin.write_all(&bytes).await?;
            self.stdin.flush().await
        };
        written
            .await
            .map_err(|e| self.died(format!("writing to claude: {e}")))
    }

    /// One turn: writes the user message and reads until its `result` line.
    pub async fn turn(&mut self, content: &str, deadline: Instant) -> Result<Value, TurnError> {
        self.turns += 1;
        self.exchange(content, deadline).await
    }

    async fn exchange(&mut self, content: &str, deadline: Instant) -> Result<Value, TurnError> {
        let line = json!({"type": "user", "message": {"role": "user", "content": content}});
        self.write_line(&line).await?;
        loop {
            let silence = Instant::now() + SILENCE_LIMIT;
            match timeout_at(deadline.min(silence), self.stdout.next_line()).await {
                Ok(Ok(Some(line))) => {
                    if let Some(result) = as_result(&line) {
                        return Ok(result);
                    }
                }
                Ok(Ok(None)) => return Err(self.died("claude closed its output".into())),
                Ok(Err(e)) => return Err(self.died(format!("reading from claude: {e}"))),
                Err(_) if Instant::now() >= deadline => return Err(TurnError::Deadline),
                Err(_) => return Err(TurnError::Silent),
            }
        }
    }

    /// Starts a fresh conversation.
    pub async fn clear(&mut self) -> Result<(), String> {
        self.clear_by(Instant::now() + CLEAR_TIMEOUT).await
    }

    async fn clear_by(&mut self, deadline: Instant) -> Result<(), String> {
        match self.exchange("/clear", deadline).await {
            Ok(result) if result["is_error"] != true => {
                self.holds = None;
                Ok(())
            }
            Ok(result) => Err(format!("/clear failed: {result}")),
            Err(e) => Err(format!("/clear failed: {e:?}")),
        }
    }

    /// Ends a turn that ran past its deadline: asks the CLI to interrupt (so it stops the API
    /// request and its tools), gives it a moment to answer, then kills the process.
    pub async fn abort(&mut self) {
        self.broken = true;
        let request = json!({"type": "control_request", "request_id": format!("interrupt-{}", self.turns),
                             "request": {"subtype": "interrupt"}});
        if self.write_line(&request).await.is_ok() {
            let until = Instant::now() + INTERRUPT_GRACE;
            while let Ok(Ok(Some(line))) = timeout_at(until, self.stdout.next_line()).await {
                if as_result(&line).is_some() {
                    break;
                }
            }
        }
        let _ = self.child.start_kill();
    }

    fn died(&mut self, what: String) -> TurnError {
        self.broken = true;
        let status = self.child.try_wait().ok().flatten();
        let stderr: Vec<String> = self
            .stderr
            .lock()
            .expect("stderr lock")
            .iter()
            .cloned()
            .collect();
        let status = status.map_or("still running".to_string(), |s| s.to_string());
        TurnError::Died(format!(
            "{what} (pid {}, exit: {status}); stderr: {}",
            self.pid,
            stderr.join(" | ")
        ))
    }

    /// Resident memory of the CLI process, from /proc.
    pub fn rss_mib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib / 1024)
    }
}

impl Instance for ClaudeInstance {
    fn is_alive(&mut self) -> bool {
        !self.broken && matches!(self.child.try_wait(), Ok(None))
    }

    fn needs_recycle(&mut self) -> bool {
        let turns = self.recycle.max_turns > 0 && self.turns >= u64::from(self.recycle.max_turns);
        let memory = self.recycle.max_rss_mib > 0
            && self.rss_mib().is_some_and(|m| m > self.recycle.max_rss_mib);
        if turns || memory {
            debug!(pid = self.pid, turns = self.turns, rss_mib = ?self.rss_mib(), "recycling claude instance");
        }
        turns || memory
    }

    fn affinity(&self) -> Option<&str> {
        self.holds.as_deref()
    }

    /// `pool.warmup` `/clear` exchanges. A fresh CLI runs its first few dozen turns at about half
    /// the speed it reaches later, while its JIT compiles the code they run; `/clear` runs much of
    /// that code without an API request (4 fresh instances: 17 → 37 turns/s with 60 of them).
    fn warm_up(&mut self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            for i in 0..self.warmup {
                let limit = if i == 0 { START_TIMEOUT } else { CLEAR_TIMEOUT };
                self.clear_by(Instant::now() + limit)
                    .await
                    .map_err(|e| format!("warm-up: {e}"))?;
            }
            Ok(())
        })
    }

    fn stop(mut self) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            // EOF on stdin ends the CLI (and with it the MCP server); force after a grace period.
            drop(self.stdin);
            if tokio::time::timeout(Duration::from_secs(3), self.child.wait())
                .await
                .is_err()
            {
                let _ = self.child.kill().await;
            }
            debug!(pid = self.pid, "claude instance stopped");
            drop(self.dir);
        })
    }
}
