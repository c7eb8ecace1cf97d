//! `grizzly events tail|replay|trace` on a recorded run: a listener, a worker with a handler that
//! answers pings with pongs (and fails when asked), and an in-process coordinator running a
//! two-step workflow write a real log; then the real `grizzly` binary replays aggregates and
//! traces events, and its output is checked exactly — including malformed arguments.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::HeaderMap;
use futures::StreamExt;
use grizzly_tests::{LoggedEvent, TestEnv};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(60);

/// Answers each event: fails when `data.fail`, emits a `pong` for a `ping`, outputs `{seen: n}`.
const SCRIPT: &str = r#"
import json, sys
for line in sys.stdin:
    event = json.loads(line)
    d = event.get("data") or {}
    if d.get("fail"):
        print(json.dumps({"done": True, "error": "asked to fail"}), flush=True)
        continue
    if event["type"] == "ping":
        print(json.dumps({"type": "pong", "data": {"reply_to": event["id"], "n": d.get("n")}}), flush=True)
    print(json.dumps({"done": True, "output": {"seen": d.get("n")}}), flush=True)
"#;

const WORKFLOW: &str = "name: tiny\ndo:\n  - id: first\n    call: step\n    with: { n: 1 }\n  - id: second\n    call: step\n    with: { n: 2 }\n";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }
}

/// Runs the real `grizzly` binary without blocking the runtime that hosts the components.
async fn grizzly(env: &TestEnv, args: &[&str]) -> anyhow::Result<Run> {
    let out = tokio::time::timeout(DEADLINE, env.grizzly().args(args).output()).await??;
    Ok(Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Publishes a raw JSON body with an id (and optionally a correlation id) in headers.
async fn publish(
    env: &TestEnv,
    subject: &str,
    id: &str,
    correlation: Option<&str>,
    body: Value,
) -> anyhow::Result<u64> {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    if let Some(c) = correlation {
        headers.insert("Grizzly-Correlation-Id", c);
    }
    let ack = env
        .nats
        .js
        .publish_with_headers(subject.to_string(), headers, body.to_string().into())
        .await?
        .await?;
    Ok(ack.sequence)
}

fn outcomes_of(seen: &[LoggedEvent], event_type: &str, cause: &str) -> usize {
    seen.iter()
        .filter(|e| e.event_type() == event_type && e.data()["event_id"] == cause)
        .count()
}

fn seqs_under(seen: &[LoggedEvent], prefix: &str) -> Vec<(u64, String)> {
    seen.iter()
        .filter(|e| e.subject.starts_with(prefix))
        .map(|e| (e.seq, e.event_type().to_string()))
        .collect()
}

fn tree_seqs(node: &Value, out: &mut BTreeSet<u64>) {
    out.insert(node["seq"].as_u64().unwrap());
    for c in node["children"].as_array().unwrap() {
        tree_seqs(c, out);
    }
}

fn paths(step: &Value) -> Vec<&str> {
    step["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["path"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn replay_and_trace_a_recorded_run() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let script = env.write_script("answer.py", SCRIPT);
    let process = format!(
        "kind: process\ncommand: [\"python3\", \"{}\"]\nretry: {{ max_attempts: 2, initial_backoff: 50ms, max_backoff: 100ms }}\n",
        script.display()
    );
    env.write_handler(
        "echo",
        &format!("name: echo\non: [\"events.agent.*.ping\"]\n{process}"),
    );
    env.write_handler("step", &format!("name: step\n{process}"));
    std::fs::write(env.settings.workflows_dir.join("tiny.yaml"), WORKFLOW)?;
    let _listener = env.start_listener().await?;
    let _worker = env.start_worker().await?;
    let _coordinator = env.start_coordinator().await?;
    let mut w = env.watch().await?;

    // The recorded run: each ping is handled before the next one, so the log order is known.
    publish(
        &env,
        "events.agent.a1.ping",
        "ping-1",
        None,
        json!({"n": 1, "note": "first"}),
    )
    .await?;
    w.wait_until(DEADLINE, |s| {
        outcomes_of(s, "handler_succeeded", "ping-1") == 1
    })
    .await?;
    // No cause, but correlated with ping-1 (e.g. a script that only passed the correlation on).
    publish(
        &env,
        "events.agent.a2.note",
        "note-1",
        Some("ping-1"),
        json!({"about": 1}),
    )
    .await?;
    publish(
        &env,
        "events.agent.a1.ping",
        "ping-2",
        None,
        json!({"n": 2}),
    )
    .await?;
    w.wait_until(DEADLINE, |s| {
        outcomes_of(s, "handler_succeeded", "ping-2") == 1
    })
    .await?;
    publish(
        &env,
        "events.agent.a1.ping",
        "ping-3",
        None,
        json!({"fail": true}),
    )
    .await?;
    w.wait_until(DEADLINE, |s| {
        outcomes_of(s, "handler_failed", "ping-3") == 2
    })
    .await?;
    // Malformed input in the log: never an event, so replay skips it and says so.
    let bad_seq = env.publish_raw("events.agent.a1.ping", "not json").await?;
    publish(
        &env,
        "events.workflow.w1.start_requested",
        "start-w1",
        None,
        json!({"workflow": "tiny", "input": {}}),
    )
    .await?;
    w.wait_until(DEADLINE, |s| {
        s.iter()
            .any(|e| e.subject == "events.workflow.w1.completed")
            && s.iter().any(|e| e.seq == bad_seq)
    })
    .await?;
    let a1 = seqs_under(&w.seen, "events.agent.a1.");
    let types: Vec<&str> = a1.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "ping",
            "pong",
            "handler_succeeded",
            "ping",
            "pong",
            "handler_succeeded",
            "ping",
            "handler_failed",
            "handler_failed",
            "ping"
        ]
    );

    // ---- replay of an agent: every step, what changed, the folded state -------------------
    let run = grizzly(
        &env,
        &["events", "replay", "--aggregate", "agent/a1", "--json"],
    )
    .await?;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let doc = run.json();
    assert_eq!(doc["aggregate"], "agent/a1");
    assert_eq!(doc["fold"], "generic");
    assert_eq!(doc["folded_before"], 0);
    let steps = doc["steps"].as_array().unwrap();
    let step_seqs: Vec<(u64, String)> = steps
        .iter()
        .map(|s| {
            (
                s["seq"].as_u64().unwrap(),
                s["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        step_seqs,
        a1[..9],
        "every event but the malformed one is a step"
    );
    assert_eq!(doc["skipped"].as_array().unwrap().len(), 1);
    assert_eq!(doc["skipped"][0]["seq"], bad_seq);
    assert!(
        doc["skipped"][0]["error"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{}",
        doc["skipped"]
    );
    assert_eq!(doc["to"], bad_seq);
    assert_eq!(steps[0]["id"], "ping-1");
    assert_eq!(
        steps[0]["changes"],
        json!([{"path": "data.n", "to": 1}, {"path": "data.note", "to": "first"}])
    );
    assert_eq!(
        steps[1]["changes"],
        json!([{"path": "data.reply_to", "to": "ping-1"}])
    );
    assert_eq!(
        paths(&steps[2]),
        [
            "handlers.echo.failed",
            "handlers.echo.last_output.seen",
            "handlers.echo.succeeded"
        ]
    );
    assert_eq!(
        steps[3]["changes"],
        json!([{"path": "data.n", "from": 1, "to": 2}])
    );
    assert_eq!(
        steps[5]["changes"],
        json!([
            {"path": "handlers.echo.last_output.seen", "from": 1, "to": 2},
            {"path": "handlers.echo.succeeded", "from": 1, "to": 2}
        ])
    );
    assert_eq!(
        paths(&steps[7]),
        ["handlers.echo.failed", "handlers.echo.last_error"]
    );
    assert_eq!(
        steps[8]["changes"],
        json!([{"path": "handlers.echo.failed", "from": 1, "to": 2}])
    );
    let state = &doc["state"];
    assert_eq!(state["aggregate"], "agent/a1");
    assert_eq!(state["events"], 9);
    assert_eq!(state["last_seq"], a1[8].0);
    assert_eq!(state["last_event"]["type"], "handler_failed");
    assert_eq!(
        state["counts"],
        json!({"handler_failed": 2, "handler_succeeded": 2, "ping": 3, "pong": 2})
    );
    let echo = &state["handlers"]["echo"];
    assert_eq!(
        (&echo["succeeded"], &echo["failed"], &echo["last_output"]),
        (&json!(2), &json!(2), &json!({"seen": 2}))
    );
    assert!(
        echo["last_error"]
            .as_str()
            .unwrap()
            .contains("asked to fail"),
        "{echo}"
    );
    assert_eq!(
        state["data"],
        json!({"n": 2, "note": "first", "reply_to": "ping-2", "fail": true})
    );

    // A range: earlier events are folded silently, the state is the one at --to.
    let (from, to) = (a1[3].0, a1[5].0);
    let run = grizzly(
        &env,
        &[
            "events",
            "replay",
            "--aggregate",
            "agent/a1",
            "--from",
            &from.to_string(),
            "--to",
            &to.to_string(),
            "--json",
        ],
    )
    .await?;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let doc = run.json();
    assert_eq!(doc["folded_before"], 3);
    assert_eq!(doc["to"], to);
    let range: Vec<u64> = doc["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(range, [a1[3].0, a1[4].0, a1[5].0]);
    assert_eq!(
        doc["state"]["counts"],
        json!({"handler_succeeded": 2, "ping": 2, "pong": 2})
    );
    assert_eq!(
        doc["state"]["data"],
        json!({"n": 2, "note": "first", "reply_to": "ping-2"})
    );

    // The human form: one line per step, then the state.
    let run = grizzly(&env, &["events", "replay", "--aggregate", "agent/a1"]).await?;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let text = &run.stdout;
    assert!(
        text.starts_with("replay of agent/a1 (generic fold)\n"),
        "{text}"
    );
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("seq {:>7}  ping", a1[3].0)))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.ends_with("data.n: 1 → 2"), "{line}");
    assert!(
        text.contains(&format!(
            "seq {bad_seq:>7}  skipped: payload on `events.agent.a1.ping` is not valid JSON"
        )),
        "{text}"
    );
    assert!(
        text.contains("\nhandler    echo: 2 succeeded, 2 failed, last output {\"seen\":2}"),
        "{text}"
    );
    assert!(
        text.contains("\ncounts     handler_failed=2 handler_succeeded=2 ping=3 pong=2\n"),
        "{text}"
    );

    // ---- replay of a workflow instance ends in what `workflow status` shows ------------------
    let store = grizzly_coordinator::projection::ensure_bucket(&env.nats.js, 1).await?;
    let w1 = seqs_under(&w.seen, "events.workflow.w1.");
    let last_w1 = w1.last().unwrap().0;
    let mut updates = store.watch_with_history("w1").await?;
    loop {
        let entry = tokio::time::timeout(DEADLINE, updates.next())
            .await?
            .expect("watch ended")?;
        let view: Value = serde_json::from_slice(&entry.value)?;
        if view["last_seq"].as_u64() >= Some(last_w1) {
            break;
        }
    }
    let status = grizzly(&env, &["workflow", "status", "w1", "--json"]).await?;
    assert_eq!(status.code, 0, "{}", status.stderr);
    let run = grizzly(
        &env,
        &["events", "replay", "--aggregate", "workflow/w1", "--json"],
    )
    .await?;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let doc = run.json();
    assert_eq!(doc["fold"], "workflow");
    assert_eq!(doc["state"], status.json(), "replay state == read model");
    assert_eq!(doc["state"]["status"], "completed");
    assert_eq!(doc["steps"].as_array().unwrap().len(), w1.len());
    let completed = doc["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["type"] == "step_completed")
        .unwrap();
    assert!(
        paths(completed).contains(&"steps.first.status"),
        "{completed}"
    );
    let run = grizzly(&env, &["events", "replay", "--aggregate", "workflow/w1"]).await?;
    assert!(
        run.stdout.contains("\nstatus    completed\n"),
        "{}",
        run.stdout
    );

    // ---- trace: the causation tree of ping-1 ---------------------------------------------
    let run = grizzly(&env, &["events", "trace", "ping-1", "--json"]).await?;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let doc = run.json();
    let tree = &doc["tree"];
    assert_eq!(doc["events"], 4);
    assert!(
        doc["scanned"].as_u64() >= Some(w.seen.len() as u64),
        "one pass over the whole log"
    );
    assert_eq!(
        (&tree["id"], &tree["relation"], &tree["by"]),
        (&json!("ping-1"), &json!("root"), &json!("from nats"))
    );
    assert_eq!(tree["offset_ms"], 0);
    let kids: Vec<(&str, &str, &str)> = tree["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["type"].as_str().unwrap(),
                c["relation"].as_str().unwrap(),
                c["by"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kids,
        [
            ("pong", "caused", "handler echo"),
            ("handler_succeeded", "caused", "handler echo"),
            ("note", "correlated", "from nats"),
        ]
    );
    let run_info = &tree["children"][1]["handler_run"];
    assert_eq!(
        (
            &run_info["handler"],
            &run_info["attempt"],
            &run_info["succeeded"]
        ),
        (&json!("echo"), &json!(1), &json!(true))
    );
    assert!(run_info["duration_ms"].is_u64() && run_info["started_offset_ms"].is_i64());
    // Scheduled (its task stored) after the root was stored, and started no earlier (the
    // outcome's start is in whole ms, the schedule rounded down to them).
    let scheduled = run_info["scheduled_offset_ms"].as_i64().expect("scheduled");
    assert!(
        (0..=run_info["started_offset_ms"].as_i64().unwrap()).contains(&scheduled),
        "{run_info}"
    );
    let offsets: Vec<i64> = tree["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["offset_ms"].as_i64().unwrap())
        .collect();
    assert!(offsets.is_sorted() && offsets[0] >= 0, "{offsets:?}");

    let run = grizzly(&env, &["events", "trace", "ping-1"]).await?;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{}", run.stdout);
    assert!(
        lines[0].starts_with(&format!(
            "events.agent.a1.ping  seq {}  +0ms  from nats",
            a1[0].0
        )),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with("├─ events.agent.a1.pong  seq "),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].starts_with("├─ events.agent.a1.handler_succeeded")
            && lines[2].contains("handler echo: attempt 1 succeeded in ")
            && lines[2].contains("(scheduled +"),
        "{}",
        lines[2]
    );
    assert!(
        lines[3].starts_with("└─ events.agent.a2.note") && lines[3].contains("[correlated"),
        "{}",
        lines[3]
    );
    assert!(lines[4].starts_with("4 event(s) over "), "{}", lines[4]);

    // The workflow's start request caused every event of the instance, through the handler.
    let run = grizzly(&env, &["events", "trace", "start-w1", "--json"]).await?;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let tree = run.json()["tree"].clone();
    let mut in_tree = BTreeSet::new();
    tree_seqs(&tree, &mut in_tree);
    let expected: BTreeSet<u64> = w1.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        in_tree,
        expected,
        "{}",
        serde_json::to_string_pretty(&tree)?
    );
    let text = grizzly(&env, &["events", "trace", "start-w1"])
        .await?
        .stdout;
    assert!(
        text.contains("events.workflow.w1.step_started  seq")
            && text.contains("workflow tiny step first"),
        "{text}"
    );
    assert!(
        text.contains("handler step: attempt 1 succeeded in "),
        "{text}"
    );

    // ---- tail filters -------------------------------------------------------------------
    let run = grizzly(
        &env,
        &[
            "events",
            "tail",
            "--from-start",
            "--aggregate",
            "agent/a1",
            "--type",
            "handler_failed",
            "--json",
            "--count",
            "2",
        ],
    )
    .await?;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let causes: Vec<Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["event"]["data"]["event_id"].clone())
        .collect();
    assert_eq!(causes, [json!("ping-3"), json!("ping-3")]);
    let run = grizzly(
        &env,
        &[
            "events",
            "tail",
            "events.agent.>",
            "--from-start",
            "--source",
            "grizzly/handler/*",
            "--type",
            "pong",
            "--count",
            "2",
        ],
    )
    .await?;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", run.stdout);
    assert!(
        lines[0].contains(&format!("  {:>8}  events.agent.a1.pong ", a1[1].0))
            && lines[0].contains(r#""reply_to":"ping-1""#),
        "{}",
        lines[0]
    );
    let run = grizzly(
        &env,
        &[
            "events",
            "tail",
            "--from-start",
            "--source",
            "nats",
            "--aggregate",
            "agent/*",
            "--type",
            "note",
            "--count",
            "1",
        ],
    )
    .await?;
    assert!(
        run.stdout.contains("events.agent.a2.note"),
        "{}",
        run.stdout
    );

    // `--no-follow`: what the log holds now, then exit — also when nothing matches.
    let run = grizzly(
        &env,
        &[
            "events",
            "tail",
            "--from-start",
            "--aggregate",
            "agent/a1",
            "--type",
            "handler_failed",
            "--json",
            "--no-follow",
        ],
    )
    .await?;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout.lines().count(), 2, "{}", run.stdout);
    for args in [
        vec![
            "events",
            "tail",
            "--from-start",
            "--aggregate",
            "agent/nobody",
            "--no-follow",
        ],
        vec!["events", "tail", "--no-follow"],
    ] {
        let run = grizzly(&env, &args).await?;
        assert_eq!(
            (run.code, run.stdout.as_str()),
            (0, ""),
            "{args:?}: {}",
            run.stderr
        );
    }

    // ---- malformed arguments: usage errors (exit 2); unknown things: errors (exit 1) -------
    for (args, code, needle) in [
        (
            vec!["events", "tail", "--type", "a.b"],
            2,
            "`a.b` must match",
        ),
        (
            vec!["events", "tail", "events.>.x"],
            2,
            "must be `*`, a final `>`",
        ),
        (
            vec!["events", "tail", "--aggregate", "agent"],
            2,
            "`<aggregate_type>/<aggregate_id>`",
        ),
        (
            vec!["events", "replay", "--aggregate", "agent"],
            2,
            "e.g. `agent/a1`",
        ),
        (
            vec!["events", "replay", "--aggregate", "agent/a 1"],
            2,
            "aggregate id `a 1`",
        ),
        (
            vec!["events", "replay", "--aggregate", "agent/*"],
            2,
            "aggregate id `*`",
        ),
        (
            vec![
                "events",
                "replay",
                "--aggregate",
                "agent/a1",
                "--from",
                "9",
                "--to",
                "3",
            ],
            2,
            "--from 9 is after --to 3",
        ),
        (
            vec!["events", "replay", "--aggregate", "agent/a1", "--from", "x"],
            2,
            "invalid value 'x'",
        ),
        (
            vec!["events", "replay", "--aggregate", "agent/nobody"],
            1,
            "unknown aggregate `agent/nobody`: no events on `events.agent.nobody.>`",
        ),
        (
            vec![
                "events",
                "replay",
                "--aggregate",
                "agent/a1",
                "--from",
                "100000",
            ],
            1,
            "has no events between seq 100000 and the end",
        ),
        (
            vec!["events", "trace", "nope"],
            1,
            "event `nope` is not in the log",
        ),
        (vec!["events", "trace", ""], 2, "the event id is empty"),
    ] {
        let run = grizzly(&env, &args).await?;
        assert_eq!(run.code, code, "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(needle), "{args:?}: {}", run.stderr);
        assert!(run.stdout.is_empty(), "{args:?}: {}", run.stdout);
    }
    Ok(())
}
