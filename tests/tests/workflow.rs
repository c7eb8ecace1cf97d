//! The coordinator against a real nats-server: every DSL construct, the example workflows,
//! suspend/resume/cancel from the CLI, versioning, and SIGKILL of the coordinator binary during
//! a step, a parallel join, a wait, a timer and a compensation — nothing completed runs twice.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use grizzly_shared::task::partition_for;
use grizzly_tests::{ChildProcess, EventWatcher, LoggedEvent, TestEnv};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(60);

/// A `process` handler for the tests: logs each invocation, then by the step's input sleeps
/// (`sleep_ms`), blocks until a file exists (`gate`), fails (`fail`), or echoes its input.
const STEP_SCRIPT: &str = r#"
import json, os, sys, time
log = sys.argv[1]
for line in sys.stdin:
    event = json.loads(line)
    d = event.get("data") or {}
    step = (d.get("_step") or {}).get("step")
    with open(log, "a") as f:
        f.write(json.dumps({"instance": event["aggregateid"], "step": step}) + "\n")
    if d.get("gate"):
        while not os.path.exists(d["gate"]):
            time.sleep(0.05)
    if d.get("sleep_ms"):
        time.sleep(d["sleep_ms"] / 1000)
    if d.get("fail"):
        print(json.dumps({"done": True, "error": "asked to fail: " + str(step)}), flush=True)
        continue
    out = {k: v for k, v in d.items() if k != "_step"}
    out["step"] = step
    print(json.dumps({"done": True, "output": out}), flush=True)
"#;

fn step_handler(env: &TestEnv, name: &str, extra: &str) -> PathBuf {
    let script = env.path().join("step.py");
    if !script.exists() {
        std::fs::write(&script, STEP_SCRIPT).unwrap();
    }
    let log = env.path().join("calls.log");
    env.write_handler(
        name,
        &format!(
            "name: {name}\nkind: process\ncommand: [\"python3\", \"{}\", \"{}\"]\nconcurrency: 8\npool: {{ min: 0, max: 8 }}\nretry: {{ max_attempts: 2, initial_backoff: 50ms, max_backoff: 100ms }}\n{extra}",
            script.display(),
            log.display()
        ),
    );
    log
}

fn write_workflow(env: &TestEnv, file: &str, yaml: &str) {
    std::fs::write(env.settings.workflows_dir.join(file), yaml).unwrap();
}

/// Copies the repository's example workflows and their `wf_*` handlers (script path made
/// absolute, invocations logged to `examples.log`).
fn install_examples(env: &TestEnv) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let log = env.path().join("examples.log");
    let script = root.join("handlers/scripts/wf_steps.py");
    for entry in std::fs::read_dir(root.join("handlers")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("wf_") && name.ends_with(".yaml") {
            let text = std::fs::read_to_string(&path).unwrap().replace(
                "handlers/scripts/wf_steps.py",
                &script.display().to_string(),
            );
            let text = format!("{text}env: {{ WF_STEPS_LOG: \"{}\" }}\n", log.display());
            std::fs::write(env.settings.handlers_dir.join(name), text).unwrap();
        }
    }
    for entry in std::fs::read_dir(root.join("workflows")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            std::fs::copy(
                &path,
                env.settings.workflows_dir.join(path.file_name().unwrap()),
            )
            .unwrap();
        }
    }
    log
}

async fn emit(env: &TestEnv, subject: &str, data: Value) -> anyhow::Result<()> {
    env.publish_raw(subject, data.to_string()).await?;
    Ok(())
}

async fn start(env: &TestEnv, workflow: &str, id: &str, input: Value) -> anyhow::Result<()> {
    emit(
        env,
        &format!("events.workflow.{id}.start_requested"),
        json!({"workflow": workflow, "input": input}),
    )
    .await
}

fn of(seen: &[LoggedEvent], instance: &str, event_type: &str) -> Vec<LoggedEvent> {
    let prefix = format!("events.workflow.{instance}.");
    seen.iter()
        .filter(|e| e.subject.starts_with(&prefix) && e.event_type() == event_type)
        .cloned()
        .collect()
}

fn ended(seen: &[LoggedEvent], instance: &str) -> Option<LoggedEvent> {
    ["completed", "failed", "cancelled"]
        .iter()
        .find_map(|t| of(seen, instance, t).into_iter().next())
}

async fn wait_end(w: &mut EventWatcher, instance: &str) -> anyhow::Result<LoggedEvent> {
    w.wait_until(DEADLINE, |s| ended(s, instance).is_some())
        .await?;
    Ok(ended(&w.seen, instance).unwrap())
}

/// Steps of `instance` that have started, by key.
fn started(seen: &[LoggedEvent], instance: &str, step: &str) -> bool {
    of(seen, instance, "step_started")
        .iter()
        .any(|e| step_key(e) == step)
}

fn step_key(e: &LoggedEvent) -> String {
    let d = e.data();
    d["_step"]["step"]
        .as_str()
        .or(d["step"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// Invocations per (instance, step) from a handler log.
fn calls(log: &Path) -> HashMap<(String, String), usize> {
    let mut out = HashMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let key = (
            v["instance"].as_str().unwrap_or_default().to_string(),
            v["step"].as_str().unwrap_or_default().to_string(),
        );
        *out.entry(key).or_default() += 1;
    }
    out
}

/// Rebuilds every checkpoint from the log (`grizzly workflow restore`, with the components
/// stopped and the coordinator's KV state deleted) and checks that the replay reproduced what
/// the coordinator wrote: every effect it produced is found in the log (none to publish), no
/// task to write again, no instance left running. A test that ran every instance to its end
/// thus checks that the interpreter is deterministic over its inputs in log order.
async fn assert_restore_reproduces(
    env: &TestEnv,
    components: Vec<grizzly_tests::Component>,
    instances: usize,
) -> anyhow::Result<()> {
    for component in components {
        component.shutdown().await?;
    }
    let (ok, said) = env.restore_workflows().await?;
    assert!(ok, "{said}");
    assert!(
        said.contains(&format!("{instances} checkpoints written (0 unfinished)"))
            && said.contains("published 0 workflow event(s) the log lacked; wrote 0 task(s)")
            && !said.contains("not restored"),
        "the replay differs from what the coordinator wrote: {said}"
    );
    Ok(())
}

fn assert_once(log: &Path) {
    let calls = calls(log);
    let twice: Vec<_> = calls.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "steps run more than once: {twice:?}");
}

/// No step event was written twice for one instance (ids are derived, replays dedup).
fn assert_unique_steps(seen: &[LoggedEvent]) {
    let mut per: HashMap<(String, String), usize> = HashMap::new();
    for e in seen.iter().filter(|e| e.event_type() == "step_started") {
        *per.entry((e.subject.clone(), step_key(e))).or_default() += 1;
    }
    let dup: Vec<_> = per.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dup.is_empty(), "step started twice: {dup:?}");
}

#[tokio::test]
async fn the_example_workflows_run_end_to_end() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let log = install_examples(&env);
    let worker = env.start_worker().await?;
    let coordinator = env.start_coordinator().await?;
    let mut w = env.watch().await?;

    // Code review: parallel reviewers, a clean verdict, then the approval gate.
    emit(
        &env,
        "events.pr.pr-7.opened",
        json!({"diff": "fn main() {}", "author": "ana"}),
    )
    .await?;
    // Saga: the app fails, database and network are rolled back, in that order.
    start(
        &env,
        "provision",
        "prov-1",
        json!({"env": "staging", "fail_on": "app"}),
    )
    .await?;
    // Fan-out / fan-in.
    emit(
        &env,
        "events.batch.b1.submitted",
        json!({"items": ["a", "bb", "ccc", "dddd", "e"]}),
    )
    .await?;
    // A process manager on another aggregate: waits for the invoice's payment.
    emit(
        &env,
        "events.invoice.inv-9.issued",
        json!({"customer": "acme"}),
    )
    .await?;

    let review = w
        .wait_until(DEADLINE, |s| {
            s.iter()
                .any(|e| e.event_type() == "step_started" && step_key(e) == "approval")
        })
        .await?
        .iter()
        .find(|e| e.event_type() == "step_started" && step_key(e) == "approval")
        .unwrap()
        .event
        .clone()
        .unwrap()
        .aggregateid;
    // An approval of another PR does not count; this one's does.
    emit(&env, "events.pr.pr-8.approved", json!({"by": "mallory"})).await?;
    emit(&env, "events.pr.pr-7.approved", json!({"by": "bob"})).await?;
    let done = wait_end(&mut w, &review).await?;
    assert_eq!(done.event_type(), "completed", "{:?}", done.data());
    assert_eq!(done.data()["output"], json!({"pr": "pr-7", "merged": true}));
    let merge = of(&w.seen, &review, "step_completed")
        .into_iter()
        .find(|e| step_key(e) == "merge")
        .unwrap();
    assert_eq!(merge.data()["output"]["approver"], "bob");
    assert!(!started(&w.seen, &review, "request_changes"));

    let prov = wait_end(&mut w, "prov-1").await?;
    assert_eq!(prov.event_type(), "failed");
    assert_eq!(
        prov.data()["compensated"],
        json!(["database.compensate", "network.compensate"])
    );
    assert!(
        prov.data()["error"]
            .as_str()
            .unwrap()
            .contains("quota exceeded")
    );
    let comp: Vec<String> = of(&w.seen, "prov-1", "step_started")
        .iter()
        .map(step_key)
        .filter(|k| k.ends_with(".compensate"))
        .collect();
    assert_eq!(comp, vec!["database.compensate", "network.compensate"]);
    let released: Vec<Value> = of(&w.seen, "prov-1", "step_completed")
        .iter()
        .filter(|e| step_key(e).ends_with(".compensate"))
        .map(|e| e.data()["output"]["released"].clone())
        .collect();
    assert_eq!(
        released,
        vec![json!("database-staging"), json!("network-staging")]
    );

    let batch = w
        .seen
        .iter()
        .find(|e| e.event_type() == "created" && e.data()["workflow"] == "batch")
        .unwrap()
        .event
        .clone()
        .unwrap()
        .aggregateid;
    let end = wait_end(&mut w, &batch).await?;
    assert_eq!(end.event_type(), "completed");
    assert_eq!(end.data()["output"], json!({"count": 5, "total_size": 11}));

    let invoice = w
        .seen
        .iter()
        .find(|e| e.event_type() == "created" && e.data()["workflow"] == "invoice_reminder")
        .unwrap()
        .event
        .clone()
        .unwrap()
        .aggregateid;
    w.wait_until(DEADLINE, |s| started(s, &invoice, "payment"))
        .await?;
    emit(&env, "events.invoice.inv-9.paid", json!({"amount": 120})).await?;
    let end = wait_end(&mut w, &invoice).await?;
    assert_eq!(
        end.data()["output"],
        json!({"invoice": "inv-9", "paid": true})
    );

    assert_once(&log);
    assert_unique_steps(&w.seen);
    // Code review, provision, batch, invoice reminder.
    assert_restore_reproduces(&env, vec![coordinator, worker], 4).await
}

const CONSTRUCTS: &str = r#"
name: constructs
do:
  - id: first
    call: step
    with: { n: "${ input.n }" }
    output: "${ result.n * 10 }"
  - id: skipped
    if: steps.first.output < 0
    call: step
  - id: race
    fork:
      join: any
      branches:
        - id: slow
          do:
            - id: slow_call
              call: step
              with: { sleep_ms: 3000 }
        - id: fast
          do:
            - id: fast_call
              call: step
              with: { v: fast }
  - id: two_of_three
    fork:
      join: 2
      branches:
        - id: a
          do: [ { id: a_call, call: step, with: { v: a } } ]
        - id: b
          do: [ { id: b_call, call: step, with: { fail: true }, retry: { max_attempts: 1 } } ]
        - id: c
          do: [ { id: c_call, call: step, with: { v: c } } ]
  - id: each
    for: { each: x, in: "[1, 2, 3, 4, 5]", concurrency: 2 }
    call: step
    with: { x: "${ x * steps.first.output }" }
    output: "${ result.x }"
  - id: child
    run: child_flow
    with: { base: "${ steps.each.output[4] }" }
  - id: nap
    sleep: 1s
  - id: route
    switch:
      - when: steps.child.output.total > 1000
        then: too_big
      - then: tell
  - id: too_big
    raise: "total ${ steps.child.output.total } too big"
  - id: tell
    emit:
      event: events.report.${ instance.id }.ready
      data: { total: "${ steps.child.output.total }" }
output:
  first: "${ steps.first.output }"
  race: "${ steps.race.output }"
  each: "${ steps.each.output }"
  child: "${ steps.child.output }"
  skipped: "${ steps.skipped.status }"
  two: "${ steps.two_of_three.status }"
"#;

const CHILD: &str = r#"
name: child_flow
do:
  - id: add
    call: step
    with: { total: "${ input.base + 1 }" }
    output: "${ {'total': result.total} }"
"#;

#[tokio::test]
async fn each_construct_runs_as_specified() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let log = step_handler(&env, "step", "");
    write_workflow(&env, "constructs.yaml", CONSTRUCTS);
    write_workflow(&env, "child.yaml", CHILD);
    write_workflow(
        &env,
        "timeouts.yaml",
        "name: timeouts\ndo:\n  - id: slow\n    call: step\n    with: { sleep_ms: 5000 }\n    timeout: 300ms\n    retry: { max_attempts: 1 }\n",
    );
    let worker = env.start_worker().await?;
    let coordinator = env.start_coordinator().await?;
    let mut w = env.watch().await?;
    start(&env, "constructs", "c-1", json!({"n": 2})).await?;
    start(&env, "timeouts", "t-1", json!({})).await?;

    let end = wait_end(&mut w, "c-1").await?;
    assert_eq!(end.event_type(), "completed", "{}", end.data());
    let out = &end.data()["output"];
    assert_eq!(out["first"], 20);
    assert_eq!(out["skipped"], "skipped");
    assert_eq!(out["race"]["fast"]["v"], "fast");
    assert!(
        out["race"].get("slow").is_none(),
        "join any took the first: {out}"
    );
    assert_eq!(out["two"], "succeeded");
    assert_eq!(out["each"], json!([20, 40, 60, 80, 100]));
    assert_eq!(out["child"], json!({"total": 101}));
    let report = w.wait_for_type("ready", 1, DEADLINE).await?;
    assert_eq!(report[0].subject, "events.report.c-1.ready");
    assert_eq!(report[0].data()["total"], 101);
    // The sub-workflow is an instance of its own, linked to its parent.
    let child = of(&w.seen, "c-1", "step_started")
        .into_iter()
        .find(|e| step_key(e) == "child")
        .unwrap()
        .data()["child"]
        .as_str()
        .unwrap()
        .to_string();
    let child_end = ended(&w.seen, &child).unwrap();
    assert_eq!(child_end.data()["parent"]["instance"], "c-1");
    // `for` with concurrency 2: never more than two items running at once.
    let mut running = 0i32;
    let mut peak = 0;
    let prefix = "events.workflow.c-1.";
    for e in w.seen.iter().filter(|e| e.subject.starts_with(prefix)) {
        let k = step_key(e);
        if !k.starts_with("each[") {
            continue;
        }
        match e.event_type() {
            "step_started" => running += 1,
            "step_completed" | "step_failed" => running -= 1,
            _ => {}
        }
        peak = peak.max(running);
    }
    assert_eq!(peak, 2);

    // A step's own timeout and attempts override the handler's.
    let t = wait_end(&mut w, "t-1").await?;
    assert_eq!(t.event_type(), "failed");
    assert!(
        t.data()["error"].as_str().unwrap().contains("timed out"),
        "{}",
        t.data()
    );
    let attempts = w
        .seen
        .iter()
        .filter(|e| e.subject == "events.workflow.t-1.handler_failed")
        .count();
    assert_eq!(attempts, 1);
    assert_once(&log);
    // c-1, its sub-workflow, t-1.
    assert_restore_reproduces(&env, vec![coordinator, worker], 3).await
}

async fn grizzly(env: &TestEnv, args: &[&str]) -> std::process::Output {
    env.grizzly()
        .args(args)
        .output()
        .await
        .expect("run grizzly (cargo build --workspace first)")
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn suspend_resume_cancel_work_from_the_cli_and_illegal_transitions_are_refused()
-> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    step_handler(&env, "step", "");
    write_workflow(
        &env,
        "gate.yaml",
        "name: gate\ndo:\n  - id: hold\n    wait: { event: events.gate.*.open, correlate: { aggregate: \"${ input.key }\" } }\n  - id: after\n    call: step\n",
    );
    let _worker = env.start_worker().await?;
    let _coordinator = env.start_coordinator().await?;
    let mut w = env.watch().await?;

    let out = grizzly(
        &env,
        &[
            "workflow",
            "start",
            "gate",
            "--id",
            "i-1",
            "--input",
            r#"{"key":"k1"}"#,
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "i-1");
    start(&env, "gate", "i-2", json!({"key": "k2"})).await?;
    w.wait_until(DEADLINE, |s| {
        !of(s, "i-1", "waiting").is_empty() && !of(s, "i-2", "waiting").is_empty()
    })
    .await?;

    let out = grizzly(
        &env,
        &["workflow", "suspend", "i-1", "--reason", "maintenance"],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("i-1 suspended"), "{}", text(&out));
    // Suspended twice: refused, with the reason (by the CLI's table or the coordinator's).
    let out = grizzly(&env, &["workflow", "suspend", "i-1"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("illegal transition: cannot suspend an instance that is suspended (suspend is allowed from: running, waiting)"),
        "{}",
        text(&out)
    );
    // Resume of a waiting (not suspended) instance: refused.
    let out = grizzly(&env, &["workflow", "resume", "i-2"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cannot resume an instance that is waiting"),
        "{}",
        text(&out)
    );
    // While suspended the awaited event is recorded, but the next step does not start.
    emit(&env, "events.gate.k1.open", json!({})).await?;
    w.wait_until(DEADLINE, |s| {
        of(s, "i-1", "step_completed")
            .iter()
            .any(|e| step_key(e) == "hold")
    })
    .await?;
    let status = grizzly(&env, &["workflow", "status", "i-1"]).await;
    assert!(text(&status).contains("suspended"), "{}", text(&status));
    assert!(!started(&w.seen, "i-1", "after"));
    let out = grizzly(&env, &["workflow", "resume", "i-1"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let end = wait_end(&mut w, "i-1").await?;
    assert_eq!(end.event_type(), "completed");
    // Cancel by CLI; then cancelling again (or a completed instance) is refused.
    let out = grizzly(&env, &["workflow", "cancel", "i-2"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(wait_end(&mut w, "i-2").await?.event_type(), "cancelled");
    // Cancel by event, of a completed instance: the coordinator refuses with an event.
    emit(&env, "events.workflow.i-1.cancel_requested", json!({})).await?;
    // (Earlier refusals, e.g. the resume of i-2, are in the log too: find this one.)
    w.wait_until(DEADLINE, |s| {
        of(s, "i-1", "transition_rejected").iter().any(|e| {
            e.data()["error"]
                .as_str()
                .is_some_and(|m| m.contains("cannot cancel an instance that is completed"))
        })
    })
    .await?;
    // The read model lists both, with their final status.
    env.workflow_view_caught_up(DEADLINE).await?;
    let list = grizzly(&env, &["workflow", "list", "--json"]).await;
    let rows: Value = serde_json::from_slice(&list.stdout)?;
    let by_id: HashMap<&str, &str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r["status"].as_str().unwrap()))
        .collect();
    assert_eq!(by_id.get("i-1"), Some(&"completed"), "{rows}");
    assert_eq!(by_id.get("i-2"), Some(&"cancelled"), "{rows}");
    let out = grizzly(&env, &["workflow", "cancel", "i-1"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cannot cancel an instance that is completed"),
        "{}",
        text(&out)
    );
    // Unknown workflows are refused at start.
    let out = grizzly(&env, &["workflow", "start", "nope"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("unknown workflow `nope`"),
        "{}",
        text(&out)
    );
    // A damaged read model is rebuilt from the log, entry for entry.
    use grizzly_coordinator::projection;
    let view = projection::ensure_bucket(&env.nats.js, 1).await?;
    env.workflow_view_caught_up(DEADLINE).await?;
    let before = projection::list(&view).await?;
    assert_eq!(before.len(), 2, "{before:?}");
    view.delete("i-1").await?;
    let mut damaged = before[1].clone();
    damaged.status = "running".into();
    view.put(&damaged.id, serde_json::to_vec(&damaged)?.into())
        .await?;
    let out = grizzly(&env, &["workflow", "list", "--rebuild"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("rebuild requested"), "{}", text(&out));
    let until = tokio::time::Instant::now() + DEADLINE;
    while projection::list(&view).await? != before {
        assert!(
            tokio::time::Instant::now() < until,
            "the read model was not rebuilt: {:?}",
            projection::list(&view).await?
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test]
async fn a_new_version_does_not_change_running_instances() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let log = step_handler(&env, "step", "");
    let v1 = "name: flow\nversion: 1\ndo:\n  - id: hold\n    wait: { event: events.gate.*.open }\n  - id: v1_step\n    call: step\n";
    write_workflow(&env, "flow.yaml", v1);
    let _worker = env.start_worker().await?;
    let coordinator = env.start_coordinator().await?;
    let mut w = env.watch().await?;
    start(&env, "flow", "old", json!({})).await?;
    w.wait_until(DEADLINE, |s| !of(s, "old", "waiting").is_empty())
        .await?;
    coordinator.shutdown().await?;
    // Version 2 replaces the file; the old instance keeps running version 1.
    write_workflow(
        &env,
        "flow.yaml",
        "name: flow\nversion: 2\ndo:\n  - id: v2_step\n    call: step\n",
    );
    let _coordinator = env.start_coordinator().await?;
    start(&env, "flow", "new", json!({})).await?;
    let new = wait_end(&mut w, "new").await?;
    assert_eq!(new.event_type(), "completed");
    assert_eq!(new.data()["version"], 2);
    assert!(started(&w.seen, "new", "v2_step"));
    emit(&env, "events.gate.g.open", json!({})).await?;
    let old = wait_end(&mut w, "old").await?;
    assert_eq!(old.event_type(), "completed");
    assert_eq!(old.data()["version"], 1);
    assert!(started(&w.seen, "old", "v1_step"));
    assert!(!started(&w.seen, "old", "v2_step"));
    assert_once(&log);
    Ok(())
}

#[tokio::test]
async fn a_killed_coordinator_resumes_every_instance_without_rerunning_a_step() -> anyhow::Result<()>
{
    let env = TestEnv::start().await?;
    let log = step_handler(&env, "step", "");
    let gate = env.path().join("release");
    let g = gate.display().to_string();
    write_workflow(
        &env,
        "in_step.yaml",
        &format!(
            "name: in_step\ndo:\n  - id: long\n    call: step\n    with: {{ gate: \"{g}\" }}\n  - id: next\n    call: step\n"
        ),
    );
    write_workflow(
        &env,
        "in_join.yaml",
        &format!(
            "name: in_join\ndo:\n  - id: both\n    fork:\n      branches:\n        - id: quick\n          do: [ {{ id: quick_call, call: step }} ]\n        - id: gated\n          do: [ {{ id: gated_call, call: step, with: {{ gate: \"{g}\" }} }} ]\n  - id: joined\n    call: step\n"
        ),
    );
    write_workflow(
        &env,
        "in_wait.yaml",
        "name: in_wait\ndo:\n  - id: signal\n    wait: { event: events.signal.*.go, correlate: { aggregate: \"${ instance.id }\" } }\n  - id: then_call\n    call: step\n",
    );
    write_workflow(
        &env,
        "in_timer.yaml",
        "name: in_timer\ndo:\n  - id: nap\n    sleep: 4s\n  - id: never\n    wait: { event: events.never.*.x, timeout: 1s, on_timeout: continue }\n  - id: woke\n    call: step\n",
    );
    write_workflow(
        &env,
        "in_saga.yaml",
        &format!(
            "name: in_saga\ndo:\n  - id: s1\n    call: step\n    compensate: {{ call: step, with: {{ undo: s1 }} }}\n  - id: s2\n    call: step\n    compensate: {{ call: step, with: {{ undo: s2, gate: \"{g}\" }} }}\n  - id: s3\n    call: step\n    with: {{ fail: true }}\n    retry: {{ max_attempts: 1 }}\n"
        ),
    );
    let worker = env.start_worker().await?;
    let mut coordinator = ChildProcess::start("grizzly-coordinator", &env.settings, &[])?;
    let mut w = env.watch().await?;
    for (wf, id) in [
        ("in_step", "k-step"),
        ("in_join", "k-join"),
        ("in_wait", "k-wait"),
        ("in_timer", "k-timer"),
        ("in_saga", "k-saga"),
    ] {
        start(&env, wf, id, json!({})).await?;
    }
    // Everything is mid-flight: a step running, a join half done, a wait, a timer, a
    // compensation running.
    w.wait_until(DEADLINE, |s| {
        started(s, "k-step", "long")
            && of(s, "k-join", "step_completed")
                .iter()
                .any(|e| step_key(e) == "quick_call")
            && started(s, "k-join", "gated_call")
            && started(s, "k-wait", "signal")
            && started(s, "k-timer", "nap")
            && started(s, "k-saga", "s2.compensate")
    })
    .await?;
    coordinator.kill();
    // While it is down: the running steps finish, the awaited event arrives, the timer is due.
    std::fs::write(&gate, "go")?;
    emit(&env, "events.signal.k-wait.go", json!({})).await?;
    w.wait_until(DEADLINE, |s| {
        s.iter()
            .filter(|e| e.event_type() == "handler_succeeded")
            .filter(|e| {
                ["k-step", "k-join", "k-saga"]
                    .iter()
                    .any(|i| e.subject.contains(i))
            })
            .count()
            >= 5
    })
    .await?;
    let restarted = ChildProcess::start("grizzly-coordinator", &env.settings, &[])?;
    for id in ["k-step", "k-join", "k-wait", "k-timer"] {
        let end = wait_end(&mut w, id).await?;
        assert_eq!(end.event_type(), "completed", "{id}: {}", end.data());
    }
    let saga = wait_end(&mut w, "k-saga").await?;
    assert_eq!(saga.event_type(), "failed");
    assert_eq!(
        saga.data()["compensated"],
        json!(["s2.compensate", "s1.compensate"])
    );
    assert!(started(&w.seen, "k-step", "next"));
    assert!(started(&w.seen, "k-join", "joined"));
    assert!(started(&w.seen, "k-timer", "woke"));
    assert_once(&log);
    assert_unique_steps(&w.seen);
    // The log a crash left behind (outboxes re-sent by the successor) replays the same way.
    restarted.terminate().await;
    assert_restore_reproduces(&env, vec![worker], 5).await
}

#[tokio::test]
async fn a_batch_survives_repeated_coordinator_kills() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let log = step_handler(&env, "step", "");
    write_workflow(
        &env,
        "many.yaml",
        "name: many\ndo:\n  - id: items\n    for: { in: input.items, concurrency: 3 }\n    call: step\n    with: { item: \"${ item }\", sleep_ms: 30 }\n  - id: last\n    call: step\n",
    );
    let _worker = env.start_worker().await?;
    let mut w = env.watch().await?;
    let items: Vec<u32> = (0..24).collect();
    start(&env, "many", "batch-1", json!({"items": items})).await?;
    for round in 1..=3 {
        let mut c = ChildProcess::start("grizzly-coordinator", &env.settings, &[])?;
        w.wait_until(DEADLINE, |s| {
            of(s, "batch-1", "step_completed").len() >= round * 6
        })
        .await?;
        c.kill();
    }
    let _last = ChildProcess::start("grizzly-coordinator", &env.settings, &[])?;
    let end = wait_end(&mut w, "batch-1").await?;
    assert_eq!(end.event_type(), "completed");
    let c = calls(&log);
    assert_eq!(c.len(), 25, "{c:?}");
    assert_once(&log);
    assert_unique_steps(&w.seen);
    Ok(())
}

/// A coordinator partition's (and the projector's) consumer gets a fresh name with every
/// recreation and the older ones are deleted: a pull request that a stalled predecessor sends
/// late addresses a consumer that is gone, and takes nothing from its successor, which resumes
/// at its predecessor's ack floor with every later event in order, at once.
#[tokio::test]
async fn a_late_pull_of_a_replaced_partition_consumer_takes_nothing_from_its_successor()
-> anyhow::Result<()> {
    use async_nats::jetstream::consumer::{AckPolicy, pull};
    use futures::StreamExt as _;
    use grizzly_coordinator::engine::{consumers_of_line, recreate_from_ack_floor};

    let env = TestEnv::start().await?;
    let js = &env.nats.js;
    for i in 1..=4 {
        emit(
            &env,
            &format!("events.workflow.line{i}.noted"),
            json!({"i": i}),
        )
        .await?;
    }
    let config = || pull::Config {
        filter_subject: "events.workflow.>".into(),
        ack_policy: AckPolicy::Explicit,
        ..Default::default()
    };
    let events = js.get_stream("EVENTS").await?;
    let seq = |m: &async_nats::jetstream::Message| m.info().map(|i| i.stream_sequence).unwrap();
    let fetch = |c: async_nats::jetstream::consumer::PullConsumer, n: usize| async move {
        let batch = c
            .fetch()
            .max_messages(n)
            .expires(Duration::from_millis(500))
            .messages()
            .await?;
        anyhow::Ok(batch.collect::<Vec<_>>().await)
    };

    // A consumer of the old release's fixed name is taken over like any predecessor.
    events
        .create_consumer(pull::Config {
            durable_name: Some("coordinator-test".into()),
            ..config()
        })
        .await?;
    let first = recreate_from_ack_floor(js, "coordinator-test", config()).await?;
    let first_name = first.cached_info().name.clone();
    assert!(first_name.starts_with("coordinator-test-"), "{first_name}");
    let got = fetch(first.clone(), 1).await?;
    let msg = got[0].as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(seq(msg), 1);
    msg.double_ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    // Delivered, never acked: the successor must deliver it again, in order.
    let unacked = fetch(first.clone(), 1).await?;
    assert_eq!(seq(unacked[0].as_ref().unwrap()), 2);

    // A consumer of another line is left alone.
    let other = recreate_from_ack_floor(js, "coordinator-test2", config()).await?;

    let second = recreate_from_ack_floor(js, "coordinator-test", config()).await?;
    let second_name = second.cached_info().name.clone();
    assert_ne!(first_name, second_name);
    let line: Vec<String> = consumers_of_line(&events, "coordinator-test")
        .await?
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(
        line,
        vec![second_name.clone()],
        "older consumers are deleted"
    );
    assert!(
        events
            .consumer_info(&other.cached_info().name)
            .await
            .is_ok()
    );

    // The predecessor's late pull: refused, nothing taken.
    let taken: Vec<u64> = fetch(first, 4)
        .await
        .map(|msgs| {
            msgs.iter()
                .filter_map(|m| m.as_ref().ok().map(seq))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        taken.is_empty(),
        "a late pull of the replaced consumer took events {taken:?}"
    );
    // The successor has everything from the ack floor on, first delivery, in order.
    let got = fetch(second, 10).await?;
    let got: Vec<(u64, i64)> = got
        .iter()
        .map(|m| {
            let m = m.as_ref().unwrap();
            (seq(m), m.info().unwrap().delivered)
        })
        .collect();
    assert_eq!(got, vec![(2, 1), (3, 1), (4, 1)]);
    Ok(())
}

/// Partitions resume from their cursors (KV `grizzly_wf_cursors`): a coordinator that stops
/// writes, for every partition, where the next owner starts — past every event it applied —
/// and the next coordinator goes on from there without running a step again. A cursor that is
/// not a sequence is replayed from the start of the log (slow, harmless), never skipped past.
#[tokio::test]
async fn partitions_resume_from_their_cursors_and_a_corrupt_cursor_replays_the_log()
-> anyhow::Result<()> {
    use grizzly_coordinator::reader::ensure_cursors_bucket;
    use grizzly_shared::nats::cursor_key;
    let env = TestEnv::start().await?;
    let log = step_handler(&env, "step", "");
    write_workflow(
        &env,
        "two.yaml",
        "name: two\ndo:\n  - id: a\n    call: step\n  - id: b\n    call: step\n",
    );
    let cursors = ensure_cursors_bucket(&env.nats.js, 1).await?;
    for p in 0..env.settings.partitions {
        cursors.put(cursor_key(p), "not a sequence".into()).await?;
    }
    let _worker = env.start_worker().await?;
    let coordinator = env.start_coordinator().await?;
    let mut w = env.watch().await?;
    let ids: Vec<String> = (0..6).map(|i| format!("cur-{i}")).collect();
    for id in &ids {
        start(&env, "two", id, json!({})).await?;
    }
    // Each instance's owner applied the event that completed it (its `completed` event is
    // caused by it) before the coordinator stopped.
    let mut applied = HashMap::new();
    for id in &ids {
        let end = wait_end(&mut w, id).await?;
        assert_eq!(end.event_type(), "completed", "{id}: {}", end.data());
        let cause = end.event.as_ref().and_then(|e| e.causationid.clone());
        let cause = w
            .seen
            .iter()
            .find(|e| e.event.as_ref().map(|e| &e.id) == cause.as_ref())
            .with_context(|| format!("{id}: the cause of its end is not in the log"))?;
        let p = partition_for(id, env.settings.partitions);
        let seq = applied.entry(p).or_insert(0);
        *seq = cause.seq.max(*seq);
    }
    coordinator.shutdown().await?;
    for p in 0..env.settings.partitions {
        let value = cursors
            .get(cursor_key(p))
            .await?
            .with_context(|| format!("no cursor for partition {p}"))?;
        let next: u64 = std::str::from_utf8(&value)?.parse()?;
        let seq = applied.get(&p).copied().unwrap_or(0);
        assert!(
            next > seq,
            "partition {p} resumes at {next}, at or before {seq}, which it applied"
        );
    }
    let _coordinator = env.start_coordinator().await?;
    start(&env, "two", "cur-after", json!({})).await?;
    let end = wait_end(&mut w, "cur-after").await?;
    assert_eq!(end.event_type(), "completed", "{}", end.data());
    assert_once(&log);
    assert_unique_steps(&w.seen);
    assert_eq!(calls(&log).len(), 14, "two steps for each of 7 instances");
    Ok(())
}

/// A partition applies the events waiting in its feed together. A burst of triggers, each
/// followed at once by the event its instance's first step waits on, puts both in one group:
/// the awaited event must still find the instance started just before it (in log order), and
/// an event for another invoice must not.
#[tokio::test]
async fn a_burst_of_triggers_each_followed_by_its_awaited_event_completes_every_instance()
-> anyhow::Result<()> {
    const N: usize = 60;
    let env = TestEnv::start().await?;
    install_examples(&env);
    let _worker = env.start_worker().await?;
    let _coordinator = env.start_coordinator().await?;
    let mut w = env.watch().await?;
    // The coordinator is up once a first instance runs.
    emit(&env, "events.invoice.warm.issued", json!({"customer": "c"})).await?;
    emit(&env, "events.invoice.warm.paid", json!({"amount": 1})).await?;
    w.wait_until(DEADLINE, |s| {
        s.iter()
            .any(|e| e.event_type() == "completed" && e.data()["output"]["invoice"] == "warm")
    })
    .await?;

    // Sent without waiting for each confirmation, so the events arrive together.
    let mut acks = Vec::new();
    for i in 0..N {
        for (kind, data) in [
            ("issued", json!({"customer": "acme"})),
            ("paid", json!({"amount": i})),
        ] {
            let subject = format!("events.invoice.burst-{i}.{kind}");
            acks.push(
                env.nats
                    .js
                    .publish(subject, data.to_string().into())
                    .await?,
            );
        }
        // The wait correlates on the aggregate: another invoice's payment does not count.
        let subject = format!("events.invoice.other-{i}.paid");
        acks.push(env.nats.js.publish(subject, "{}".into()).await?);
    }
    for ack in acks {
        ack.await?;
    }
    let completed = |s: &[LoggedEvent]| -> Vec<Value> {
        s.iter()
            .filter(|e| e.event_type() == "completed")
            .map(|e| e.data()["output"].clone())
            .filter(|o| {
                o["invoice"]
                    .as_str()
                    .is_some_and(|i| i.starts_with("burst-"))
            })
            .collect()
    };
    w.wait_until(DEADLINE, |s| completed(s).len() >= N).await?;
    let mut outputs = completed(&w.seen);
    outputs.sort_by_key(|o| o["invoice"].as_str().unwrap().to_string());
    let mut expected: Vec<Value> = (0..N)
        .map(|i| json!({"invoice": format!("burst-{i}"), "paid": true}))
        .collect();
    expected.sort_by_key(|o| o["invoice"].as_str().unwrap().to_string());
    assert_eq!(outputs, expected, "every invoice paid, each once");
    assert_unique_steps(&w.seen);
    Ok(())
}

/// A deployment taking over a log whose routing state is gone (a region promoted after a
/// failover, lost KV buckets) starts every partition at a chosen point with `grizzly cursors
/// set`: events before it are not routed again and workflows triggered before it are not started
/// again; everything after it is. Malformed requests, and a request while a listener or
/// coordinator runs, are refused and change nothing.
#[tokio::test]
async fn cursors_set_starts_routing_and_workflows_at_the_chosen_point() -> anyhow::Result<()> {
    let mut env = TestEnv::start().await?;
    // One partition: the coordinator applies every instance's events in log order.
    env.settings.partitions = 1;
    let log = step_handler(&env, "step", "on: [\"events.agent.*.ping\"]\n");
    write_workflow(
        &env,
        "one.yaml",
        "name: one\ndo:\n  - id: a\n    call: step\n",
    );
    let cli = |args: &'static [&'static str]| {
        let mut cmd = env.grizzly();
        cmd.env("GRIZZLY_PARTITIONS", "1").args(args);
        cmd
    };
    // History, handled where it was written: not to be handled here again.
    emit(&env, "events.agent.a1.ping", json!({"n": 1})).await?;
    start(&env, "one", "old", json!({})).await?;
    let now =
        time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339)?;

    for (args, code, expected) in [
        (
            vec!["cursors", "set"],
            2,
            "required arguments were not provided",
        ),
        (
            vec!["cursors", "set", "--seq", "1", "--time", &now],
            2,
            "cannot be used with",
        ),
        (
            vec!["cursors", "set", "--time", "yesterday"],
            2,
            "not an RFC 3339 time",
        ),
        (
            vec!["cursors", "set", "--seq", "0"],
            1,
            "log sequences start at 1",
        ),
        (
            vec!["cursors", "set", "--seq", "9"],
            1,
            "beyond the end of the log: its last event is 2",
        ),
    ] {
        let mut cmd = env.grizzly();
        let out = cmd
            .env("GRIZZLY_PARTITIONS", "1")
            .args(&args)
            .output()
            .await?;
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(expected), "{args:?}: {}", text(&out));
    }
    let out = cli(&["cursors", "show", "--json"]).output().await?;
    let shown: Value = serde_json::from_slice(&out.stdout).context(text(&out))?;
    assert_eq!(
        shown["partitions"][0]["listener"]["cursor"],
        Value::Null,
        "{shown}"
    );

    let out = env
        .grizzly()
        .env("GRIZZLY_PARTITIONS", "1")
        .args(["cursors", "set", "--time", &now])
        .output()
        .await?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("partitions 0–0 start at sequence 3"),
        "{}",
        text(&out)
    );
    let out = cli(&["cursors", "show", "--json"]).output().await?;
    let shown: Value = serde_json::from_slice(&out.stdout).context(text(&out))?;
    for part in ["listener", "coordinator"] {
        assert_eq!(shown["partitions"][0][part]["cursor"], 3, "{shown}");
    }

    // After the point: handled, started. The second ping of a1 comes after the first in a1's
    // order, so once it is handled the first would have been too, had it been routed.
    start(&env, "one", "new", json!({})).await?;
    emit(&env, "events.agent.a1.ping", json!({"n": 2})).await?;
    let mut w = env.watch().await?;
    let _listener = env.start_listener_with(env.settings.clone()).await?;
    let _worker = env.start_worker_with(env.settings.clone()).await?;
    let nats =
        grizzly_shared::nats::connect(&env.settings.nats_url, "test-coordinator", false).await?;
    let coordinator = grizzly_coordinator::Coordinator::new(nats, env.settings.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(coordinator.run(stop.clone()));
    let end = wait_end(&mut w, "new").await?;
    assert_eq!(end.event_type(), "completed", "{:?}", end.data());
    w.wait_until(DEADLINE, |seen| {
        seen.iter().any(|e| {
            e.subject == "events.agent.a1.handler_succeeded" && e.data()["output"]["n"] == 2
        })
    })
    .await?;
    let pings: Vec<_> = w
        .seen
        .iter()
        .filter(|e| e.subject == "events.agent.a1.handler_succeeded")
        .map(|e| e.data()["output"]["n"].clone())
        .collect();
    assert_eq!(
        pings,
        vec![json!(2)],
        "the ping before the point was handled again"
    );
    assert!(
        w.seen
            .iter()
            .all(|e| !e.subject.starts_with("events.workflow.old.")
                || e.event_type() == "start_requested"),
        "the workflow triggered before the point was started again"
    );
    let calls = std::fs::read_to_string(&log)?;
    assert_eq!(calls.lines().count(), 2, "{calls}");

    // Refused while a listener and a coordinator run; nothing changes.
    let out = cli(&["cursors", "set", "--seq", "1"]).output().await?;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("is running"), "{}", text(&out));
    let out = cli(&["cursors", "set", "--seq", "1", "--only", "coordinator"])
        .output()
        .await?;
    assert!(
        text(&out).contains("a coordinator is running"),
        "{}",
        text(&out)
    );
    stop.cancel();
    running.await??;
    Ok(())
}

/// A deployment that kept the log but lost the coordinators' KV state and `TASKS` (a region
/// promoted after a failover, docs/multi-region.md): `grizzly workflow restore` rebuilds the
/// checkpoints from the log, so the instances that were running finish — one waiting on an
/// event, one on a timer, one whose step's task was lost, and one whose step event had not
/// reached the log either (the mirror's lag) — and the finished one does not run again.
#[tokio::test]
async fn restore_rebuilds_lost_checkpoints_from_the_log_and_running_instances_finish()
-> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let log = step_handler(&env, "step", "");
    write_workflow(
        &env,
        "one.yaml",
        "name: one\ndo:\n  - id: a\n    call: step\n",
    );
    write_workflow(
        &env,
        "gate.yaml",
        "name: gate\ndo:\n  - id: a\n    call: step\n  - id: hold\n    wait: { event: events.gate.*.open, correlate: { aggregate: \"${ input.key }\" } }\n  - id: after\n    call: step\n",
    );
    write_workflow(
        &env,
        "nap.yaml",
        "name: nap\ndo:\n  - id: nap\n    sleep: 3s\n  - id: woke\n    call: step\n",
    );
    write_workflow(
        &env,
        "parent.yaml",
        "name: parent\ndo:\n  - id: sub\n    run: gate\n    with: { key: k2 }\n  - id: last\n    call: step\n",
    );
    // Its file is gone by the failover, and its pinned text with the KV state.
    write_workflow(
        &env,
        "gone.yaml",
        "name: gone\ndo:\n  - id: nap\n    sleep: 1h\n",
    );
    let restore = || {
        let mut cmd = env.restore_command();
        cmd.env("GRIZZLY_STREAMS__DUPLICATE_WINDOW", "1s");
        cmd
    };
    let worker = env.start_worker().await?;
    let coordinator = env.start_coordinator().await?;
    let mut w = env.watch().await?;
    start(&env, "one", "done", json!({})).await?;
    start(&env, "gate", "held", json!({"key": "k1"})).await?;
    start(&env, "nap", "napping", json!({})).await?;
    start(&env, "parent", "parent1", json!({})).await?;
    start(&env, "gone", "orphan", json!({})).await?;
    wait_end(&mut w, "done").await?;
    w.wait_until(DEADLINE, |s| {
        started(s, "held", "hold")
            && started(s, "napping", "nap")
            && started(s, "orphan", "nap")
            && s.iter().any(|e| {
                e.event_type() == "step_started"
                    && step_key(e) == "hold"
                    && e.data()["wait"]["aggregate"] == "k2"
            })
    })
    .await?;
    // With the worker stopped, the steps started now stay in flight.
    worker.shutdown().await?;
    start(&env, "one", "inflight", json!({})).await?;
    start(&env, "one", "lost", json!({})).await?;
    w.wait_until(DEADLINE, |s| {
        started(s, "inflight", "a") && started(s, "lost", "a")
    })
    .await?;

    let out = restore().output().await?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("a coordinator is running"),
        "{}",
        text(&out)
    );
    coordinator.shutdown().await?;
    let out = restore().output().await?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("holds checkpoints"), "{}", text(&out));
    // A newer version of `one` arrives: the instances that started on version 1 stay on it.
    write_workflow(
        &env,
        "one_v2.yaml",
        "name: one\nversion: 2\ndo:\n  - id: b\n    call: step\n",
    );

    // The failover: the log survives but for `lost`'s step event; KV state and tasks do not.
    // The promoted region's log has never seen that event's id, nor its tasks' ids: the
    // duplicate window shrinks until the broker forgets the ids it holds (a canary published
    // before the deletion is accepted again), and `TASKS` is made anew.
    let js = &env.nats.js;
    let canary = |n: u32| {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", "restore-canary");
        js.publish_with_headers(
            "events.test.canary.ping",
            headers,
            json!({ "n": n }).to_string().into(),
        )
    };
    assert!(!canary(0).await?.await?.duplicate);
    let lost_step = of(&w.seen, "lost", "step_started")[0].seq;
    js.get_stream("EVENTS")
        .await?
        .delete_message(lost_step)
        .await?;
    let mut short = env.settings.streams.clone();
    short.duplicate_window = Duration::from_secs(1);
    grizzly_shared::nats::ensure_streams(js, &short).await?;
    let until = tokio::time::Instant::now() + DEADLINE;
    let mut n = 1;
    while canary(n).await?.await?.duplicate {
        anyhow::ensure!(
            tokio::time::Instant::now() < until,
            "the broker never forgot the ids"
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    js.delete_stream("TASKS").await?;
    env.delete_workflow_state().await?;
    std::fs::remove_file(env.settings.workflows_dir.join("gone.yaml"))?;

    // Everything is restored but `orphan`, whose version nothing holds any more: named, and
    // the exit status says so.
    let out = restore().output().await?;
    let said = text(&out);
    assert_eq!(out.status.code(), Some(3), "{said}");
    assert!(
        said.contains("7 checkpoints written (6 unfinished)")
            && said.contains("published 1 workflow event(s) the log lacked")
            && said.contains("not restored: orphan: unknown workflow `gone` version 1")
            && said.contains("1 instance(s) not restored"),
        "{said}"
    );
    for (out, code, expected) in [
        (restore().output().await?, 1, "holds checkpoints"),
        (
            restore().env("GRIZZLY_PARTITIONS", "2").output().await?,
            1,
            "has a cursor for partition 3, but `partitions` is 2",
        ),
        (
            restore().arg("--from").output().await?,
            2,
            "unexpected argument '--from'",
        ),
    ] {
        assert_eq!(out.status.code(), Some(code), "{}", text(&out));
        assert!(text(&out).contains(expected), "{}", text(&out));
    }

    let _worker = env.start_worker().await?;
    let _coordinator = env.start_coordinator().await?;
    emit(&env, "events.gate.k1.open", json!({})).await?;
    emit(&env, "events.gate.k2.open", json!({})).await?;
    for instance in ["held", "napping", "inflight", "lost", "parent1"] {
        let end = wait_end(&mut w, instance).await?;
        assert_eq!(
            end.event_type(),
            "completed",
            "{instance}: {:?}",
            end.data()
        );
    }
    let calls = calls(&log);
    for (instance, step) in [
        ("done", "a"),
        ("held", "a"),
        ("held", "after"),
        ("napping", "woke"),
        ("inflight", "a"),
        ("lost", "a"),
        ("parent1", "last"),
    ] {
        assert_eq!(
            calls.get(&(instance.to_string(), step.to_string())),
            Some(&1),
            "{instance}.{step}: {calls:?}"
        );
    }
    // … and the child's two steps, once each.
    assert_eq!(calls.len(), 9, "{calls:?}");
    assert!(calls.values().all(|n| *n == 1), "{calls:?}");
    for instance in ["done", "held", "napping", "inflight", "lost", "parent1"] {
        assert_eq!(
            of(&w.seen, instance, "created").len(),
            1,
            "{instance} was started again"
        );
    }
    assert_eq!(of(&w.seen, "done", "completed").len(), 1);
    Ok(())
}
