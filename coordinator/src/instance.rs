//! One workflow instance: its state (checkpointed after every transition) and the interpreter
//! that moves it forward.
//!
//! The interpreter is a pure function of (definition, state, input): it changes the state and
//! returns [`Effect`]s — events to append and tasks to write — whose ids are derived from the
//! instance, the step and the transition count, never from the clock. The engine checkpoints the
//! state *with* its effects (the outbox) before publishing them, so a crash between the two
//! re-publishes the same ids (de-duplicated by the broker) instead of deciding again; and
//! `grizzly workflow test` drives the very same code with scripted outcomes and no broker.
//!
//! Scheduling re-walks the definition against the step records each time: a step with a record
//! is never started again, which is what makes "no completed step runs twice" hold.

use std::collections::{BTreeMap, VecDeque};

use grizzly_shared::ids::derived_id;
use grizzly_shared::{EventEnvelope, EventSubject, Priority};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::dsl::{Catalog, Join, Next, OnTimeout, Step, StepKind, WorkflowSpec};
use crate::expr::{self, Vars};
use crate::machine::{self, IllegalTransition, Status, Transition};

/// `source` of every event the coordinator writes.
pub const SOURCE: &str = "grizzly/coordinator";
/// Aggregate type of workflow instances.
pub const AGGREGATE: &str = "workflow";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// A `for` item not started yet.
    Pending,
    Running,
    Waiting,
    Succeeded,
    Failed,
    Skipped,
    TimedOut,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Waiting => "waiting",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
            Self::TimedOut => "timed_out",
        }
    }
}

/// Where a sub-workflow reports back to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    pub instance: String,
    pub step: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<usize>,
}

/// One unit of work of a step: its call or sub-workflow run (or one `for` item's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Part {
    pub status: StepStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child: Option<String>,
    #[serde(default)]
    pub output: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Part {
    fn pending() -> Self {
        Self {
            status: StepStatus::Pending,
            event_id: None,
            handler: None,
            child: None,
            output: Value::Null,
            error: None,
        }
    }
}

/// What a waiting step waits for; values were computed when the wait began.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaitRecord {
    pub pattern: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<Value>,
}

impl WaitRecord {
    /// Whether `event` (an envelope as JSON, with `subject`) is the one awaited.
    pub fn matches(&self, subject: &str, event: &EventEnvelope) -> bool {
        if !grizzly_shared::subject::pattern_matches(&self.pattern, subject) {
            return false;
        }
        if let Some(a) = &self.aggregate
            && &event.aggregateid != a
        {
            return false;
        }
        if let (Some(field), Some(equals)) = (&self.field, &self.equals) {
            let json = serde_json::to_value(event).unwrap_or_default();
            let mut v = &json;
            for key in field.split('.') {
                v = match v.get(key) {
                    Some(next) => next,
                    None => return false,
                };
            }
            if v != equals {
                return false;
            }
        }
        true
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub kind: String,
    pub status: StepStatus,
    #[serde(default)]
    pub output: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A switch's decision: `continue`, `end` or a step id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// `for`: the list, computed once when the step started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<Part>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<WaitRecord>,
    pub started_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
}

impl StepRecord {
    fn new(kind: StepKind, status: StepStatus, now_ms: u64) -> Self {
        Self {
            kind: kind.name().into(),
            status,
            output: Value::Null,
            error: None,
            next: None,
            items: None,
            parts: Vec::new(),
            wait: None,
            started_ms: now_ms,
            finished_ms: None,
        }
    }
}

/// What an in-flight step event or child instance belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRef {
    pub step: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<usize>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub compensation: bool,
}

/// The saga's progress after a failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Compensation {
    /// Set once nothing is in flight any more and the order is fixed.
    pub started: bool,
    /// (step, item) still to compensate, next first.
    pub queue: VecDeque<(String, Option<usize>)>,
    /// Compensation step event in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    /// Part keys compensated, in the order they ran.
    pub done: Vec<String>,
    pub errors: Vec<String>,
}

/// An effect of a transition, published after the checkpoint that records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Effect {
    /// Append an event.
    Event { event: EventEnvelope },
    /// Append a step event, then write its task (with the event's sequence) to `TASKS`.
    Task {
        event: EventEnvelope,
        handler: String,
        version: u32,
        priority: Priority,
        lane: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_attempts: Option<u32>,
    },
}

impl Effect {
    pub fn event(&self) -> &EventEnvelope {
        match self {
            Self::Event { event } | Self::Task { event, .. } => event,
        }
    }
}

/// The checkpoint of one instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceState {
    pub id: String,
    pub workflow: String,
    pub version: u32,
    pub status: Status,
    pub input: Value,
    /// The event that started the instance (as JSON).
    pub trigger: Value,
    pub correlation: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
    pub steps: BTreeMap<String, StepRecord>,
    /// Succeeded call parts in completion order (the saga's undo order, reversed).
    #[serde(default)]
    pub completed: Vec<(String, Option<usize>)>,
    /// Step event id (calls) or child instance id (runs) → the part it belongs to.
    #[serde(default)]
    pub inflight: BTreeMap<String, PartRef>,
    /// Durable timers: id (`<step>:timeout`, `<step>:sleep`) → due time (unix ms).
    #[serde(default)]
    pub timers: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<Compensation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub output: Value,
    /// Transitions taken (part of transition event ids).
    pub transitions: u32,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// `EVENTS` sequence of the last input applied: older deliveries are replays.
    pub last_seq: u64,
    /// Effects of the last transition, re-published when that input is delivered again.
    #[serde(default)]
    pub outbox: Vec<Effect>,
}

/// Something that happened to an instance.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A handler's final outcome for a step event (`handler_succeeded`, or `handler_failed`
    /// with `dead_lettered`).
    Outcome {
        event_id: String,
        ok: bool,
        output: Value,
        error: Option<String>,
    },
    Timer {
        id: String,
    },
    /// An awaited event arrived.
    Event {
        step: String,
        event: Value,
    },
    /// A sub-workflow ended.
    Child {
        child: String,
        ok: bool,
        output: Value,
        error: Option<String>,
    },
    /// Suspend, resume or cancel, asked for by an operator.
    Request {
        transition: Transition,
        reason: Option<String>,
    },
}

/// What the interpreter needs besides the state.
pub struct Ctx<'a> {
    pub def: &'a WorkflowSpec,
    pub catalog: &'a Catalog,
    pub now_ms: u64,
    /// The event being applied (causation of everything written).
    pub cause: &'a EventEnvelope,
}

/// Key of a part: `step` or `step[i]`.
pub fn part_key(step: &str, item: Option<usize>) -> String {
    match item {
        Some(i) => format!("{step}[{i}]"),
        None => step.to_string(),
    }
}

/// The instance id for a trigger event: one instance per (workflow, event).
pub fn instance_id_for_trigger(workflow: &str, event_id: &str) -> String {
    derived_id(&["workflow-instance", workflow, event_id])
}

/// The child instance id of a `run` step part.
pub fn child_id(parent: &str, key: &str) -> String {
    derived_id(&["workflow-child", parent, key])
}

/// The event id of a timer firing.
pub fn timer_event_id(instance: &str, timer: &str) -> String {
    derived_id(&["workflow", instance, "timer_fired", timer])
}

enum Flow {
    Done(Value),
    Pending,
    Failed(String),
}

enum StepFlow {
    /// `pass` = the step does not replace the sequence's last output (switch, skipped).
    Done {
        output: Value,
        next: Next,
        pass: bool,
    },
    Pending,
    Failed(String),
}

impl InstanceState {
    /// Creates and starts an instance. `input` is given (CLI, sub-workflow) or mapped from the
    /// trigger by the workflow's `input`.
    pub fn start(
        ctx: &Ctx<'_>,
        id: &str,
        input: Option<Value>,
        parent: Option<ParentRef>,
    ) -> (Self, Vec<Effect>) {
        let trigger = serde_json::to_value(ctx.cause).unwrap_or_default();
        let mut st = Self {
            id: id.to_string(),
            workflow: ctx.def.name().to_string(),
            version: ctx.def.version,
            status: Status::Pending,
            input: Value::Null,
            trigger,
            correlation: ctx.cause.correlation_id().to_string(),
            parent,
            steps: BTreeMap::new(),
            completed: Vec::new(),
            inflight: BTreeMap::new(),
            timers: BTreeMap::new(),
            compensation: None,
            error: None,
            output: Value::Null,
            transitions: 0,
            created_ms: ctx.now_ms,
            updated_ms: ctx.now_ms,
            last_seq: 0,
            outbox: Vec::new(),
        };
        let mut fx = Vec::new();
        let mapped = match input {
            Some(v) => Ok(v),
            None => match &ctx.def.input {
                Some(template) => {
                    let mut vars = Vars::new();
                    vars.insert("trigger".into(), st.trigger.clone());
                    expr::render(template, &vars)
                }
                None => Ok(ctx.cause.data.clone()),
            },
        };
        let mut exec = Exec {
            ctx,
            st: &mut st,
            fx: &mut fx,
        };
        let created = exec.event(
            "created",
            json!({
                "workflow": ctx.def.name(), "version": ctx.def.version, "status": "pending",
                "parent": exec.st.parent, "trigger_id": ctx.cause.id,
            }),
            &[],
        );
        exec.fx.push(Effect::Event { event: created });
        match mapped {
            Ok(input) => {
                exec.st.input = input;
                exec.transition(Transition::Start, json!({"input": exec.st.input}))
                    .expect("pending → running is legal");
                exec.advance();
            }
            Err(e) => {
                exec.st.error = Some(format!("input: {e}"));
                exec.transition(Transition::Fail, json!({"error": exec.st.error}))
                    .expect("pending → failed is legal");
            }
        }
        (st, fx)
    }

    /// Applies one input; returns the effects. Inputs that no longer matter (a late outcome
    /// of a cancelled instance, a timer already cleared) change nothing.
    pub fn apply(&mut self, ctx: &Ctx<'_>, input: Input) -> Vec<Effect> {
        let mut fx = Vec::new();
        let mut exec = Exec {
            ctx,
            st: self,
            fx: &mut fx,
        };
        exec.apply(input);
        if !fx.is_empty() {
            self.updated_ms = ctx.now_ms;
        }
        fx
    }

    /// Steps waiting for an event, with what they wait for.
    pub fn waits(&self) -> Vec<(&str, &WaitRecord)> {
        if self.status.is_terminal() || self.status == Status::Compensating {
            return Vec::new();
        }
        self.steps
            .iter()
            .filter(|(_, r)| r.status == StepStatus::Waiting)
            .filter_map(|(id, r)| r.wait.as_ref().map(|w| (id.as_str(), w)))
            .collect()
    }
}

struct Exec<'c, 's> {
    ctx: &'c Ctx<'c>,
    st: &'s mut InstanceState,
    fx: &'s mut Vec<Effect>,
}

impl<'c> Exec<'c, '_> {
    // ----- events ------------------------------------------------------------------------

    fn event(&self, event_type: &str, mut data: Value, id_parts: &[&str]) -> EventEnvelope {
        let subject = EventSubject::new(AGGREGATE, &self.st.id, event_type)
            .expect("instance ids and event types are valid tokens");
        if let Value::Object(m) = &mut data {
            m.entry("workflow").or_insert(json!(self.st.workflow));
            m.entry("version").or_insert(json!(self.st.version));
        }
        let mut e = self.ctx.cause.caused(&subject, SOURCE, data, &[]);
        let mut parts = vec!["workflow", self.st.id.as_str(), event_type];
        parts.extend_from_slice(id_parts);
        e.id = derived_id(&parts);
        e.correlationid = Some(self.st.correlation.clone());
        e
    }

    fn emit(&mut self, event_type: &str, data: Value, id_parts: &[&str]) {
        let event = self.event(event_type, data, id_parts);
        self.fx.push(Effect::Event { event });
    }

    /// Takes a transition (checked against the table) and records it as an event.
    fn transition(&mut self, t: Transition, extra: Value) -> Result<(), IllegalTransition> {
        let from = self.st.status;
        let to = machine::next(from, t)?;
        self.st.status = to;
        self.st.transitions += 1;
        let mut data = json!({
            "from": from, "transition": t, "status": to, "parent": self.st.parent,
        });
        if let (Value::Object(d), Value::Object(x)) = (&mut data, extra) {
            d.extend(x);
        }
        let n = self.st.transitions.to_string();
        self.emit(t.event_type(), data, &[&n]);
        Ok(())
    }

    // ----- inputs ------------------------------------------------------------------------

    fn apply(&mut self, input: Input) {
        // An ended instance takes no more input; a request to it is still answered (refused),
        // so whoever asked learns why nothing happened.
        if self.st.status.is_terminal() && !matches!(input, Input::Request { .. }) {
            return;
        }
        match input {
            Input::Request { transition, reason } => self.request(transition, reason),
            // A step's handler outcome or a sub-workflow's end: both finish an in-flight part.
            Input::Outcome {
                event_id: key,
                ok,
                output,
                error,
            }
            | Input::Child {
                child: key,
                ok,
                output,
                error,
            } => {
                let Some(part) = self.st.inflight.remove(&key) else {
                    return;
                };
                self.finish_part(part, ok, output, error);
                self.proceed();
            }
            Input::Timer { id } => {
                if self.st.timers.remove(&id).is_none() {
                    return;
                }
                self.timer(&id);
                self.proceed();
            }
            Input::Event { step, event } => {
                let waiting = self
                    .st
                    .steps
                    .get(&step)
                    .is_some_and(|r| r.status == StepStatus::Waiting && r.wait.is_some());
                if !waiting || self.st.status == Status::Compensating {
                    return;
                }
                self.st.timers.remove(&format!("{step}:timeout"));
                let def = self.ctx.def.step(&step);
                let output = match def.and_then(|s| s.output.as_ref()) {
                    Some(template) => {
                        let mut vars = self.vars();
                        vars.insert("result".into(), event.clone());
                        expr::render(template, &vars)
                    }
                    None => Ok(event.clone()),
                };
                match output {
                    Ok(output) => self.finish_step(&step, StepStatus::Succeeded, output, None),
                    Err(e) => self.finish_step(
                        &step,
                        StepStatus::Failed,
                        Value::Null,
                        Some(format!("output: {e}")),
                    ),
                }
                self.proceed();
            }
        }
    }

    /// After an input: schedule (running), run the saga (compensating), or only record
    /// (suspended).
    fn proceed(&mut self) {
        match self.st.status {
            Status::Running | Status::Waiting => self.advance(),
            Status::Compensating => self.compensate(),
            _ => {}
        }
    }

    fn request(&mut self, t: Transition, reason: Option<String>) {
        let extra = json!({"reason": reason});
        if let Err(e) = self.transition(t, extra) {
            let cause = self.ctx.cause.id.clone();
            self.emit(
                "transition_rejected",
                json!({"requested": t, "status": self.st.status, "error": e.to_string()}),
                &[&cause],
            );
            return;
        }
        match t {
            Transition::Resume => self.advance(),
            Transition::Cancel => {
                self.st.timers.clear();
                self.cancel_children("parent cancelled");
            }
            _ => {}
        }
    }

    fn cancel_children(&mut self, reason: &str) {
        let children: Vec<String> = self
            .st
            .inflight
            .iter()
            .filter(|(_, r)| {
                !r.compensation && self.st.steps.get(&r.step).is_some_and(|s| s.kind == "run")
            })
            .map(|(k, _)| k.clone())
            .collect();
        for child in children {
            let subject = EventSubject::new(AGGREGATE, &child, "cancel_requested").expect("valid");
            let mut e = self.ctx.cause.caused(
                &subject,
                SOURCE,
                json!({"reason": reason, "by": self.st.id}),
                &[],
            );
            e.id = derived_id(&["workflow", &child, "cancel_requested", &self.st.id]);
            self.fx.push(Effect::Event { event: e });
        }
    }

    fn timer(&mut self, id: &str) {
        let Some((step, kind)) = id.rsplit_once(':') else {
            return;
        };
        let waiting = self
            .st
            .steps
            .get(step)
            .is_some_and(|r| r.status == StepStatus::Waiting);
        if !waiting {
            return;
        }
        match kind {
            "sleep" => self.finish_step(step, StepStatus::Succeeded, Value::Null, None),
            _ => {
                let spec = self.ctx.def.step(step).and_then(|s| s.wait.clone());
                let (on_timeout, pattern, timeout) = spec
                    .map(|w| (w.on_timeout, w.event.value.clone(), w.timeout))
                    .unwrap_or((OnTimeout::Fail, String::new(), None));
                match on_timeout {
                    OnTimeout::Continue => {
                        self.finish_step(step, StepStatus::TimedOut, Value::Null, None)
                    }
                    OnTimeout::Fail => self.finish_step(
                        step,
                        StepStatus::Failed,
                        Value::Null,
                        Some(format!(
                            "timed out after {} waiting for {pattern}",
                            timeout
                                .map(|t| humantime::format_duration(t).to_string())
                                .unwrap_or_default()
                        )),
                    ),
                }
            }
        }
    }

    // ----- recording ---------------------------------------------------------------------

    /// Ends a whole step (not a `for` item) and records it as an event.
    fn finish_step(
        &mut self,
        step: &str,
        status: StepStatus,
        output: Value,
        error: Option<String>,
    ) {
        let now = self.ctx.now_ms;
        let Some(rec) = self.st.steps.get_mut(step) else {
            return;
        };
        rec.status = status;
        rec.output = output.clone();
        rec.error = error.clone();
        rec.finished_ms = Some(now);
        let kind = rec.kind.clone();
        if status == StepStatus::Failed {
            self.emit(
                "step_failed",
                json!({"step": step, "kind": kind, "error": error}),
                &[step],
            );
        } else {
            self.emit(
                "step_completed",
                json!({"step": step, "kind": kind, "status": status.as_str(), "output": output}),
                &[step],
            );
        }
    }

    /// A call or run part ended (outcome or child end).
    fn finish_part(&mut self, part: PartRef, ok: bool, result: Value, error: Option<String>) {
        if part.compensation {
            let key = format!("{}.compensate", part_key(&part.step, part.item));
            if ok {
                self.emit(
                    "step_completed",
                    json!({"step": key, "kind": "compensate", "status": "succeeded", "output": result}),
                    &[&key],
                );
            } else {
                self.emit(
                    "step_failed",
                    json!({"step": key, "kind": "compensate", "error": error}),
                    &[&key],
                );
            }
            if let Some(c) = &mut self.st.compensation {
                c.current = None;
                c.done.push(key.clone());
                if !ok {
                    c.errors.push(format!(
                        "{key}: {}",
                        error.unwrap_or_else(|| "failed".into())
                    ));
                }
            }
            return;
        }
        let Some(def) = self.ctx.def.step(&part.step) else {
            return;
        };
        // Map the raw result to the step output.
        let (status, output, error) = if ok {
            match &def.output {
                Some(template) => {
                    let mut vars = self.item_vars(def, part.item);
                    vars.insert("result".into(), result);
                    match expr::render(template, &vars) {
                        Ok(out) => (StepStatus::Succeeded, out, None),
                        Err(e) => (
                            StepStatus::Failed,
                            Value::Null,
                            Some(format!("output: {e}")),
                        ),
                    }
                }
                None => (StepStatus::Succeeded, result, None),
            }
        } else {
            (StepStatus::Failed, Value::Null, error)
        };
        if status == StepStatus::Succeeded {
            self.st.completed.push((part.step.clone(), part.item));
        }
        match part.item {
            None => self.finish_step(&part.step, status, output, error),
            Some(i) => {
                if let Some(p) = self
                    .st
                    .steps
                    .get_mut(&part.step)
                    .and_then(|r| r.parts.get_mut(i))
                {
                    p.status = status;
                    p.output = output.clone();
                    p.error = error.clone();
                }
                let key = part_key(&part.step, Some(i));
                if status == StepStatus::Failed {
                    self.emit(
                        "step_failed",
                        json!({"step": key, "kind": "item", "error": error}),
                        &[&key],
                    );
                } else {
                    self.emit(
                        "step_completed",
                        json!({"step": key, "kind": "item", "status": "succeeded", "output": output}),
                        &[&key],
                    );
                }
            }
        }
    }

    // ----- expressions -------------------------------------------------------------------

    fn vars(&self) -> Vars {
        let mut vars = Vars::new();
        vars.insert("input".into(), self.st.input.clone());
        vars.insert("trigger".into(), self.st.trigger.clone());
        vars.insert(
            "instance".into(),
            json!({"id": self.st.id, "workflow": self.st.workflow, "version": self.st.version}),
        );
        // Every step is there, so a condition on a step that did not run reads `not_started`.
        let mut steps: serde_json::Map<String, Value> = self
            .ctx
            .def
            .all_steps()
            .iter()
            .map(|s| {
                (
                    s.id().to_string(),
                    json!({"output": null, "status": "not_started", "error": null}),
                )
            })
            .collect();
        for (id, r) in &self.st.steps {
            steps.insert(
                id.clone(),
                json!({"output": r.output, "status": r.status.as_str(), "error": r.error}),
            );
        }
        vars.insert("steps".into(), Value::Object(steps));
        vars
    }

    fn item_vars(&self, step: &Step, item: Option<usize>) -> Vars {
        let mut vars = self.vars();
        if let (Some(f), Some(i)) = (&step.for_each, item) {
            let value = self
                .st
                .steps
                .get(step.id())
                .and_then(|r| r.items.as_ref())
                .and_then(|items| items.get(i))
                .cloned()
                .unwrap_or(Value::Null);
            vars.insert(f.each.clone(), value);
            vars.insert(f.at.clone(), json!(i));
        }
        vars
    }

    // ----- scheduling --------------------------------------------------------------------

    fn advance(&mut self) {
        let def = self.ctx.def;
        match self.block(&def.steps) {
            Flow::Done(last) => {
                let output = match &def.output {
                    Some(template) => expr::render(template, &self.vars()),
                    None => Ok(last),
                };
                match output {
                    Ok(output) => {
                        self.st.output = output.clone();
                        self.st.timers.clear();
                        let _ = self.transition(Transition::Complete, json!({"output": output}));
                    }
                    Err(e) => self.fail(format!("output: {e}")),
                }
            }
            Flow::Pending => {
                let running = self.st.inflight.values().any(|p| !p.compensation);
                let t = match (self.st.status, running) {
                    (Status::Running, false) => Some(Transition::Wait),
                    (Status::Waiting, true) => Some(Transition::Wake),
                    _ => None,
                };
                if let Some(t) = t {
                    let _ = self.transition(t, json!({}));
                }
            }
            Flow::Failed(e) => self.fail(e),
        }
    }

    fn block(&mut self, steps: &'c [Step]) -> Flow {
        let mut i = 0;
        let mut last = Value::Null;
        while i < steps.len() {
            match self.step(&steps[i]) {
                StepFlow::Pending => return Flow::Pending,
                StepFlow::Failed(e) => return Flow::Failed(e),
                StepFlow::Done { output, next, pass } => {
                    if !pass {
                        last = output;
                    }
                    match next {
                        Next::Continue => i += 1,
                        Next::End => return Flow::Done(last),
                        Next::Goto(id) => match steps.iter().position(|s| s.id() == id) {
                            Some(j) if j > i => i = j,
                            _ => return Flow::Failed(format!("no later step `{id}` to jump to")),
                        },
                    }
                }
            }
        }
        Flow::Done(last)
    }

    fn then(step: &Step) -> Next {
        step.then
            .as_ref()
            .map(|t| Next::parse(&t.value))
            .unwrap_or(Next::Continue)
    }

    fn step(&mut self, step: &'c Step) -> StepFlow {
        if !self.st.steps.contains_key(step.id()) {
            self.begin(step);
        }
        self.progress(step)
    }

    /// Starts a step that has no record yet (some kinds end at once: skipped, switch, raise,
    /// emit). Returns whether it is still going.
    fn begin(&mut self, step: &'c Step) -> bool {
        let id = step.id().to_string();
        let now = self.ctx.now_ms;
        let kind = step.kind();
        if let Some(cond) = &step.condition {
            match expr::eval_bool(&cond.value, &self.vars()) {
                Ok(true) => {}
                Ok(false) => {
                    self.st
                        .steps
                        .insert(id.clone(), StepRecord::new(kind, StepStatus::Skipped, now));
                    self.emit(
                        "step_skipped",
                        json!({"step": id, "kind": kind.name(), "condition": cond.value}),
                        &[&id],
                    );
                    return false;
                }
                Err(e) => {
                    self.st
                        .steps
                        .insert(id.clone(), StepRecord::new(kind, StepStatus::Running, now));
                    self.finish_step(
                        &id,
                        StepStatus::Failed,
                        Value::Null,
                        Some(format!("if: {e}")),
                    );
                    return false;
                }
            }
        }
        let vars = self.vars();
        match kind {
            StepKind::Switch => {
                let mut rec = StepRecord::new(kind, StepStatus::Succeeded, now);
                let mut chosen: Result<(usize, String), String> =
                    Ok((usize::MAX, "continue".into()));
                for (i, case) in step.switch.iter().flatten().enumerate() {
                    let hit = match &case.when {
                        None => Ok(true),
                        Some(w) => expr::eval_bool(&w.value, &vars),
                    };
                    match hit {
                        Ok(true) => {
                            chosen = Ok((i, case.then.value.clone()));
                            break;
                        }
                        Ok(false) => {}
                        Err(e) => {
                            chosen = Err(format!("when: {e}"));
                            break;
                        }
                    }
                }
                match chosen {
                    Ok((case, next)) => {
                        let case = (case != usize::MAX).then_some(case);
                        rec.output = json!({"case": case, "then": next});
                        rec.next = Some(next.clone());
                        rec.finished_ms = Some(now);
                        self.st.steps.insert(id.clone(), rec);
                        self.emit(
                            "step_completed",
                            json!({"step": id, "kind": "switch", "status": "succeeded", "output": {"case": case, "then": next}}),
                            &[&id],
                        );
                    }
                    Err(e) => {
                        self.st.steps.insert(id.clone(), rec);
                        self.finish_step(&id, StepStatus::Failed, Value::Null, Some(e));
                    }
                }
                false
            }
            StepKind::Raise => {
                let message = step
                    .raise
                    .as_ref()
                    .map(
                        |r| match expr::render(&Value::String(r.value.clone()), &vars) {
                            Ok(Value::String(s)) => s,
                            Ok(other) => other.to_string(),
                            Err(e) => format!("{} (template error: {e})", r.value),
                        },
                    )
                    .unwrap_or_default();
                self.st
                    .steps
                    .insert(id.clone(), StepRecord::new(kind, StepStatus::Running, now));
                self.finish_step(&id, StepStatus::Failed, Value::Null, Some(message));
                false
            }
            StepKind::Emit => {
                let spec = step.emit.as_ref().expect("emit step");
                self.st
                    .steps
                    .insert(id.clone(), StepRecord::new(kind, StepStatus::Running, now));
                let subject = expr::render(&Value::String(spec.event.value.clone()), &vars)
                    .and_then(|s| match s {
                        Value::String(s) => EventSubject::parse(&s).map_err(|e| e.to_string()),
                        other => Err(format!("subject is {other}, not a string")),
                    });
                let data = spec
                    .data
                    .as_ref()
                    .map(|d| expr::render(d, &vars))
                    .unwrap_or(Ok(Value::Null));
                match (subject, data) {
                    (Ok(subject), Ok(data)) => {
                        let mut e = self.ctx.cause.caused(&subject, SOURCE, data, &[]);
                        e.id = derived_id(&["workflow", &self.st.id, "emit", &id]);
                        e.correlationid = Some(self.st.correlation.clone());
                        let output = json!({"id": e.id, "subject": subject.to_string()});
                        self.fx.push(Effect::Event { event: e });
                        self.finish_step(&id, StepStatus::Succeeded, output, None);
                    }
                    (Err(e), _) | (_, Err(e)) => self.finish_step(
                        &id,
                        StepStatus::Failed,
                        Value::Null,
                        Some(format!("emit: {e}")),
                    ),
                }
                false
            }
            StepKind::Wait => {
                let spec = step.wait.as_ref().expect("wait step");
                let mut rec = StepRecord::new(kind, StepStatus::Waiting, now);
                let c = spec.correlate.as_ref();
                let aggregate = c
                    .and_then(|c| c.aggregate.as_ref())
                    .map(|a| expr::eval(&a.value, &vars));
                let equals = c
                    .and_then(|c| c.equals.as_ref())
                    .map(|a| expr::eval(&a.value, &vars));
                let aggregate = match aggregate.transpose() {
                    Ok(a) => a.map(|v| match v {
                        Value::String(s) => s,
                        other => other.to_string(),
                    }),
                    Err(e) => {
                        self.st.steps.insert(id.clone(), rec);
                        self.finish_step(
                            &id,
                            StepStatus::Failed,
                            Value::Null,
                            Some(format!("correlate: {e}")),
                        );
                        return false;
                    }
                };
                let equals = match equals.transpose() {
                    Ok(e) => e,
                    Err(e) => {
                        self.st.steps.insert(id.clone(), rec);
                        self.finish_step(
                            &id,
                            StepStatus::Failed,
                            Value::Null,
                            Some(format!("correlate: {e}")),
                        );
                        return false;
                    }
                };
                let wait = WaitRecord {
                    pattern: spec.event.value.clone(),
                    aggregate,
                    field: c.and_then(|c| c.field.clone()),
                    equals,
                };
                let due = spec.timeout.map(|t| now + t.as_millis() as u64);
                if let Some(due) = due {
                    self.st.timers.insert(format!("{id}:timeout"), due);
                }
                self.emit(
                    "step_started",
                    json!({"step": id, "kind": "wait", "_step": self.meta(&id, "wait"), "wait": wait, "due_ms": due}),
                    &[&id],
                );
                rec.wait = Some(wait);
                self.st.steps.insert(id, rec);
                true
            }
            StepKind::Sleep => {
                let d = step.sleep.unwrap_or_default();
                let due = now + d.as_millis() as u64;
                self.st.timers.insert(format!("{id}:sleep"), due);
                self.st
                    .steps
                    .insert(id.clone(), StepRecord::new(kind, StepStatus::Waiting, now));
                self.emit(
                    "step_started",
                    json!({"step": id, "kind": "sleep", "_step": self.meta(&id, "sleep"), "due_ms": due}),
                    &[&id],
                );
                true
            }
            StepKind::Fork => {
                self.st
                    .steps
                    .insert(id.clone(), StepRecord::new(kind, StepStatus::Running, now));
                let branches: Vec<&str> = step
                    .fork
                    .iter()
                    .flat_map(|f| f.branches.iter().map(|b| b.id.value.as_str()))
                    .collect();
                self.emit(
                    "step_started",
                    json!({"step": id, "kind": "fork", "_step": self.meta(&id, "fork"), "branches": branches}),
                    &[&id],
                );
                true
            }
            StepKind::Call | StepKind::Run => {
                let mut rec = StepRecord::new(kind, StepStatus::Running, now);
                match &step.for_each {
                    None => {
                        rec.parts.push(Part::pending());
                        self.st.steps.insert(id.clone(), rec);
                        self.start_part(step, None);
                    }
                    Some(f) => {
                        let items = match expr::eval(&f.list.value, &vars) {
                            Ok(Value::Array(items)) => Ok(items),
                            Ok(other) => Err(format!("for.in gave {other}, not a list")),
                            Err(e) => Err(format!("for.in: {e}")),
                        };
                        match items {
                            Ok(items) => {
                                rec.parts = vec![Part::pending(); items.len()];
                                let n = items.len();
                                rec.items = Some(items);
                                self.st.steps.insert(id.clone(), rec);
                                self.emit(
                                    "step_started",
                                    json!({"step": id, "kind": "for", "_step": self.meta(&id, "for"), "items": n}),
                                    &[&id],
                                );
                            }
                            Err(e) => {
                                self.st.steps.insert(id.clone(), rec);
                                self.finish_step(&id, StepStatus::Failed, Value::Null, Some(e));
                                return false;
                            }
                        }
                    }
                }
                true
            }
        }
    }

    fn meta(&self, key: &str, kind: &str) -> Value {
        json!({
            "instance": self.st.id, "workflow": self.st.workflow, "version": self.st.version,
            "step": key, "kind": kind,
        })
    }

    /// Starts the call or run of `step` (one `for` item when `item` is given).
    fn start_part(&mut self, step: &'c Step, item: Option<usize>) {
        let id = step.id().to_string();
        let key = part_key(&id, item);
        let vars = self.item_vars(step, item);
        let input = match &step.with {
            Some(template) => expr::render(template, &vars),
            None => Ok(self.st.input.clone()),
        };
        let set = |st: &mut InstanceState, f: &dyn Fn(&mut Part)| {
            if let Some(p) = st
                .steps
                .get_mut(&id)
                .and_then(|r| r.parts.get_mut(item.unwrap_or(0)))
            {
                f(p)
            }
        };
        let input = match input {
            Ok(i) => i,
            Err(e) => {
                let error = format!("with: {e}");
                set(self.st, &|p| {
                    p.status = StepStatus::Failed;
                    p.error = Some(error.clone());
                });
                if item.is_none() {
                    self.finish_step(&id, StepStatus::Failed, Value::Null, Some(error));
                }
                return;
            }
        };
        if let Some(workflow) = &step.run {
            let child = child_id(&self.st.id, &key);
            let version = self.ctx.catalog.workflows.get(&workflow.value).copied();
            let parent = ParentRef {
                instance: self.st.id.clone(),
                step: id.clone(),
                item,
            };
            self.emit(
                "step_started",
                json!({"step": key, "kind": "run", "_step": self.meta(&key, "run"), "child": child, "workflow": workflow.value}),
                &[&key],
            );
            let subject = EventSubject::new(AGGREGATE, &child, "start_requested").expect("valid");
            let mut e = self.ctx.cause.caused(
                &subject,
                SOURCE,
                json!({"workflow": workflow.value, "version": version, "input": input, "parent": parent}),
                &[],
            );
            e.id = derived_id(&["workflow", &child, "start_requested"]);
            e.correlationid = Some(self.st.correlation.clone());
            self.fx.push(Effect::Event { event: e });
            self.st.inflight.insert(
                child.clone(),
                PartRef {
                    step: id.clone(),
                    item,
                    compensation: false,
                },
            );
            set(self.st, &|p| {
                p.status = StepStatus::Running;
                p.child = Some(child.clone());
            });
            return;
        }
        let target = step.target().expect("a call step has a target");
        let lane_key = format!("{}/{key}", self.st.id);
        match self.ctx.catalog.resolve(&target, &lane_key) {
            Ok((handler, version, priority)) => {
                let mut meta = self.meta(&key, "call");
                meta["handler"] = json!(handler);
                let event = self.event("step_started", step_data(input, meta), &[&key]);
                self.st.inflight.insert(
                    event.id.clone(),
                    PartRef {
                        step: id.clone(),
                        item,
                        compensation: false,
                    },
                );
                let event_id = event.id.clone();
                set(self.st, &|p| {
                    p.status = StepStatus::Running;
                    p.event_id = Some(event_id.clone());
                    p.handler = Some(handler.clone());
                });
                self.fx.push(Effect::Task {
                    event,
                    handler,
                    version,
                    priority: step.priority.unwrap_or(priority),
                    lane: lane_key,
                    timeout_ms: step.timeout.map(|t| t.as_millis() as u64),
                    max_attempts: step.retry.as_ref().map(|r| r.max_attempts),
                });
            }
            Err(e) => {
                set(self.st, &|p| {
                    p.status = StepStatus::Failed;
                    p.error = Some(e.clone());
                });
                if item.is_none() {
                    self.finish_step(&id, StepStatus::Failed, Value::Null, Some(e));
                }
            }
        }
    }

    /// Where a started step stands; moves composite steps along.
    fn progress(&mut self, step: &'c Step) -> StepFlow {
        let id = step.id();
        let Some(rec) = self.st.steps.get(id) else {
            return StepFlow::Failed(format!("step `{id}` did not start"));
        };
        match rec.status {
            StepStatus::Skipped => {
                return StepFlow::Done {
                    output: Value::Null,
                    next: Next::Continue,
                    pass: true,
                };
            }
            StepStatus::Failed => {
                return StepFlow::Failed(format!(
                    "step `{id}` failed: {}",
                    rec.error.clone().unwrap_or_else(|| "failed".into())
                ));
            }
            StepStatus::Succeeded | StepStatus::TimedOut => {
                let (next, pass) = match &rec.next {
                    Some(n) => (Next::parse(n), true),
                    None => (Self::then(step), false),
                };
                return StepFlow::Done {
                    output: rec.output.clone(),
                    next,
                    pass,
                };
            }
            StepStatus::Waiting | StepStatus::Pending => return StepFlow::Pending,
            StepStatus::Running => {}
        }
        match step.kind() {
            StepKind::Fork => self.progress_fork(step),
            StepKind::Call | StepKind::Run if step.for_each.is_some() => self.progress_for(step),
            _ => StepFlow::Pending,
        }
    }

    fn progress_fork(&mut self, step: &'c Step) -> StepFlow {
        let fork = step.fork.as_ref().expect("fork step");
        let id = step.id().to_string();
        let mut done = serde_json::Map::new();
        let mut failed = Vec::new();
        for b in &fork.branches {
            match self.block(&b.steps) {
                Flow::Done(out) => {
                    done.insert(b.id.value.clone(), out);
                }
                Flow::Failed(e) => failed.push(format!("branch `{}`: {e}", b.id.value)),
                Flow::Pending => {}
            }
        }
        let total = fork.branches.len();
        self.resolve_join(
            step,
            &id,
            fork.join,
            total,
            done.len(),
            &failed,
            Value::Object(done),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn resolve_join(
        &mut self,
        step: &Step,
        id: &str,
        join: Join,
        total: usize,
        succeeded: usize,
        failed: &[String],
        output: Value,
    ) -> StepFlow {
        let needed = join.needed(total);
        if succeeded >= needed {
            self.finish_step(id, StepStatus::Succeeded, output.clone(), None);
            StepFlow::Done {
                output,
                next: Self::then(step),
                pass: false,
            }
        } else if failed.len() > total - needed {
            let error = format!(
                "{} of {total} failed (join {join}); {}",
                failed.len(),
                failed.first().cloned().unwrap_or_default()
            );
            self.finish_step(id, StepStatus::Failed, Value::Null, Some(error.clone()));
            StepFlow::Failed(format!("step `{id}` failed: {error}"))
        } else {
            StepFlow::Pending
        }
    }

    fn progress_for(&mut self, step: &'c Step) -> StepFlow {
        let f = step.for_each.as_ref().expect("for step");
        let id = step.id().to_string();
        let limit = f.concurrency.map(|c| c as usize).unwrap_or(usize::MAX);
        let (total, needed) = {
            let rec = &self.st.steps[&id];
            (rec.parts.len(), f.join.needed(rec.parts.len()))
        };
        loop {
            let rec = &self.st.steps[&id];
            let succeeded = rec
                .parts
                .iter()
                .filter(|p| p.status == StepStatus::Succeeded)
                .count();
            let failed: Vec<String> = rec
                .parts
                .iter()
                .enumerate()
                .filter(|(_, p)| p.status == StepStatus::Failed)
                .map(|(i, p)| format!("item {i}: {}", p.error.clone().unwrap_or_default()))
                .collect();
            if succeeded >= needed || failed.len() > total - needed {
                let output = Value::Array(rec.parts.iter().map(|p| p.output.clone()).collect());
                return self.resolve_join(step, &id, f.join, total, succeeded, &failed, output);
            }
            let running = rec
                .parts
                .iter()
                .filter(|p| p.status == StepStatus::Running)
                .count();
            let next = rec
                .parts
                .iter()
                .position(|p| p.status == StepStatus::Pending);
            match next {
                Some(i) if running < limit => self.start_part(step, Some(i)),
                _ => return StepFlow::Pending,
            }
        }
    }

    // ----- failure and the saga ----------------------------------------------------------

    fn fail(&mut self, error: String) {
        self.st.error = Some(error.clone());
        self.st.timers.clear();
        let def = self.ctx.def;
        let has_comp = |step: &str| def.step(step).is_some_and(|s| s.compensate.is_some());
        let compensable = self.st.completed.iter().any(|(s, _)| has_comp(s))
            || self
                .st
                .inflight
                .values()
                .any(|p| !p.compensation && has_comp(&p.step));
        if compensable {
            self.st.compensation = Some(Compensation::default());
            let _ = self.transition(Transition::Compensate, json!({"error": error}));
            self.cancel_children("compensating");
            self.compensate();
        } else {
            let _ = self.transition(Transition::Fail, json!({"error": error}));
            self.cancel_children("parent failed");
        }
    }

    /// Runs the saga: once nothing is in flight, the compensations of succeeded steps, one at
    /// a time, in reverse completion order; then the instance fails.
    fn compensate(&mut self) {
        let def = self.ctx.def;
        let in_flight = self.st.inflight.values().any(|p| !p.compensation);
        let Some(c) = self.st.compensation.as_mut() else {
            return;
        };
        if c.current.is_some() {
            return;
        }
        if !c.started {
            if in_flight {
                return;
            }
            c.started = true;
            c.queue = self
                .st
                .completed
                .iter()
                .rev()
                .filter(|(s, _)| def.step(s).is_some_and(|s| s.compensate.is_some()))
                .cloned()
                .collect();
        }
        let next = c.queue.pop_front();
        match next {
            Some((step_id, item)) => self.start_compensation(&step_id, item),
            None => {
                let (done, errors) = (c.done.clone(), c.errors.clone());
                let _ = self.transition(
                    Transition::Fail,
                    json!({"error": self.st.error, "compensated": done, "compensation_errors": errors}),
                );
            }
        }
    }

    fn start_compensation(&mut self, step_id: &str, item: Option<usize>) {
        let Some(step) = self.ctx.def.step(step_id) else {
            return self.compensate();
        };
        let comp = step.compensate.as_ref().expect("filtered on compensate");
        let key = format!("{}.compensate", part_key(step_id, item));
        let mut vars = self.item_vars(step, item);
        let output = self
            .st
            .steps
            .get(step_id)
            .map(|r| match item {
                Some(i) => r.parts.get(i).map(|p| p.output.clone()).unwrap_or_default(),
                None => r.output.clone(),
            })
            .unwrap_or_default();
        vars.insert("output".into(), output.clone());
        let input = match &comp.with {
            Some(t) => expr::render(t, &vars),
            None => Ok(output),
        };
        let target = comp.target().expect("validated");
        let lane = format!("{}/{key}", self.st.id);
        let resolved =
            input.and_then(|input| self.ctx.catalog.resolve(&target, &lane).map(|h| (input, h)));
        match resolved {
            Ok((input, (handler, version, priority))) => {
                let mut meta = self.meta(&key, "compensate");
                meta["handler"] = json!(handler);
                meta["compensation_for"] = json!(part_key(step_id, item));
                let event = self.event("step_started", step_data(input, meta), &[&key]);
                self.st.inflight.insert(
                    event.id.clone(),
                    PartRef {
                        step: step_id.to_string(),
                        item,
                        compensation: true,
                    },
                );
                if let Some(c) = self.st.compensation.as_mut() {
                    c.current = Some(event.id.clone());
                }
                self.fx.push(Effect::Task {
                    event,
                    handler,
                    version,
                    priority,
                    lane,
                    timeout_ms: None,
                    max_attempts: None,
                });
            }
            Err(e) => {
                self.emit(
                    "step_failed",
                    json!({"step": key, "kind": "compensate", "error": e}),
                    &[&key],
                );
                if let Some(c) = self.st.compensation.as_mut() {
                    c.errors.push(format!("{key}: {e}"));
                }
                self.compensate();
            }
        }
    }
}

/// The data of a step event: the step's input (its keys, when it is an object, else under
/// `value`) plus `_step` — instance, workflow, version, step, kind, handler.
fn step_data(input: Value, meta: Value) -> Value {
    match input {
        Value::Object(mut m) => {
            m.insert("_step".into(), meta);
            Value::Object(m)
        }
        other => json!({"value": other, "_step": meta}),
    }
}
