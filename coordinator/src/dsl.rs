//! The workflow DSL: one YAML file per workflow version (default directory `workflows/`).
//!
//! Vocabulary follows the Serverless Workflow 1.0 specification where it fits (`do`, `call`,
//! `fork`, `switch`, `for`, `wait`, `run`, `raise`, `emit`, `then`, `if`, `with`, `output`);
//! expressions are CEL (`cel` crate), either bare (`if`, `when`, `for.in`) or inside `${ ... }`
//! in any string of a mapping (`with`, `output`, `input`, `raise`, `emit`). See docs/workflows.md.
//!
//! Parsing keeps the source position of every name that can be wrong (step ids, handler names,
//! expressions, jump targets), so [`validate`] reports each problem as `file:line:column`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use grizzly_shared::Priority;
use grizzly_shared::handler::{LoadedHandler, yaml_message};
use grizzly_shared::subject::{is_valid_token, validate_pattern};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_saphyr::Spanned;
use sha2::{Digest, Sha256};

use crate::expr;

/// A name or expression with the position it was written at.
pub type Located = Spanned<String>;

/// One workflow version.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "Grizzly workflow")]
pub struct WorkflowSpec {
    /// Unique name, `[a-z0-9_-]+`.
    #[schemars(with = "String")]
    pub name: Located,
    /// Version; a running instance stays on the version it started with.
    #[serde(default = "one")]
    pub version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Subject patterns: each matching event starts one instance (`trigger` = that event).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<String>")]
    pub on: Vec<Located>,
    /// The instance input, mapped from `trigger` (default: the trigger event's data, or the
    /// input given to `grizzly workflow start`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    /// The steps, run in sequence.
    #[serde(rename = "do")]
    pub steps: Vec<Step>,
    /// The instance output (default: the output of the last step that ran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
}

fn one() -> u32 {
    1
}

/// One step. Exactly one of the kind keys (`call`, `capability`, `run`, `fork`, `switch`,
/// `wait`, `sleep`, `raise`, `emit`) is given; the others are modifiers.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Unique in the workflow; `[A-Za-z0-9_-]+`.
    #[schemars(with = "String")]
    pub id: Located,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// CEL condition: the step is skipped when it is false.
    #[serde(default, rename = "if", skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub condition: Option<Located>,

    /// Call a handler by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub call: Option<Located>,
    /// Call a handler that declares this capability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub capability: Option<Located>,
    /// Run another workflow (its newest version) as a sub-workflow; `with` is its input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub run: Option<Located>,
    /// Parallel branches joined by `join`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fork: Option<Fork>,
    /// Conditions: the first case whose `when` holds decides where to go next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<Vec<SwitchCase>>,
    /// Wait for an event (e.g. a human approval), with an optional timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<WaitSpec>,
    /// Wait for a duration (a durable timer).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub sleep: Option<Duration>,
    /// Fail the instance with this message (a template).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub raise: Option<Located>,
    /// Append an event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emit: Option<EmitSpec>,

    /// Fan out: run the call (or sub-workflow) once per item of a list.
    #[serde(default, rename = "for", skip_serializing_if = "Option::is_none")]
    pub for_each: Option<ForEach>,
    /// Input of the call or sub-workflow (a template; default: the instance input).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub with: Option<Value>,
    /// Maps the raw result (`result`) to the step's output (a template).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Per-attempt time limit of the call (default: the handler's `timeout`).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub timeout: Option<Duration>,
    /// Attempts of the call (default: the handler's `retry`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<StepRetry>,
    /// Task priority (default: the handler's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<PriorityName>")]
    pub priority: Option<Priority>,
    /// Saga: how to undo this step when the instance fails later (run in reverse order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensate: Option<Compensate>,
    /// Where to go next: a later step id of the same sequence, `end` (end of this sequence),
    /// or `continue` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub then: Option<Located>,
}

/// Schema of [`Priority`] (defined in the shared crate).
#[derive(JsonSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
enum PriorityName {
    Critical,
    High,
    Normal,
    Low,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Fork {
    pub branches: Vec<Branch>,
    /// `all` (default), `any`, or a number n (n-of).
    #[serde(default)]
    pub join: Join,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Branch {
    #[schemars(with = "String")]
    pub id: Located,
    #[serde(rename = "do")]
    pub steps: Vec<Step>,
}

/// How parallel work is joined: every part, the first, or n of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Join {
    Word(JoinWord),
    Count(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum JoinWord {
    All,
    Any,
}

impl Default for Join {
    fn default() -> Self {
        Self::Word(JoinWord::All)
    }
}

impl Join {
    /// How many of `total` parts must succeed.
    pub fn needed(self, total: usize) -> usize {
        match self {
            Self::Word(JoinWord::All) => total,
            Self::Word(JoinWord::Any) => total.min(1),
            Self::Count(n) => (n as usize).min(total),
        }
    }
}

impl fmt::Display for Join {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Word(JoinWord::All) => f.write_str("all"),
            Self::Word(JoinWord::Any) => f.write_str("any"),
            Self::Count(n) => write!(f, "{n}-of"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SwitchCase {
    /// CEL condition; a case without `when` is the default (last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub when: Option<Located>,
    /// A later step id of the same sequence, `end`, or `continue`.
    #[schemars(with = "String")]
    pub then: Located,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WaitSpec {
    /// Subject pattern of the awaited event.
    #[schemars(with = "String")]
    pub event: Located,
    /// Which event belongs to this instance (default: the first matching one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlate: Option<Correlate>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub timeout: Option<Duration>,
    /// On timeout: `fail` the step (default) or `continue` with a null output.
    #[serde(default)]
    pub on_timeout: OnTimeout,
}

/// Correlation of an awaited event: by aggregate id, and/or by a field of the event.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Correlate {
    /// CEL: the awaited event's aggregate id must equal this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub aggregate: Option<Located>,
    /// Dotted path into the event (e.g. `data.request_id`) that must equal `equals`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// CEL: the value `field` must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub equals: Option<Located>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    #[default]
    Fail,
    Continue,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EmitSpec {
    /// Subject of the event (a template), e.g. `events.order.${ input.order }.shipped`.
    #[schemars(with = "String")]
    pub event: Located,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForEach {
    /// Name of the item variable (default `item`).
    #[serde(default = "default_each")]
    pub each: String,
    /// CEL expression giving the list.
    #[serde(rename = "in")]
    #[schemars(with = "String")]
    pub list: Located,
    /// Name of the index variable (default `index`).
    #[serde(default = "default_at")]
    pub at: String,
    /// Items running at once (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    #[serde(default)]
    pub join: Join,
}

fn default_each() -> String {
    "item".into()
}
fn default_at() -> String {
    "index".into()
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepRetry {
    pub max_attempts: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Compensate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub call: Option<Located>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub capability: Option<Located>,
    /// Input of the compensation (a template; `output` is the step's output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub with: Option<Value>,
}

/// What a step does (its kind key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    Call,
    Run,
    Fork,
    Switch,
    Wait,
    Sleep,
    Raise,
    Emit,
}

impl StepKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Call => "call",
            Self::Run => "run",
            Self::Fork => "fork",
            Self::Switch => "switch",
            Self::Wait => "wait",
            Self::Sleep => "sleep",
            Self::Raise => "raise",
            Self::Emit => "emit",
        }
    }
}

/// Where a handler call goes: a handler by name, or any handler with a capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Handler(String),
    Capability(String),
}

impl Step {
    /// The kind keys present (a valid step has exactly one).
    pub fn kinds(&self) -> Vec<StepKind> {
        let mut kinds = Vec::new();
        if self.call.is_some() || self.capability.is_some() {
            kinds.push(StepKind::Call);
        }
        if self.call.is_some() && self.capability.is_some() {
            kinds.push(StepKind::Call);
        }
        for (present, kind) in [
            (self.run.is_some(), StepKind::Run),
            (self.fork.is_some(), StepKind::Fork),
            (self.switch.is_some(), StepKind::Switch),
            (self.wait.is_some(), StepKind::Wait),
            (self.sleep.is_some(), StepKind::Sleep),
            (self.raise.is_some(), StepKind::Raise),
            (self.emit.is_some(), StepKind::Emit),
        ] {
            if present {
                kinds.push(kind);
            }
        }
        kinds
    }

    pub fn kind(&self) -> StepKind {
        self.kinds().first().copied().unwrap_or(StepKind::Call)
    }

    pub fn id(&self) -> &str {
        &self.id.value
    }

    pub fn target(&self) -> Option<Target> {
        match (&self.call, &self.capability) {
            (Some(h), _) => Some(Target::Handler(h.value.clone())),
            (None, Some(c)) => Some(Target::Capability(c.value.clone())),
            _ => None,
        }
    }

    /// Every step nested in this one (fork branches), depth first.
    pub fn children(&self) -> impl Iterator<Item = &Step> {
        self.fork
            .iter()
            .flat_map(|f| f.branches.iter())
            .flat_map(|b| b.steps.iter())
    }
}

impl Compensate {
    pub fn target(&self) -> Option<Target> {
        match (&self.call, &self.capability) {
            (Some(h), _) => Some(Target::Handler(h.value.clone())),
            (None, Some(c)) => Some(Target::Capability(c.value.clone())),
            _ => None,
        }
    }
}

/// A jump: to the next step, out of the current sequence, or to a later step of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    Continue,
    End,
    Goto(String),
}

impl Next {
    pub fn parse(s: &str) -> Self {
        match s {
            "continue" => Self::Continue,
            "end" => Self::End,
            id => Self::Goto(id.to_string()),
        }
    }
}

impl WorkflowSpec {
    pub fn name(&self) -> &str {
        &self.name.value
    }

    /// Every step, depth first.
    pub fn all_steps(&self) -> Vec<&Step> {
        fn walk<'a>(steps: &'a [Step], out: &mut Vec<&'a Step>) {
            for s in steps {
                out.push(s);
                if let Some(f) = &s.fork {
                    for b in &f.branches {
                        walk(&b.steps, out);
                    }
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.steps, &mut out);
        out
    }

    pub fn step(&self, id: &str) -> Option<&Step> {
        self.all_steps().into_iter().find(|s| s.id() == id)
    }

    /// Subject patterns this workflow's instances consume (triggers and waits).
    pub fn subscriptions(&self) -> Vec<String> {
        let mut out: Vec<String> = self.on.iter().map(|p| p.value.clone()).collect();
        for s in self.all_steps() {
            if let Some(w) = &s.wait {
                out.push(w.event.value.clone());
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Loading and validation
// ---------------------------------------------------------------------------------------------

/// One problem in a workflow file (file, position when known, what is wrong), and every problem
/// found in file order: the same shapes as handler files' errors.
pub use grizzly_shared::handler::{
    HandlerFileError as WorkflowFileError, HandlerLoadErrors as WorkflowErrors,
};

/// What a workflow may refer to: handlers (by name and capability) and other workflows.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// Handler name → (newest version, priority).
    pub handlers: BTreeMap<String, (u32, Priority)>,
    /// Capability → handler names declaring it, sorted.
    pub capabilities: BTreeMap<String, Vec<String>>,
    /// Workflow name → newest version.
    pub workflows: BTreeMap<String, u32>,
}

impl Catalog {
    pub fn from_handlers(handlers: &[LoadedHandler]) -> Self {
        let mut catalog = Self::default();
        for h in handlers {
            let entry = catalog
                .handlers
                .entry(h.spec.name.clone())
                .or_insert((h.spec.version, h.spec.priority));
            if h.spec.version >= entry.0 {
                *entry = (h.spec.version, h.spec.priority);
            }
            for c in &h.spec.capabilities {
                let names = catalog.capabilities.entry(c.clone()).or_default();
                if !names.contains(&h.spec.name) {
                    names.push(h.spec.name.clone());
                    names.sort();
                }
            }
        }
        catalog
    }

    pub fn add_workflow(&mut self, name: &str, version: u32) {
        let v = self.workflows.entry(name.to_string()).or_insert(version);
        *v = (*v).max(version);
    }

    /// The handler (name, version, priority) a call goes to. A capability picks among its
    /// handlers by a stable hash of `key`, so a replay picks the same one.
    pub fn resolve(&self, target: &Target, key: &str) -> Result<(String, u32, Priority), String> {
        let name = match target {
            Target::Handler(name) => name.clone(),
            Target::Capability(c) => {
                let names = self
                    .capabilities
                    .get(c)
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| format!("no handler has capability `{c}`"))?;
                let i = grizzly_shared::ids::stable_hash(key) % names.len() as u64;
                names[i as usize].clone()
            }
        };
        let (version, priority) = self
            .handlers
            .get(&name)
            .ok_or_else(|| format!("unknown handler `{name}`"))?;
        Ok((name, *version, *priority))
    }
}

/// A parsed, validated workflow version with its source text.
#[derive(Debug, Clone)]
pub struct LoadedWorkflow {
    pub spec: WorkflowSpec,
    pub path: PathBuf,
    pub source: String,
    /// sha256 of the source: a version's content is fixed once an instance ran it.
    pub digest: String,
}

impl LoadedWorkflow {
    pub fn name(&self) -> &str {
        self.spec.name()
    }
    pub fn version(&self) -> u32 {
        self.spec.version
    }
}

pub fn digest(text: &str) -> String {
    let d = Sha256::digest(text.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses one workflow file's text (syntax, shape, unknown keys).
pub fn parse_workflow(path: &Path, text: &str) -> Result<WorkflowSpec, Vec<WorkflowFileError>> {
    serde_saphyr::from_str::<WorkflowSpec>(text).map_err(|e| {
        let loc = e.location();
        vec![WorkflowFileError {
            path: path.to_path_buf(),
            line: loc.map(|l| l.line()).filter(|l| *l > 0),
            column: loc
                .map(|l| l.column())
                .filter(|_| loc.is_some_and(|l| l.line() > 0)),
            message: yaml_message(&e.to_string()),
        }]
    })
}

/// Parses and validates one file against `catalog`.
pub fn load_workflow(
    path: &Path,
    text: &str,
    catalog: &Catalog,
) -> Result<LoadedWorkflow, Vec<WorkflowFileError>> {
    let spec = parse_workflow(path, text)?;
    let problems = validate(&spec, text, catalog);
    if problems.is_empty() {
        Ok(LoadedWorkflow {
            spec,
            path: path.to_path_buf(),
            source: text.to_string(),
            digest: digest(text),
        })
    } else {
        Err(problems
            .into_iter()
            .map(|p| WorkflowFileError {
                path: path.to_path_buf(),
                line: p.line,
                column: p.column,
                message: p.message,
            })
            .collect())
    }
}

/// `*.yaml` / `*.yml` files directly in `dir` (a missing directory has none), sorted.
pub fn workflow_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    paths.sort();
    Ok(paths)
}

/// Loads and validates `paths` together (they may run each other as sub-workflows). Returns
/// every problem in every file. Two files with the same name and version are an error.
pub fn load_files(
    paths: &[PathBuf],
    handlers: &[LoadedHandler],
) -> Result<Vec<LoadedWorkflow>, WorkflowErrors> {
    let mut catalog = Catalog::from_handlers(handlers);
    let mut errors = Vec::new();
    let mut parsed = Vec::new();
    for path in paths {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                // A first pass for the names, so sub-workflow references resolve in any order.
                if let Ok(spec) = parse_workflow(path, &text) {
                    catalog.add_workflow(spec.name(), spec.version);
                }
                parsed.push((path.clone(), text));
            }
            Err(e) => errors.push(WorkflowFileError {
                path: path.clone(),
                line: None,
                column: None,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    let mut loaded: Vec<LoadedWorkflow> = Vec::new();
    let mut seen: HashMap<(String, u32), PathBuf> = HashMap::new();
    for (path, text) in parsed {
        match load_workflow(&path, &text, &catalog) {
            Ok(w) => {
                if let Some(first) = seen.insert((w.name().to_string(), w.version()), path.clone())
                {
                    errors.push(WorkflowFileError {
                        path: path.clone(),
                        line: Some(w.spec.name.referenced.line()),
                        column: Some(w.spec.name.referenced.column()),
                        message: format!(
                            "name: workflow `{}` version {} is also defined in {}",
                            w.name(),
                            w.version(),
                            first.display()
                        ),
                    });
                }
                loaded.push(w);
            }
            Err(mut es) => errors.append(&mut es),
        }
    }
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(WorkflowErrors(errors))
    }
}

/// Loads every workflow in `dir`.
pub fn load_dir(
    dir: &Path,
    handlers: &[LoadedHandler],
) -> Result<Vec<LoadedWorkflow>, WorkflowErrors> {
    let paths = workflow_files(dir).map_err(|e| {
        WorkflowErrors(vec![WorkflowFileError {
            path: dir.to_path_buf(),
            line: None,
            column: None,
            message: format!("cannot read workflow directory: {e}"),
        }])
    })?;
    load_files(&paths, handlers)
}

/// A semantic problem at a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: Option<u64>,
    pub column: Option<u64>,
    pub message: String,
}

struct Checker<'a> {
    text: &'a str,
    catalog: &'a Catalog,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn at(&mut self, loc: &Located, message: String) {
        let known = loc.referenced.line() > 0;
        self.problems.push(Problem {
            line: known.then(|| loc.referenced.line()),
            column: known.then(|| loc.referenced.column()),
            message,
        });
    }

    /// Position of `needle` in the source at or after `from` (a line), for values that serde
    /// gives us without a span (strings inside mappings).
    fn find(&self, needle: &str, from: u64) -> (Option<u64>, Option<u64>) {
        for (i, line) in self.text.lines().enumerate() {
            let n = i as u64 + 1;
            if n < from {
                continue;
            }
            if let Some(col) = line.find(needle) {
                return (Some(n), Some(line[..col].chars().count() as u64 + 1));
            }
        }
        (None, None)
    }

    fn near(&mut self, needle: &str, from: &Located, message: String) {
        let (line, column) = self.find(needle, from.referenced.line());
        let (line, column) = match line {
            Some(_) => (line, column),
            None => (Some(from.referenced.line()), Some(from.referenced.column())),
        };
        self.problems.push(Problem {
            line,
            column,
            message,
        });
    }

    fn expr(&mut self, loc: &Located, what: &str, vars: &[&str]) {
        if let Err(e) = expr::check(expr::strip(&loc.value), vars) {
            self.at(loc, format!("{what}: bad expression `{}`: {e}", loc.value));
        }
    }

    fn template(&mut self, value: &Value, what: &str, near: &Located, vars: &[&str]) {
        for s in expr::strings(value) {
            match expr::parts(s) {
                Err(e) => self.near(s, near, format!("{what}: bad template `{s}`: {e}")),
                Ok(parts) => {
                    for p in parts {
                        if let expr::Part::Expr(e) = p
                            && let Err(err) = expr::check(e, vars)
                        {
                            self.near(e, near, format!("{what}: bad expression `{e}`: {err}"));
                        }
                    }
                }
            }
        }
    }

    fn target(&mut self, call: Option<&Located>, capability: Option<&Located>, what: &str) {
        if let Some(h) = call
            && !self.catalog.handlers.contains_key(&h.value)
        {
            let known: Vec<&str> = self.catalog.handlers.keys().map(String::as_str).collect();
            self.at(
                h,
                format!(
                    "{what}: unknown handler `{}` (known: {})",
                    h.value,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        }
        if let Some(c) = capability
            && !self.catalog.capabilities.contains_key(&c.value)
        {
            self.at(
                c,
                format!("{what}: no handler declares capability `{}`", c.value),
            );
        }
    }

    /// Checks one sequence: its steps, their jumps, and which steps can be reached.
    fn sequence(&mut self, steps: &[Step], vars: &[&str], ids: &mut HashMap<String, Located>) {
        let index: HashMap<&str, usize> =
            steps.iter().enumerate().map(|(i, s)| (s.id(), i)).collect();
        let mut reachable = vec![false; steps.len()];
        if !steps.is_empty() {
            reachable[0] = true;
        }
        for (i, step) in steps.iter().enumerate() {
            self.step(step, vars, ids);
            // Where control can go after this step.
            let mut targets: Vec<(&Located, Next)> = Vec::new();
            let mut falls_through = true;
            if let Some(then) = &step.then {
                targets.push((then, Next::parse(&then.value)));
                falls_through = false;
            }
            if let Some(cases) = &step.switch {
                for case in cases {
                    targets.push((&case.then, Next::parse(&case.then.value)));
                }
                if cases.iter().any(|c| c.when.is_none()) {
                    falls_through = false;
                }
            }
            if step.condition.is_some() {
                // A skipped step continues with the next one.
                falls_through = true;
            }
            for (loc, next) in targets {
                match next {
                    Next::Continue => falls_through = true,
                    Next::End => {}
                    Next::Goto(id) => match index.get(id.as_str()) {
                        Some(&j) if j > i => {
                            if reachable[i] {
                                reachable[j] = true;
                            }
                        }
                        Some(_) => self.at(
                            loc,
                            format!(
                                "then: `{id}` is not after step `{}`; jumps go forward only (use `for` to repeat work)",
                                step.id()
                            ),
                        ),
                        None => self.at(
                            loc,
                            format!(
                                "then: no step `{id}` in the same sequence as `{}` (expected a later step id, `end` or `continue`)",
                                step.id()
                            ),
                        ),
                    },
                }
            }
            if falls_through && reachable[i] && i + 1 < steps.len() {
                reachable[i + 1] = true;
            }
        }
        for (i, step) in steps.iter().enumerate() {
            if !reachable[i] {
                self.at(
                    &step.id,
                    format!(
                        "step `{}` is unreachable: no step before it continues or jumps to it",
                        step.id()
                    ),
                );
            }
        }
    }

    fn id(&mut self, loc: &Located, ids: &mut HashMap<String, Located>) {
        let id = &loc.value;
        if !is_valid_token(id) || id == "end" || id == "continue" {
            self.at(
                loc,
                format!("id: `{id}` must match [A-Za-z0-9_-]+ and not be `end` or `continue`"),
            );
        }
        if let Some(first) = ids.get(id) {
            let (l, c) = (first.referenced.line(), first.referenced.column());
            self.at(
                loc,
                format!("id: duplicate step id `{id}` (first defined at line {l}, column {c})"),
            );
        } else {
            ids.insert(id.clone(), loc.clone());
        }
    }

    fn step(&mut self, step: &Step, vars: &[&str], ids: &mut HashMap<String, Located>) {
        self.id(&step.id, ids);
        let sid = step.id();
        let kinds = step.kinds();
        match kinds.len() {
            0 => self.at(
                &step.id,
                format!(
                    "step `{sid}` does nothing: give one of call, capability, run, fork, switch, wait, sleep, raise, emit"
                ),
            ),
            1 => {}
            _ => self.at(
                &step.id,
                format!(
                    "step `{sid}` has several kinds ({}); give exactly one",
                    kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
                ),
            ),
        }
        let kind = step.kind();
        let calls = matches!(kind, StepKind::Call | StepKind::Run);
        let mut own_vars: Vec<&str> = vars.to_vec();
        if let Some(f) = &step.for_each {
            if !calls {
                self.at(
                    &step.id,
                    format!("for: step `{sid}` fans out a call or run; it has neither"),
                );
            }
            self.expr(&f.list, "for.in", vars);
            for name in [&f.each, &f.at] {
                if !is_identifier(name) {
                    self.at(
                        &step.id,
                        format!("for: `{name}` is not a valid variable name"),
                    );
                }
            }
            if f.concurrency == Some(0) {
                self.at(&step.id, "for.concurrency: must be at least 1".into());
            }
            if f.join == Join::Count(0) {
                self.at(&f.list, "for.join: n must be at least 1".into());
            }
            own_vars.push(f.each.as_str());
            own_vars.push(f.at.as_str());
        }
        if let Some(c) = &step.condition {
            self.expr(c, "if", vars);
        }
        if !calls {
            for (present, key) in [
                (step.with.is_some(), "with"),
                (step.compensate.is_some(), "compensate"),
            ] {
                if present {
                    self.at(
                        &step.id,
                        format!("{key}: only a call or run step takes `{key}` (step `{sid}`)"),
                    );
                }
            }
        }
        if kind != StepKind::Call {
            for (present, key) in [
                (step.timeout.is_some(), "timeout"),
                (step.retry.is_some(), "retry"),
            ] {
                if present {
                    self.at(
                        &step.id,
                        format!("{key}: only a call step takes `{key}` (step `{sid}`)"),
                    );
                }
            }
        }
        if step.timeout.is_some_and(|t| t.is_zero()) {
            self.at(&step.id, "timeout: must be greater than zero".into());
        }
        if step.retry.as_ref().is_some_and(|r| r.max_attempts == 0) {
            self.at(&step.id, "retry.max_attempts: must be at least 1".into());
        }
        self.target(step.call.as_ref(), step.capability.as_ref(), "call");
        if let Some(w) = &step.run
            && !self.catalog.workflows.contains_key(&w.value)
        {
            self.at(w, format!("run: unknown workflow `{}`", w.value));
        }
        if let Some(with) = &step.with {
            self.template(with, "with", &step.id, &own_vars);
        }
        if let Some(out) = &step.output {
            let mut v = own_vars.clone();
            v.push("result");
            self.template(out, "output", &step.id, &v);
        }
        if let Some(c) = &step.compensate {
            if c.target().is_none() {
                self.at(&step.id, "compensate: give `call` or `capability`".into());
            }
            self.target(c.call.as_ref(), c.capability.as_ref(), "compensate");
            if let Some(with) = &c.with {
                let mut v = own_vars.clone();
                v.push("output");
                self.template(with, "compensate.with", &step.id, &v);
            }
        }
        if let Some(fork) = &step.fork {
            if fork.branches.is_empty() {
                self.at(&step.id, "fork: needs at least one branch".into());
            }
            match fork.join {
                Join::Count(n) if n == 0 || n as usize > fork.branches.len() => self.at(
                    &step.id,
                    format!(
                        "fork.join: {n} is not between 1 and the number of branches ({})",
                        fork.branches.len()
                    ),
                ),
                _ => {}
            }
            let mut branch_ids: HashMap<String, Located> = HashMap::new();
            for b in &fork.branches {
                if !is_valid_token(&b.id.value) {
                    self.at(
                        &b.id,
                        format!("branch id `{}` must match [A-Za-z0-9_-]+", b.id.value),
                    );
                }
                if branch_ids
                    .insert(b.id.value.clone(), b.id.clone())
                    .is_some()
                {
                    self.at(&b.id, format!("duplicate branch id `{}`", b.id.value));
                }
                if b.steps.is_empty() {
                    self.at(&b.id, format!("branch `{}` has no steps", b.id.value));
                }
                self.sequence(&b.steps, vars, ids);
            }
        }
        if let Some(cases) = &step.switch {
            if cases.is_empty() {
                self.at(&step.id, "switch: needs at least one case".into());
            }
            let mut default_seen = false;
            for case in cases {
                if default_seen {
                    self.at(
                        &case.then,
                        "switch: a case after the default case (no `when`) can never match".into(),
                    );
                }
                match &case.when {
                    Some(w) => self.expr(w, "when", vars),
                    None => default_seen = true,
                }
            }
        }
        if let Some(w) = &step.wait {
            if let Err(e) = validate_pattern(&w.event.value) {
                self.at(&w.event, format!("wait.event: {e}"));
            }
            if w.timeout.is_some_and(|t| t.is_zero()) {
                self.at(&w.event, "wait.timeout: must be greater than zero".into());
            }
            if let Some(c) = &w.correlate {
                if let Some(a) = &c.aggregate {
                    self.expr(a, "correlate.aggregate", vars);
                }
                match (&c.field, &c.equals) {
                    (Some(_), Some(eq)) => self.expr(eq, "correlate.equals", vars),
                    (None, None) => {}
                    _ => self.at(
                        &w.event,
                        "correlate: `field` and `equals` go together".into(),
                    ),
                }
            }
        }
        if step.sleep.is_some_and(|d| d.is_zero()) {
            self.at(&step.id, "sleep: must be greater than zero".into());
        }
        if let Some(r) = &step.raise {
            self.template(&Value::String(r.value.clone()), "raise", r, vars);
        }
        if let Some(e) = &step.emit {
            let subject = e.event.value.clone();
            self.template(
                &Value::String(subject.clone()),
                "emit.event",
                &e.event,
                vars,
            );
            if !subject.contains("${")
                && let Err(err) = grizzly_shared::EventSubject::parse(&subject)
            {
                self.at(&e.event, format!("emit.event: {err}"));
            }
            if let Some(d) = &e.data {
                self.template(d, "emit.data", &e.event, vars);
            }
        }
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Semantic checks on a parsed workflow: names, handlers, capabilities, sub-workflows,
/// expressions, jumps, unreachable and duplicate steps. Every problem, in file order.
pub fn validate(spec: &WorkflowSpec, text: &str, catalog: &Catalog) -> Vec<Problem> {
    let mut c = Checker {
        text,
        catalog,
        problems: Vec::new(),
    };
    let name = &spec.name.value;
    let name_ok = is_valid_token(name)
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !name_ok {
        c.at(&spec.name, format!("name: `{name}` must match [a-z0-9_-]+"));
    }
    if spec.version == 0 {
        c.at(&spec.name, "version: must be at least 1".into());
    }
    for p in &spec.on {
        if let Err(e) = validate_pattern(&p.value) {
            c.at(p, format!("on: {e}"));
        }
    }
    if spec.steps.is_empty() {
        c.at(&spec.name, "do: a workflow needs at least one step".into());
    }
    if let Some(input) = &spec.input {
        c.template(input, "input", &spec.name, &["trigger"]);
    }
    let mut ids = HashMap::new();
    c.sequence(&spec.steps, expr::ROOT_VARS, &mut ids);
    if let Some(out) = &spec.output {
        c.template(out, "output", &spec.name, expr::ROOT_VARS);
    }
    let mut problems = c.problems;
    problems.sort_by_key(|p| (p.line.unwrap_or(u64::MAX), p.column.unwrap_or(0)));
    problems.dedup();
    problems
}

/// The JSON Schema of the DSL (for editors).
pub fn json_schema() -> Value {
    serde_json::to_value(schemars::schema_for!(WorkflowSpec)).expect("a schema serializes")
}

/// Names of workflows referenced by `run` steps.
pub fn sub_workflows(spec: &WorkflowSpec) -> BTreeSet<String> {
    spec.all_steps()
        .iter()
        .filter_map(|s| s.run.as_ref().map(|r| r.value.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        let mut c = Catalog::default();
        c.handlers.insert("build".into(), (1, Priority::Normal));
        c.handlers.insert("undo".into(), (1, Priority::Normal));
        c.capabilities.insert("review".into(), vec!["build".into()]);
        c
    }

    fn errors(text: &str) -> Vec<String> {
        match load_workflow(Path::new("wf.yaml"), text, &catalog()) {
            Ok(_) => Vec::new(),
            Err(es) => es.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn a_valid_workflow_loads() {
        let ok = "name: w\non: [\"events.pr.*.opened\"]\ndo:\n  - id: a\n    call: build\n    with: { x: \"${ input.n + 1 }\" }\n    compensate: { call: undo }\n  - id: b\n    capability: review\n";
        assert_eq!(errors(ok), Vec::<String>::new());
    }

    #[test]
    fn each_malformed_file_gets_its_precise_error() {
        // YAML syntax.
        let e = errors("name: w\ndo: [\n  - id: a\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("wf.yaml:"), "{e:?}");
        // Unknown key, with its line.
        let e = errors("name: w\ndo:\n  - id: a\n    call: build\n    retries: 3\n");
        assert!(
            e[0].starts_with("wf.yaml:5:") && e[0].contains("retries"),
            "{e:?}"
        );
        // Unknown handler: file, line and column of the name.
        let e = errors("name: w\ndo:\n  - id: a\n    call: biuld\n");
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("wf.yaml:4:11: call: unknown handler `biuld`"),
            "{e:?}"
        );
        // Unknown capability.
        let e = errors("name: w\ndo:\n  - id: a\n    capability: sing\n");
        assert!(e[0].contains("capability `sing`"), "{e:?}");
        // Bad expressions: syntax, unknown variable, inside a template.
        let e = errors("name: w\ndo:\n  - id: a\n    if: \"input.n >\"\n    call: build\n");
        assert!(
            e[0].starts_with("wf.yaml:4:") && e[0].contains("if: bad expression"),
            "{e:?}"
        );
        let e = errors(
            "name: w\ndo:\n  - id: a\n    call: build\n    with:\n      x: \"${ inptu.n }\"\n",
        );
        assert!(
            e[0].starts_with("wf.yaml:6:") && e[0].contains("`inptu`"),
            "{e:?}"
        );
        // Duplicate and unreachable steps, jumps.
        let e = errors("name: w\ndo:\n  - id: a\n    call: build\n  - id: a\n    call: build\n");
        assert!(
            e[0].starts_with("wf.yaml:5:") && e[0].contains("duplicate step id `a`"),
            "{e:?}"
        );
        let e = errors(
            "name: w\ndo:\n  - id: a\n    call: build\n    then: end\n  - id: b\n    call: build\n",
        );
        assert!(
            e[0].starts_with("wf.yaml:6:") && e[0].contains("`b` is unreachable"),
            "{e:?}"
        );
        let e = errors(
            "name: w\ndo:\n  - id: a\n    call: build\n  - id: b\n    call: build\n    then: a\n",
        );
        assert!(e[0].contains("forward only"), "{e:?}");
        let e = errors("name: w\ndo:\n  - id: a\n    call: build\n    then: nowhere\n");
        assert!(e[0].contains("no step `nowhere`"), "{e:?}");
        // A step with two kinds, and one with none.
        let e = errors(
            "name: w\ndo:\n  - id: a\n    call: build\n    sleep: 1s\n  - id: b\n    if: 'true'\n",
        );
        assert!(e.iter().any(|m| m.contains("several kinds")), "{e:?}");
        assert!(e.iter().any(|m| m.contains("does nothing")), "{e:?}");
        // Every problem is reported, not just the first.
        let e = errors("name: W\ndo:\n  - id: a\n    call: nope\n  - id: a\n    run: missing\n");
        assert!(e.len() >= 4, "{e:?}");
    }

    #[test]
    fn the_schema_describes_the_dsl() {
        let schema = json_schema();
        let text = schema.to_string();
        for key in [
            "fork",
            "switch",
            "wait",
            "compensate",
            "for",
            "then",
            "correlate",
        ] {
            assert!(text.contains(&format!("\"{key}\"")), "{key} missing");
        }
    }
}
