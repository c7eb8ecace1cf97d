//! `grizzly workflow test`: runs a workflow through the real interpreter with scripted handler
//! outcomes and scripted events — no model, no broker, virtual time (timers fire at once, in due
//! order, when nothing else is left to do).
//!
//! A test file (YAML):
//!
//! ```yaml
//! workflow: ../provision.yaml          # relative to the test file
//! cases:
//!   - name: database fails, network is rolled back
//!     input: { env: staging }
//!     steps:                           # by step id (or `id[i]` for one `for` item)
//!       database: { error: "quota exceeded" }
//!     handlers:                        # by handler name, for steps not scripted above
//!       wf_provision: { output: "${ {'id': input.resource} }" }
//!     events:                          # delivered in order to waiting steps
//!       - { event: events.approval.pr-1.granted, data: { by: alice } }
//!     expect:
//!       status: failed
//!       steps: { network: succeeded, database: failed }
//!       compensated: [network]
//! ```
//!
//! An unscripted call succeeds with a null output. `output` is a template over `input` (the
//! step event's data).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use grizzly_shared::handler::LoadedHandler;
use grizzly_shared::{EventEnvelope, EventSubject};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::dsl::{self, Catalog, LoadedWorkflow};
use crate::expr::{self, Vars};
use crate::instance::{AGGREGATE, Ctx, Effect, Input, InstanceState, ParentRef};
use crate::machine::Status;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestFile {
    pub workflow: PathBuf,
    pub cases: Vec<TestCase>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestCase {
    pub name: String,
    #[serde(default)]
    pub input: Value,
    #[serde(default)]
    pub steps: BTreeMap<String, Scripted>,
    #[serde(default)]
    pub handlers: BTreeMap<String, Scripted>,
    #[serde(default)]
    pub events: Vec<ScriptedEvent>,
    #[serde(default)]
    pub expect: Expect,
}

/// A scripted outcome: `output` (a template over `input`) or `error`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scripted {
    #[serde(default)]
    pub output: Value,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedEvent {
    pub event: String,
    #[serde(default)]
    pub data: Value,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub output: Option<Value>,
    #[serde(default)]
    pub steps: BTreeMap<String, String>,
    /// Step keys of the calls made, in order (compensations included, as `<key>.compensate`).
    #[serde(default)]
    pub calls: Option<Vec<String>>,
    /// Step keys compensated, in order.
    #[serde(default)]
    pub compensated: Option<Vec<String>>,
    #[serde(default)]
    pub error_contains: Option<String>,
}

/// What a simulated run ended with.
#[derive(Debug, Clone)]
pub struct Run {
    pub state: InstanceState,
    pub calls: Vec<String>,
    pub compensated: Vec<String>,
    /// Every event written, as `type step?`.
    pub events: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: String,
    pub problems: Vec<String>,
    pub run: Option<Run>,
}

/// Workflows available to a simulation: the one under test and its sub-workflows.
pub struct World {
    pub workflows: BTreeMap<String, LoadedWorkflow>,
    pub catalog: Catalog,
}

impl World {
    /// Loads `workflow` plus every workflow in its directory (for `run` steps).
    pub fn load(workflow: &Path, handlers: &[LoadedHandler]) -> anyhow::Result<(Self, String)> {
        let dir = workflow.parent().unwrap_or(Path::new("."));
        let mut paths = dsl::workflow_files(dir)?;
        let canonical = workflow.canonicalize().unwrap_or(workflow.to_path_buf());
        if !paths
            .iter()
            .any(|p| p.canonicalize().unwrap_or(p.clone()) == canonical)
        {
            paths.push(workflow.to_path_buf());
        }
        // Only the workflow under test must be valid; siblings are best effort.
        let text = std::fs::read_to_string(workflow)
            .with_context(|| format!("reading {}", workflow.display()))?;
        let mut catalog = Catalog::from_handlers(handlers);
        let mut workflows = BTreeMap::new();
        for p in &paths {
            if let Ok(t) = std::fs::read_to_string(p)
                && let Ok(spec) = dsl::parse_workflow(p, &t)
            {
                catalog.add_workflow(spec.name(), spec.version);
            }
        }
        let main = dsl::load_workflow(workflow, &text, &catalog)
            .map_err(|e| anyhow::anyhow!("{}", dsl::WorkflowErrors(e)))?;
        let name = main.name().to_string();
        for p in &paths {
            if let Ok(t) = std::fs::read_to_string(p)
                && let Ok(w) = dsl::load_workflow(p, &t, &catalog)
            {
                let keep = workflows
                    .get(w.name())
                    .is_none_or(|old: &LoadedWorkflow| old.version() < w.version());
                if keep && w.name() != name {
                    workflows.insert(w.name().to_string(), w);
                }
            }
        }
        workflows.insert(name.clone(), main);
        Ok((Self { workflows, catalog }, name))
    }
}

fn cause(instance: &str, data: Value) -> EventEnvelope {
    let subject = EventSubject::new(AGGREGATE, instance, "start_requested").expect("valid");
    let mut e = EventEnvelope::new(&subject, "grizzly/test", data);
    e.id = format!("test-{instance}");
    e.correlationid = Some(e.id.clone());
    e
}

/// Runs one case to its end (or until nothing can happen any more).
pub fn run_case(world: &World, workflow: &str, case: &TestCase) -> Result<Run, String> {
    let mut instances: BTreeMap<String, InstanceState> = BTreeMap::new();
    let mut queue: VecDeque<(String, Input, EventEnvelope)> = VecDeque::new();
    let mut events: VecDeque<ScriptedEvent> = case.events.iter().cloned().collect();
    let (mut calls, mut compensated, mut written) = (Vec::new(), Vec::new(), Vec::new());
    let mut now = 0u64;
    let root_cause = cause("root", json!({}));
    let (root, fx) = InstanceState::start(
        &Ctx {
            def: &world.workflows[workflow].spec,
            catalog: &world.catalog,
            now_ms: now,
            cause: &root_cause,
        },
        "root",
        Some(case.input.clone()),
        None,
    );
    instances.insert("root".into(), root);
    let mut pending_fx: VecDeque<(String, Effect)> =
        fx.into_iter().map(|f| ("root".to_string(), f)).collect();
    for _ in 0..100_000 {
        // 1. Effects → scripted outcomes, child starts, child ends.
        while let Some((_, effect)) = pending_fx.pop_front() {
            let event = effect.event().clone();
            let step = event
                .data
                .get("_step")
                .and_then(|m| m.get("step"))
                .or_else(|| event.data.get("step"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            written.push(format!("{} {step}", event.event_type).trim().to_string());
            match &effect {
                Effect::Task { handler, .. } => {
                    calls.push(step.clone());
                    if let Some(of) = step.strip_suffix(".compensate") {
                        compensated.push(of.to_string());
                    }
                    let base = step.split(['[', '.']).next().unwrap_or(&step);
                    let scripted = case
                        .steps
                        .get(&step)
                        .or_else(|| case.steps.get(base))
                        .or_else(|| case.handlers.get(handler))
                        .cloned()
                        .unwrap_or_default();
                    let mut vars = Vars::new();
                    vars.insert("input".into(), event.data.clone());
                    let (ok, output, error) = match scripted.error {
                        Some(e) => (false, Value::Null, Some(e)),
                        None => match expr::render(&scripted.output, &vars) {
                            Ok(o) => (true, o, None),
                            Err(e) => (false, Value::Null, Some(format!("scripted output: {e}"))),
                        },
                    };
                    queue.push_back((
                        event.aggregateid.clone(),
                        Input::Outcome {
                            event_id: event.id.clone(),
                            ok,
                            output,
                            error,
                        },
                        event.clone(),
                    ));
                }
                Effect::Event { event } if event.event_type == "start_requested" => {
                    let d = &event.data;
                    let name = d["workflow"].as_str().unwrap_or_default();
                    let def = world
                        .workflows
                        .get(name)
                        .ok_or_else(|| format!("sub-workflow `{name}` is not loaded"))?;
                    let parent: Option<ParentRef> =
                        serde_json::from_value(d["parent"].clone()).ok();
                    let (child, fx) = InstanceState::start(
                        &Ctx {
                            def: &def.spec,
                            catalog: &world.catalog,
                            now_ms: now,
                            cause: event,
                        },
                        &event.aggregateid,
                        Some(d["input"].clone()),
                        parent,
                    );
                    for f in fx {
                        pending_fx.push_back((child.id.clone(), f));
                    }
                    instances.insert(child.id.clone(), child);
                }
                Effect::Event { event }
                    if matches!(
                        event.event_type.as_str(),
                        "completed" | "failed" | "cancelled"
                    ) =>
                {
                    if let Some(parent) = event
                        .data
                        .get("parent")
                        .and_then(|p| serde_json::from_value::<ParentRef>(p.clone()).ok())
                    {
                        let d = &event.data;
                        queue.push_back((
                            parent.instance,
                            Input::Child {
                                child: event.aggregateid.clone(),
                                ok: event.event_type == "completed",
                                output: d.get("output").cloned().unwrap_or_default(),
                                error: d.get("error").and_then(Value::as_str).map(str::to_string),
                            },
                            event.clone(),
                        ));
                    }
                }
                Effect::Event { event } if event.event_type == "cancel_requested" => {
                    queue.push_back((
                        event.aggregateid.clone(),
                        Input::Request {
                            transition: crate::machine::Transition::Cancel,
                            reason: None,
                        },
                        event.clone(),
                    ));
                }
                Effect::Event { .. } => {}
            }
        }
        // 2. The next input, else the next scripted event, else the next timer.
        if let Some((id, input, cause)) = queue.pop_front() {
            let Some(st) = instances.get_mut(&id) else {
                continue;
            };
            let def = &world.workflows[&st.workflow].spec;
            let fx = st.apply(
                &Ctx {
                    def,
                    catalog: &world.catalog,
                    now_ms: now,
                    cause: &cause,
                },
                input,
            );
            pending_fx.extend(fx.into_iter().map(|f| (id.clone(), f)));
            continue;
        }
        if let Some(scripted) = events.pop_front() {
            let subject =
                EventSubject::parse(&scripted.event).map_err(|e| format!("scripted event: {e}"))?;
            let event = EventEnvelope::new(&subject, "grizzly/test", scripted.data.clone());
            let mut json = serde_json::to_value(&event).unwrap_or_default();
            json["subject"] = json!(scripted.event);
            for (id, st) in &instances {
                for (step, wait) in st.waits() {
                    if wait.matches(&scripted.event, &event) {
                        queue.push_back((
                            id.clone(),
                            Input::Event {
                                step: step.to_string(),
                                event: json.clone(),
                            },
                            event.clone(),
                        ));
                    }
                }
            }
            continue;
        }
        let next_timer = instances
            .iter()
            .flat_map(|(id, st)| {
                st.timers
                    .iter()
                    .map(move |(t, due)| (*due, id.clone(), t.clone()))
            })
            .min();
        match next_timer {
            Some((due, id, timer)) => {
                now = now.max(due);
                let c = cause(&id, json!({"timer": timer}));
                queue.push_back((id, Input::Timer { id: timer }, c));
            }
            None => break,
        }
    }
    Ok(Run {
        state: instances.remove("root").expect("root instance"),
        calls,
        compensated,
        events: written,
    })
}

/// Checks a run against a case's expectations.
pub fn check(case: &TestCase, run: &Run) -> Vec<String> {
    let mut problems = Vec::new();
    let e = &case.expect;
    if let Some(status) = &e.status
        && run.state.status.as_str() != status
    {
        problems.push(format!(
            "status: expected {status}, got {} (error: {})",
            run.state.status,
            run.state.error.clone().unwrap_or_default()
        ));
    }
    if let Some(output) = &e.output
        && &run.state.output != output
    {
        problems.push(format!(
            "output: expected {output}, got {}",
            run.state.output
        ));
    }
    for (step, want) in &e.steps {
        let got = run
            .state
            .steps
            .get(step)
            .map(|r| r.status.as_str())
            .unwrap_or("not_started");
        if got != want {
            problems.push(format!("step `{step}`: expected {want}, got {got}"));
        }
    }
    if let Some(calls) = &e.calls
        && calls != &run.calls
    {
        problems.push(format!("calls: expected {calls:?}, got {:?}", run.calls));
    }
    if let Some(comp) = &e.compensated
        && comp != &run.compensated
    {
        problems.push(format!(
            "compensated: expected {comp:?}, got {:?}",
            run.compensated
        ));
    }
    if let Some(text) = &e.error_contains {
        let err = run.state.error.clone().unwrap_or_default();
        if !err.contains(text) {
            problems.push(format!("error: expected to contain `{text}`, got `{err}`"));
        }
    }
    if run.state.status == Status::Pending {
        problems.push("the instance never started".into());
    }
    problems
}

/// Runs every case of a test file.
pub fn run_file(path: &Path, handlers: &[LoadedHandler]) -> anyhow::Result<Vec<CaseResult>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: TestFile = serde_saphyr::from_str(&text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!(":{}:{}", l.line(), l.column()))
            .unwrap_or_default();
        anyhow::anyhow!(
            "{}{at}: {}",
            path.display(),
            grizzly_shared::handler::yaml_message(&e.to_string())
        )
    })?;
    let workflow = path.parent().unwrap_or(Path::new(".")).join(&file.workflow);
    let (world, name) = World::load(&workflow, handlers)?;
    Ok(file
        .cases
        .iter()
        .map(|case| match run_case(&world, &name, case) {
            Ok(run) => CaseResult {
                name: case.name.clone(),
                problems: check(case, &run),
                run: Some(run),
            },
            Err(e) => CaseResult {
                name: case.name.clone(),
                problems: vec![e],
                run: None,
            },
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_workflows_pass_their_scripted_tests() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let handlers = grizzly_shared::handler::load_handlers(&root.join("handlers")).unwrap();
        let dir = root.join("workflows/tests");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(files.len() >= 4, "{files:?}");
        for file in files {
            for case in run_file(&file, &handlers).unwrap() {
                assert!(
                    case.problems.is_empty(),
                    "{} / {}: {:#?}\nevents: {:#?}",
                    file.display(),
                    case.name,
                    case.problems,
                    case.run.map(|r| r.events)
                );
            }
        }
    }
}
