//! `grizzly workflow docs`: a workflow as Markdown — what starts it, its steps, and a Mermaid
//! flowchart of the control flow (sequence, jumps, conditions, parallel branches, waits).

use std::fmt::Write as _;

use crate::dsl::{Next, Step, StepKind, Target, WorkflowSpec};

/// Renders one workflow.
pub fn markdown(spec: &WorkflowSpec) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Workflow `{}` (version {})\n",
        spec.name(),
        spec.version
    );
    if let Some(d) = &spec.description {
        let _ = writeln!(out, "{d}\n");
    }
    if spec.on.is_empty() {
        let _ = writeln!(
            out,
            "Started with `grizzly workflow start {}`.\n",
            spec.name()
        );
    } else {
        let on: Vec<String> = spec.on.iter().map(|p| format!("`{}`", p.value)).collect();
        let _ = writeln!(
            out,
            "Started by each event on {} (or `grizzly workflow start {}`).\n",
            on.join(", "),
            spec.name()
        );
    }
    let _ = writeln!(out, "```mermaid\n{}```\n", mermaid(spec));
    let _ = writeln!(
        out,
        "## Steps\n\n| step | kind | does | then |\n|---|---|---|---|"
    );
    for s in spec.all_steps() {
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} |",
            s.id(),
            kind_label(s),
            describe(s).replace('|', "\\|"),
            s.then
                .as_ref()
                .map(|t| format!("`{}`", t.value))
                .unwrap_or_else(|| "next".into())
        );
    }
    out
}

fn kind_label(s: &Step) -> String {
    let k = s.kind().name().to_string();
    match &s.for_each {
        Some(f) => format!("for each `{}` in `{}`: {k}", f.each, f.list.value),
        None => k,
    }
}

fn describe(s: &Step) -> String {
    let mut parts = Vec::new();
    if let Some(c) = &s.condition {
        parts.push(format!("if `{}`", c.value));
    }
    match s.kind() {
        StepKind::Call => match s.target() {
            Some(Target::Handler(h)) => parts.push(format!("calls handler `{h}`")),
            Some(Target::Capability(c)) => {
                parts.push(format!("calls a handler with capability `{c}`"))
            }
            None => {}
        },
        StepKind::Run => parts.push(format!(
            "runs workflow `{}`",
            s.run.as_ref().map(|r| r.value.as_str()).unwrap_or("")
        )),
        StepKind::Fork => {
            let f = s.fork.as_ref().expect("fork");
            let b: Vec<String> = f
                .branches
                .iter()
                .map(|b| format!("`{}`", b.id.value))
                .collect();
            parts.push(format!("branches {} (join {})", b.join(", "), f.join));
        }
        StepKind::Switch => {
            for c in s.switch.iter().flatten() {
                match &c.when {
                    Some(w) => parts.push(format!("`{}` → `{}`", w.value, c.then.value)),
                    None => parts.push(format!("otherwise → `{}`", c.then.value)),
                }
            }
        }
        StepKind::Wait => {
            let w = s.wait.as_ref().expect("wait");
            let mut t = format!("waits for `{}`", w.event.value);
            if let Some(c) = &w.correlate
                && let Some(a) = &c.aggregate
            {
                t.push_str(&format!(" of aggregate `{}`", a.value));
            }
            if let Some(d) = w.timeout {
                t.push_str(&format!(" (timeout {})", humantime::format_duration(d)));
            }
            parts.push(t);
        }
        StepKind::Sleep => parts.push(format!(
            "sleeps {}",
            humantime::format_duration(s.sleep.unwrap_or_default())
        )),
        StepKind::Raise => parts.push(format!(
            "fails: {}",
            s.raise.as_ref().map(|r| r.value.as_str()).unwrap_or("")
        )),
        StepKind::Emit => parts.push(format!(
            "emits `{}`",
            s.emit
                .as_ref()
                .map(|e| e.event.value.as_str())
                .unwrap_or("")
        )),
    }
    if let Some(c) = &s.compensate
        && let Some(t) = c.target()
    {
        let who = match t {
            Target::Handler(h) => h,
            Target::Capability(c) => format!("capability {c}"),
        };
        parts.push(format!("compensated by `{who}`"));
    }
    parts.join("; ")
}

fn node(s: &Step) -> String {
    let label = format!("{}<br/>{}", s.id(), kind_label(s).replace('"', "'"));
    let id = s.id();
    match s.kind() {
        StepKind::Switch => format!("{id}{{\"{label}\"}}"),
        StepKind::Wait | StepKind::Sleep => format!("{id}([\"{label}\"])"),
        StepKind::Raise => format!("{id}[/\"{label}\"/]"),
        StepKind::Fork => format!("{id}[[\"{label}\"]]"),
        _ => format!("{id}[\"{label}\"]"),
    }
}

/// A Mermaid flowchart of the workflow.
pub fn mermaid(spec: &WorkflowSpec) -> String {
    let mut out = String::from("flowchart TD\n  start((start))\n  done((end))\n");
    let first = sequence(&spec.steps, "done", &mut out);
    let _ = writeln!(out, "  start --> {first}");
    out
}

/// Writes a sequence; returns the node to enter it by. `exit` is where it ends.
fn sequence(steps: &[Step], exit: &str, out: &mut String) -> String {
    for (i, s) in steps.iter().enumerate() {
        let _ = writeln!(out, "  {}", node(s));
        let after = steps.get(i + 1).map(|n| n.id().to_string());
        let fall = after.clone().unwrap_or_else(|| exit.to_string());
        let target = |n: &str| match Next::parse(n) {
            Next::Continue => fall.clone(),
            Next::End => exit.to_string(),
            Next::Goto(id) => id,
        };
        if let Some(f) = &s.fork {
            let join = format!("{}_join", s.id());
            let _ = writeln!(out, "  {join}{{{{join {}}}}}", f.join);
            for b in &f.branches {
                let _ = writeln!(
                    out,
                    "  subgraph {}_{} [\"branch {}\"]",
                    s.id(),
                    b.id.value,
                    b.id.value
                );
                let entry = sequence(&b.steps, &join, out);
                let _ = writeln!(out, "  end");
                let _ = writeln!(out, "  {} --> {entry}", s.id());
            }
            let _ = writeln!(
                out,
                "  {join} --> {}",
                s.then
                    .as_ref()
                    .map(|t| target(&t.value))
                    .unwrap_or(fall.clone())
            );
            continue;
        }
        if let Some(cases) = &s.switch {
            let mut has_default = false;
            for c in cases {
                let label = match &c.when {
                    Some(w) => w.value.replace('"', "#quot;").replace('|', "#124;"),
                    None => {
                        has_default = true;
                        "otherwise".into()
                    }
                };
                let _ = writeln!(
                    out,
                    "  {} -->|\"{label}\"| {}",
                    s.id(),
                    target(&c.then.value)
                );
            }
            if !has_default {
                let _ = writeln!(out, "  {} -->|otherwise| {fall}", s.id());
            }
            continue;
        }
        if s.kind() == StepKind::Raise {
            let _ = writeln!(out, "  {} --> failed((failed))", s.id());
            continue;
        }
        if s.condition.is_some() {
            let _ = writeln!(out, "  {} -.->|skipped| {fall}", s.id());
        }
        if s.compensate.is_some() {
            let _ = writeln!(
                out,
                "  {} -.-|on failure: compensate| {}_undo[\"undo {}\"]",
                s.id(),
                s.id(),
                s.id()
            );
        }
        let next = s.then.as_ref().map(|t| target(&t.value)).unwrap_or(fall);
        let _ = writeln!(out, "  {} --> {next}", s.id());
    }
    steps
        .first()
        .map(|s| s.id().to_string())
        .unwrap_or_else(|| exit.to_string())
}
