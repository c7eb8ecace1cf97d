//! Handler definitions: one YAML file per handler (default directory `handlers/`).
//!
//! Keys fixed by the design contract: `name`, `version`, `on`, `kind`, `prompt`, `command`,
//! `concurrency`, `timeout`, `retry`, `priority`. The rest are Grizzly's (see ARCHITECTURE.md).
//! Unknown keys are an error, and every error names the file, line and column.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::envelope::Priority;
use crate::subject::{is_valid_token, validate_pattern};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HandlerKind {
    /// A pool of warm Claude Code processes driven over stream-json.
    Claude,
    /// A persistent process speaking JSON lines.
    Process,
    /// One process per event (the legacy path).
    Exec,
}

impl fmt::Display for HandlerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Claude => "claude",
            Self::Process => "process",
            Self::Exec => "exec",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    #[serde(default = "RetryPolicy::default_attempts")]
    pub max_attempts: u32,
    #[serde(default = "RetryPolicy::default_initial", with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(default = "RetryPolicy::default_max", with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl RetryPolicy {
    fn default_attempts() -> u32 {
        3
    }
    fn default_initial() -> Duration {
        Duration::from_millis(500)
    }
    fn default_max() -> Duration {
        Duration::from_secs(30)
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: Self::default_attempts(),
            initial_backoff: Self::default_initial(),
            max_backoff: Self::default_max(),
        }
    }
}

/// Per-handler circuit breaker: opens after `failure_threshold` consecutive failures, lets one
/// probe through after `open_for`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerPolicy {
    #[serde(default = "BreakerPolicy::default_threshold")]
    pub failure_threshold: u32,
    #[serde(default = "BreakerPolicy::default_open_for", with = "humantime_serde")]
    pub open_for: Duration,
}

impl BreakerPolicy {
    fn default_threshold() -> u32 {
        5
    }
    fn default_open_for() -> Duration {
        Duration::from_secs(10)
    }
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            failure_threshold: Self::default_threshold(),
            open_for: Self::default_open_for(),
        }
    }
}

/// Lossless rate limit: at most `limit` invocations per `period` (per `key` when given);
/// events over the limit wait their turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleSpec {
    pub limit: u32,
    #[serde(with = "humantime_serde")]
    pub period: Duration,
    /// minijinja template over `event` / `data` naming the bucket (default: one per handler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Content de-duplication: an event whose key was seen within `window` is recorded and not
/// handled again (across restarts and listener replicas).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupSpec {
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// minijinja template over `event` / `data` (default: hash of type + aggregate + data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Size bounds of a warm instance pool (`claude` and `process` kinds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    #[serde(default)]
    pub min: usize,
    /// Defaults to the handler's `concurrency`.
    #[serde(default)]
    pub max: Option<usize>,
    /// `claude` only: how many `/clear` exchanges an instance started ahead of demand (pre-warm,
    /// replacement) makes before it takes its first event. They make no API request; they run
    /// the CLI's JavaScript until its JIT has compiled it, which a fresh process otherwise does
    /// during its first few dozen events (at about half its later speed). Default
    /// [`PoolSpec::DEFAULT_WARMUP`]; `0` turns it off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup: Option<u32>,
}

impl PoolSpec {
    pub const DEFAULT_WARMUP: u32 = 50;
    pub const MAX_WARMUP: u32 = 1000;

    pub fn warmup(&self) -> u32 {
        self.warmup.unwrap_or(Self::DEFAULT_WARMUP)
    }
}

impl Default for PoolSpec {
    fn default() -> Self {
        Self {
            min: 1,
            max: None,
            warmup: None,
        }
    }
}

/// When a warm instance is replaced by a fresh one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecycleSpec {
    #[serde(default = "RecycleSpec::default_turns")]
    pub max_turns: u32,
    #[serde(default = "RecycleSpec::default_rss")]
    pub max_rss_mib: u64,
}

impl RecycleSpec {
    fn default_turns() -> u32 {
        250
    }
    fn default_rss() -> u64 {
        600
    }
}

impl Default for RecycleSpec {
    fn default() -> Self {
        Self {
            max_turns: Self::default_turns(),
            max_rss_mib: Self::default_rss(),
        }
    }
}

/// Conversation handling between events on a `claude` instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionMode {
    /// `/clear` before every event.
    #[default]
    Fresh,
    /// Keep one conversation per aggregate (an agent keeps its context).
    PerAggregate,
}

/// One handler file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerSpec {
    pub name: String,
    #[serde(default = "default_version")]
    pub version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Subject patterns routed to this handler; may be empty for a handler that only workflow
    /// steps call.
    #[serde(default)]
    pub on: Vec<String>,
    pub kind: HandlerKind,
    /// What this handler can do; workflow steps and events may ask for a capability instead of
    /// naming a handler.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// `claude`: path of the prompt template, relative to the handler file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// `claude`: the prompt template inline (instead of `prompt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// `process` / `exec`: argv; relative paths resolve against the working directory.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default)]
    pub retry: RetryPolicy,
    #[serde(default)]
    pub breaker: BreakerPolicy,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<ThrottleSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup: Option<DedupSpec>,
    /// Batching, debounce and rate limit: see [`crate::flowspec`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<crate::flowspec::BatchSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debounce: Option<crate::flowspec::DebounceSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<crate::flowspec::RateLimitSpec>,
    #[serde(default)]
    pub pool: PoolSpec,
    /// When to replace a warm instance. Default: `claude` instances after 250 turns or 600 MiB;
    /// `process` instances never (set it to recycle a leaky script).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recycle: Option<RecycleSpec>,
    #[serde(default)]
    pub session: SessionMode,
    /// `claude`: system prompt for the lean start (`--system-prompt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `claude`: built-in tools to enable (`--tools`); empty = none (MCP tools stay available).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
    /// `claude`: extra `--allowedTools` entries besides Grizzly's own `emit_event`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_tools: Vec<String>,
    /// `claude`: spending cap per instance (`--max-budget-usd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_budget_usd: Option<f64>,
    /// Subject patterns this handler (or its agent, through MCP) may append events on. Empty:
    /// any subject but the control ones (see [`HandlerSpec::may_emit`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub emits: Vec<String>,
}

/// Event types only Grizzly writes: a handler emitting one would forge an outcome.
pub const RESERVED_EVENT_TYPES: [&str; 3] =
    ["handler_succeeded", "handler_failed", "duplicate_skipped"];

/// Whether a handler whose file says `emits` may append an event on `subject`; `Err` says why
/// not. Outcome types are never allowed. Without `emits`, the `system` aggregate and workflow
/// control events (anything on `workflow` but `start_requested`) are refused too, so a
/// prompt-injected agent cannot cancel, resume or forge workflow progress; `emits` opens
/// exactly the subjects it lists.
pub fn may_emit(emits: &[String], subject: &crate::EventSubject) -> Result<(), String> {
    let full = subject.to_string();
    if RESERVED_EVENT_TYPES.contains(&subject.event_type.as_str()) {
        return Err(format!(
            "`{}` events are written by Grizzly only ({full})",
            subject.event_type
        ));
    }
    if !emits.is_empty() {
        return if emits
            .iter()
            .any(|p| crate::subject::pattern_matches(p, &full))
        {
            Ok(())
        } else {
            Err(format!(
                "{full} is not among the handler's `emits` patterns ({})",
                emits.join(", ")
            ))
        };
    }
    match (subject.aggregate_type.as_str(), subject.event_type.as_str()) {
        ("system", _) => Err(format!(
            "{full}: the `system` aggregate is not open to handlers unless listed in `emits`"
        )),
        ("workflow", t) if t != "start_requested" => Err(format!(
            "{full}: workflow control events are not open to handlers unless listed in `emits`"
        )),
        _ => Ok(()),
    }
}

fn default_version() -> u32 {
    1
}
fn default_concurrency() -> usize {
    4
}
fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

impl HandlerSpec {
    /// Semantic checks serde cannot express. Each message names the offending key.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let name_ok = is_valid_token(&self.name)
            && !self.name.starts_with('_')
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !name_ok {
            problems.push(format!(
                "name: `{}` must match [a-z0-9_-]+ and not start with `_`",
                self.name
            ));
        }
        if self.version == 0 {
            problems.push("version: must be at least 1".into());
        }
        for capability in &self.capabilities {
            if !is_valid_token(capability) {
                problems.push(format!(
                    "capabilities: `{capability}` must match [A-Za-z0-9_-]+"
                ));
            }
        }
        for pattern in &self.on {
            if let Err(e) = validate_pattern(pattern) {
                problems.push(format!("on: {e}"));
            }
        }
        for pattern in &self.emits {
            if let Err(e) = validate_pattern(pattern) {
                problems.push(format!("emits: {e}"));
            }
        }
        if self.concurrency == 0 {
            problems.push("concurrency: must be at least 1".into());
        }
        if self.timeout.is_zero() {
            problems.push("timeout: must be greater than zero".into());
        }
        if self.retry.max_attempts == 0 {
            problems.push("retry.max_attempts: must be at least 1".into());
        }
        if self.retry.initial_backoff > self.retry.max_backoff {
            problems.push("retry: initial_backoff is larger than max_backoff".into());
        }
        if self.breaker.failure_threshold == 0 {
            problems.push("breaker.failure_threshold: must be at least 1".into());
        }
        if let Some(t) = &self.throttle
            && (t.limit == 0 || t.period.is_zero())
        {
            problems.push("throttle: limit and period must be greater than zero".into());
        }
        if let Some(d) = &self.dedup
            && d.window < Duration::from_secs(1)
        {
            problems.push("dedup.window: must be at least 1s".into());
        }
        problems.extend(crate::flowspec::validate(self));
        if self.pool_max() < self.pool.min.max(1) {
            problems.push(format!(
                "pool: min ({}) is larger than max ({})",
                self.pool.min,
                self.pool_max()
            ));
        }
        if self.kind != HandlerKind::Claude && self.pool.warmup.is_some() {
            problems.push(format!(
                "pool.warmup: only for `claude` handlers, not `{}`",
                self.kind
            ));
        }
        if self.pool.warmup() > PoolSpec::MAX_WARMUP {
            problems.push(format!(
                "pool.warmup: at most {} (each is a `/clear` of ~10 ms)",
                PoolSpec::MAX_WARMUP
            ));
        }
        match self.kind {
            HandlerKind::Claude => {
                match (&self.prompt, &self.template) {
                    (None, None) => problems.push(
                        "prompt: a `claude` handler needs `prompt` (a template file) or `template`"
                            .into(),
                    ),
                    (Some(_), Some(_)) => {
                        problems.push("prompt: give either `prompt` or `template`, not both".into())
                    }
                    _ => {}
                }
                if !self.command.is_empty() {
                    problems.push("command: not used by a `claude` handler".into());
                }
            }
            HandlerKind::Process | HandlerKind::Exec => {
                if self.command.is_empty() {
                    problems.push(format!(
                        "command: a `{}` handler needs `command`",
                        self.kind
                    ));
                }
                if self.prompt.is_some() || self.template.is_some() {
                    problems.push(format!("prompt: not used by a `{}` handler", self.kind));
                }
            }
        }
        problems
    }

    pub fn pool_max(&self) -> usize {
        self.pool.max.unwrap_or(self.concurrency)
    }

    /// Whether this handler consumes events on `subject`.
    pub fn matches(&self, subject: &str) -> bool {
        self.on
            .iter()
            .any(|p| crate::subject::pattern_matches(p, subject))
    }
}

/// A handler file that failed to load: file, position (when known) and the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerFileError {
    pub path: PathBuf,
    pub line: Option<u64>,
    pub column: Option<u64>,
    pub message: String,
}

impl fmt::Display for HandlerFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for HandlerFileError {}

/// All problems found while loading a directory of handlers.
#[derive(Debug, Clone)]
pub struct HandlerLoadErrors(pub Vec<HandlerFileError>);

impl fmt::Display for HandlerLoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for HandlerLoadErrors {}

/// A validated handler with its prompt template loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedHandler {
    pub spec: HandlerSpec,
    pub path: PathBuf,
    /// `claude`: the prompt template text.
    pub prompt_template: Option<String>,
    /// The handler file's text, as registered in the handler registry.
    pub source: String,
}

impl LoadedHandler {
    /// Problems that depend on the deployment's settings (see
    /// [`crate::flowspec::settings_problems`]), placed in the file like any other.
    pub fn settings_errors(&self, ack_wait: std::time::Duration) -> Vec<HandlerFileError> {
        crate::flowspec::settings_problems(&self.spec, ack_wait)
            .into_iter()
            .map(|m| locate_error(&self.path, &self.source, m))
            .collect()
    }
}

/// Parses and validates one handler file's text.
pub fn parse_handler(path: &Path, text: &str) -> Result<LoadedHandler, Vec<HandlerFileError>> {
    let spec: HandlerSpec = serde_saphyr::from_str(text).map_err(|e| {
        let loc = e.location();
        vec![HandlerFileError {
            path: path.to_path_buf(),
            line: loc.map(|l| l.line()),
            column: loc.map(|l| l.column()),
            message: yaml_message(&e.to_string()),
        }]
    })?;
    let mut errors: Vec<HandlerFileError> = spec
        .validate()
        .into_iter()
        .map(|message| locate_error(path, text, message))
        .collect();
    let prompt_template = match (&spec.prompt, &spec.template) {
        (_, Some(inline)) => Some(inline.clone()),
        (Some(rel), None) => {
            let base = path.parent().unwrap_or(Path::new("."));
            let file = base.join(rel);
            match std::fs::read_to_string(&file) {
                Ok(t) => Some(t),
                Err(e) => {
                    errors.push(locate_error(
                        path,
                        text,
                        format!("prompt: cannot read `{}`: {e}", file.display()),
                    ));
                    None
                }
            }
        }
        (None, None) => None,
    };
    if errors.is_empty() {
        Ok(LoadedHandler {
            spec,
            path: path.to_path_buf(),
            prompt_template,
            source: text.to_string(),
        })
    } else {
        Err(errors)
    }
}

/// A validation problem of the file `path` (with contents `text`), placed at the key its message
/// starts with (`retry.max_attempts: ...`).
pub fn locate_error(path: &Path, text: &str, message: String) -> HandlerFileError {
    let (line, column) = match locate(text, &message) {
        Some((line, column)) => (Some(line), Some(column)),
        None => (None, None),
    };
    HandlerFileError {
        path: path.to_path_buf(),
        line,
        column,
        message,
    }
}

/// Line and column (1-based) of the key path a message starts with (`batch.max_size: ...`): the
/// top-level key's line, then each nested key after it — in a flow mapping on the same line or
/// in the indented block below. Falls back to the deepest key found.
fn locate(text: &str, message: &str) -> Option<(u64, u64)> {
    let path = message.split(':').next().unwrap_or("");
    let mut keys = path.split('.');
    let lines: Vec<&str> = text.lines().collect();
    let top = keys.next()?;
    let top_line = lines
        .iter()
        .position(|l| l.trim_start().starts_with(&format!("{top}:")))?;
    let indent = lines[top_line].len() - lines[top_line].trim_start().len();
    let (mut line, mut col) = (top_line, indent);
    'keys: for key in keys {
        let pattern = format!("{key}:");
        let mut from = col + 1;
        for (i, l) in lines.iter().enumerate().skip(line) {
            let own = l.len() - l.trim_start().len();
            if i > top_line && !l.trim().is_empty() && own <= indent {
                break;
            }
            let mut search = from.min(l.len());
            while let Some(found) = l[search..].find(&pattern) {
                let at = search + found;
                let before = l[..at].chars().next_back();
                if before.is_none_or(|c| !(c.is_alphanumeric() || c == '_')) {
                    (line, col) = (i, at);
                    continue 'keys;
                }
                search = at + pattern.len();
            }
            from = 0;
        }
        break;
    }
    Some((line as u64 + 1, col as u64 + 1))
}

/// The parser's message without its own `error: line L column C:` prefix (we print the
/// location as `file:line:column`).
pub fn yaml_message(s: &str) -> String {
    let line = s.lines().next().unwrap_or(s).trim();
    let line = line.strip_prefix("error: ").unwrap_or(line);
    match line
        .strip_prefix("line ")
        .and_then(|rest| rest.split_once(": "))
    {
        Some((position, message)) if position.contains(" column ") => message.to_string(),
        _ => line.to_string(),
    }
}

/// Loads every `*.yaml` / `*.yml` file in `dir` (not recursive). A missing directory is no
/// handlers. Returns every problem in every file, not just the first.
pub fn load_handlers(dir: &Path) -> Result<Vec<LoadedHandler>, HandlerLoadErrors> {
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(HandlerLoadErrors(vec![HandlerFileError {
                path: dir.to_path_buf(),
                line: None,
                column: None,
                message: format!("cannot read handler directory: {e}"),
            }]));
        }
    };
    paths.sort();
    let mut handlers = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                errors.push(HandlerFileError {
                    path: path.clone(),
                    line: None,
                    column: None,
                    message: format!("cannot read: {e}"),
                });
                continue;
            }
        };
        match parse_handler(&path, &text) {
            Ok(h) => handlers.push(h),
            Err(mut es) => errors.append(&mut es),
        }
    }
    let mut seen: HashMap<(String, u32), PathBuf> = HashMap::new();
    for h in &handlers {
        let key = (h.spec.name.clone(), h.spec.version);
        if let Some(first) = seen.insert(key, h.path.clone()) {
            errors.push(HandlerFileError {
                path: h.path.clone(),
                line: None,
                column: None,
                message: format!(
                    "name: handler `{}` version {} is also defined in {}",
                    h.spec.name,
                    h.spec.version,
                    first.display()
                ),
            });
        }
    }
    if errors.is_empty() {
        Ok(handlers)
    } else {
        Err(HandlerLoadErrors(errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<LoadedHandler, Vec<HandlerFileError>> {
        parse_handler(Path::new("handlers/t.yaml"), text)
    }

    #[test]
    fn parses_the_contract_example() {
        let h = parse(
            r#"
name: summarize
version: 2
on: ["events.agent.*.task_requested"]
kind: exec
command: ["python3", "handlers/x.py"]
concurrency: 8
timeout: 60s
retry: { max_attempts: 5, initial_backoff: 500ms, max_backoff: 30s }
priority: high
"#,
        )
        .unwrap();
        assert_eq!(h.spec.name, "summarize");
        assert_eq!(h.spec.version, 2);
        assert_eq!(h.spec.kind, HandlerKind::Exec);
        assert_eq!(h.spec.retry.max_attempts, 5);
        assert_eq!(h.spec.timeout, Duration::from_secs(60));
        assert_eq!(h.spec.priority, Priority::High);
        assert!(h.spec.matches("events.agent.a1.task_requested"));
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let errs = parse("name: x\non: [\"events.>\"\nkind: exec\n").unwrap_err();
        assert_eq!(errs.len(), 1);
        assert!(errs[0].line.is_some(), "{:?}", errs[0]);
        assert!(
            errs[0].to_string().starts_with("handlers/t.yaml:"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn unknown_key_missing_field_and_bad_kind_are_named() {
        let errs =
            parse("name: x\non: [\"events.>\"]\nkind: exec\ncommand: [a]\nbogus: 1\n").unwrap_err();
        assert!(errs[0].message.contains("bogus"), "{}", errs[0]);
        assert_eq!(errs[0].line, Some(5));

        let errs = parse("name: x\non: [\"events.>\"]\ncommand: [a]\n").unwrap_err();
        assert!(errs[0].message.contains("kind"), "{}", errs[0]);

        let errs = parse("name: x\non: [\"events.>\"]\nkind: shell\n").unwrap_err();
        assert!(errs[0].message.contains("shell"), "{}", errs[0]);
        assert_eq!(errs[0].line, Some(3));
    }

    #[test]
    fn semantic_problems_are_all_reported() {
        let errs =
            parse("name: Bad Name\non: [\"tasks.x\"]\nkind: exec\nconcurrency: 0\n").unwrap_err();
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert!(text.iter().any(|t| t.contains("name:")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("on:")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("concurrency:")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("command:")), "{text:?}");
    }

    #[test]
    fn claude_needs_a_prompt() {
        let errs = parse("name: c\non: [\"events.>\"]\nkind: claude\n").unwrap_err();
        assert!(errs[0].message.starts_with("prompt:"), "{}", errs[0]);
        let ok =
            parse("name: c\non: [\"events.>\"]\nkind: claude\ntemplate: \"hi {{ event.data }}\"\n")
                .unwrap();
        assert_eq!(ok.prompt_template.as_deref(), Some("hi {{ event.data }}"));
    }

    #[test]
    fn pool_warmup_is_for_claude_only_bounded_and_defaulted() {
        let claude = "name: c\non: [\"events.>\"]\nkind: claude\ntemplate: hi\n";
        let h = parse(claude).unwrap();
        assert_eq!(h.spec.pool.warmup(), PoolSpec::DEFAULT_WARMUP);
        let h = parse(&format!("{claude}pool: {{ min: 2, warmup: 0 }}\n")).unwrap();
        assert_eq!((h.spec.pool.min, h.spec.pool.warmup()), (2, 0));

        let errs = parse(&format!("{claude}pool: {{ warmup: 5000 }}\n")).unwrap_err();
        assert!(
            errs[0].message.starts_with("pool.warmup: at most 1000"),
            "{}",
            errs[0]
        );
        assert_eq!((errs[0].line, errs[0].column), (Some(5), Some(9)));
        // Not a count: the parser's error, at the value.
        for bad in ["-1", "lots"] {
            let errs = parse(&format!("{claude}pool: {{ warmup: {bad} }}\n")).unwrap_err();
            assert_eq!(
                (errs[0].line, errs[0].column),
                (Some(5), Some(17)),
                "{}",
                errs[0]
            );
        }

        let process = "name: p\non: [\"events.>\"]\nkind: process\ncommand: [x]\n";
        let errs = parse(&format!("{process}pool:\n  min: 1\n  warmup: 3\n")).unwrap_err();
        assert_eq!(
            errs[0].message,
            "pool.warmup: only for `claude` handlers, not `process`"
        );
        assert_eq!((errs[0].line, errs[0].column), (Some(7), Some(3)));
    }
}

#[cfg(test)]
mod emission_tests {
    use super::*;
    use crate::EventSubject;

    fn subject(s: &str) -> EventSubject {
        EventSubject::parse(s).unwrap()
    }

    #[test]
    fn handlers_may_not_forge_outcomes_or_workflow_control_unless_allowed() {
        let none: Vec<String> = Vec::new();
        assert!(may_emit(&none, &subject("events.agent.a1.summary_ready")).is_ok());
        assert!(may_emit(&none, &subject("events.workflow.w1.start_requested")).is_ok());
        let e = may_emit(&none, &subject("events.workflow.w1.cancel_requested")).unwrap_err();
        assert!(e.contains("workflow control events"), "{e}");
        assert!(may_emit(&none, &subject("events.system.x.breaker_opened")).is_err());
        let e = may_emit(&none, &subject("events.agent.a1.handler_succeeded")).unwrap_err();
        assert!(e.contains("written by Grizzly only"), "{e}");
        // `emits` opens exactly what it lists, and never outcomes.
        let allow = vec!["events.workflow.*.cancel_requested".to_string()];
        assert!(may_emit(&allow, &subject("events.workflow.w1.cancel_requested")).is_ok());
        let e = may_emit(&allow, &subject("events.agent.a1.summary_ready")).unwrap_err();
        assert!(e.contains("not among the handler's `emits`"), "{e}");
        let allow = vec!["events.>".to_string()];
        assert!(may_emit(&allow, &subject("events.agent.a1.handler_failed")).is_err());
    }

    #[test]
    fn a_bad_emits_pattern_is_reported() {
        let e = parse_handler(
            Path::new("h.yaml"),
            "name: h\nkind: process\ncommand: [x]\nemits: [\"events..x\"]\n",
        )
        .unwrap_err();
        assert!(e[0].message.starts_with("emits:"), "{e:?}");
        assert_eq!(e[0].line, Some(4));
    }
}
