//! The first vertical slice end to end, against a real nats-server: raw events in, handlers run,
//! outcomes and emitted events back in the log, order per aggregate, crash recovery, bad input.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use grizzly_tests::{ChildProcess, LoggedEvent, TestEnv};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(60);

/// An exec handler that answers each event with a `pong` carrying the event's data.
const PONG_SCRIPT: &str = r#"
import json, sys
event = json.load(sys.stdin)
print("handling " + event["id"])
print(json.dumps({"type": "pong", "data": {"got": event["data"]}}))
"#;

/// A persistent JSON-lines handler: one reply per request line, then the terminator.
const ECHO_PROCESS: &str = r#"
import json, os, sys
for line in sys.stdin:
    event = json.loads(line)
    if event["data"].get("fail"):
        print(json.dumps({"done": True, "error": "asked to fail"}), flush=True)
        continue
    print(json.dumps({"done": True, "output": {"pid": os.getpid(), "n": event["data"].get("n")}}), flush=True)
"#;

fn succeeded_for(events: &[LoggedEvent], handler: &str) -> Vec<LoggedEvent> {
    events
        .iter()
        .filter(|e| e.event_type() == "handler_succeeded" && e.data()["handler"] == handler)
        .cloned()
        .collect()
}

#[tokio::test]
async fn raw_json_event_runs_an_exec_handler_and_records_outcome_and_emitted_event()
-> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let script = env.write_script("pong.py", PONG_SCRIPT);
    env.write_handler(
        "pong",
        &format!("name: pong\nversion: 3\non: [\"events.agent.*.ping\"]\nkind: exec\ncommand: [\"python3\", \"{}\"]\n", script.display()),
    );
    let _listener = env.start_listener().await?;
    let _worker = env.start_worker().await?;
    let mut watch = env.watch().await?;

    // A plain client: no envelope, no headers.
    let plain = async_nats::connect(env.settings.nats_url.clone()).await?;
    plain
        .publish("events.agent.a1.ping", r#"{"x":1}"#.into())
        .await?;
    plain.flush().await?;

    watch
        .wait_for_type("handler_succeeded", 1, DEADLINE)
        .await?;
    watch.wait_for_type("pong", 1, DEADLINE).await?;
    let ping = watch.of_type("ping").remove(0).event.expect("ping parsed");
    let outcome = watch.of_type("handler_succeeded").remove(0);
    let pong = watch.of_type("pong").remove(0);
    assert_eq!(outcome.subject, "events.agent.a1.handler_succeeded");
    let data = outcome.data();
    assert_eq!(data["handler"], "pong");
    assert_eq!(data["handler_version"], 3);
    assert_eq!(data["event_id"], json!(ping.id));
    assert_eq!(data["attempt"], 1);
    assert!(data["duration_ms"].is_u64());
    assert!(
        data["output"]
            .as_str()
            .unwrap()
            .contains(&format!("handling {}", ping.id))
    );
    let outcome = outcome.event.unwrap();
    assert_eq!(outcome.causationid.as_deref(), Some(ping.id.as_str()));
    assert_eq!(pong.subject, "events.agent.a1.pong");
    let pong_event = pong.event.unwrap();
    assert_eq!(pong_event.data, json!({"got": {"x": 1}}));
    assert_eq!(pong_event.causationid.as_deref(), Some(ping.id.as_str()));
    assert_eq!(
        pong_event.correlationid.as_deref(),
        Some(ping.correlation_id())
    );
    assert_eq!(data["emitted"], json!([pong_event.id]));
    // The emitted event comes before the outcome that reports it.
    assert!(watch.of_type("pong")[0].seq < watch.of_type("handler_succeeded")[0].seq);
    Ok(())
}

#[tokio::test]
async fn a_process_handler_serves_many_events_with_one_process() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let script = env.write_script("echo.py", ECHO_PROCESS);
    env.write_handler(
        "echo",
        &format!("name: echo\non: [\"events.agent.*.job\"]\nkind: process\ncommand: [\"python3\", \"{}\"]\nconcurrency: 1\n", script.display()),
    );
    let _listener = env.start_listener().await?;
    let _worker = env.start_worker().await?;
    let mut watch = env.watch().await?;
    for i in 0..40 {
        env.publish_raw(
            &format!("events.agent.p{}.job", i % 5),
            json!({"n": i}).to_string(),
        )
        .await?;
    }
    let outcomes = watch
        .wait_for_type("handler_succeeded", 40, DEADLINE)
        .await?;
    let pids: HashSet<u64> = outcomes
        .iter()
        .map(|o| o.data()["output"]["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(
        pids.len(),
        1,
        "one persistent process served every event: {pids:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_thousand_events_over_fifty_aggregates_are_handled_once_each_in_log_order()
-> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let script = env.write_script("echo.py", ECHO_PROCESS);
    env.write_handler(
        "echo",
        &format!("name: echo\non: [\"events.agent.*.job\"]\nkind: process\ncommand: [\"python3\", \"{}\"]\nconcurrency: 4\n", script.display()),
    );
    let _listener = env.start_listener().await?;
    let _worker = env.start_worker().await?;
    let mut watch = env.watch().await?;
    for i in 0..1000 {
        env.nats
            .js
            .publish(
                format!("events.agent.agg{}.job", i % 50),
                json!({"n": i}).to_string().into(),
            )
            .await?;
    }
    env.nats.js.wait_for_acks().await;
    watch
        .wait_for_type("handler_succeeded", 1000, Duration::from_secs(120))
        .await?;
    let all = watch.seen.clone();
    check_exactly_once_in_order(&all, "echo", 1000);
    Ok(())
}

#[tokio::test]
async fn a_third_worker_gets_a_share_of_four_partitions_and_every_event_runs_once_in_order()
-> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let script = env.write_script("echo.py", ECHO_PROCESS);
    env.write_handler(
        "echo",
        &format!("name: echo\non: [\"events.agent.*.job\"]\nkind: process\ncommand: [\"python3\", \"{}\"]\nconcurrency: 4\n", script.display()),
    );
    let _listener = env.start_listener().await?;
    let worker = |id: &str| {
        let mut s = env.settings.clone();
        s.worker.id = Some(id.to_string());
        env.start_worker_with(s)
    };
    // Partitions of `echo` each worker holds, once all are held and every one of `ids` holds at
    // least one (a partition given back to rebalance is free for a moment).
    let shared_by = async |ids: &[&str]| -> anyhow::Result<HashMap<String, usize>> {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            let mut held: HashMap<String, usize> = HashMap::new();
            for owner in env.leases("task.echo.").await?.into_values() {
                *held.entry(owner).or_default() += 1;
            }
            if ids.iter().all(|id| held.contains_key(*id))
                && held.values().sum::<usize>() == usize::from(env.settings.partitions)
            {
                return Ok(held);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < until,
                "{ids:?} never shared the partitions: {held:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let _w1 = worker("w1").await?;
    let _w2 = worker("w2").await?;
    shared_by(&["w1", "w2"]).await?;
    // 4 partitions, 3 workers: 2 + 1 + 1, not 2 + 2 + 0.
    let _w3 = worker("w3").await?;
    let held = shared_by(&["w1", "w2", "w3"]).await?;
    assert_eq!(held.len(), 3, "{held:?}");

    let mut watch = env.watch().await?;
    for i in 0..300 {
        env.nats
            .js
            .publish(
                format!("events.agent.agg{}.job", i % 30),
                json!({"n": i}).to_string().into(),
            )
            .await?;
    }
    env.nats.js.wait_for_acks().await;
    watch
        .wait_for_type("handler_succeeded", 300, Duration::from_secs(120))
        .await?;
    check_exactly_once_in_order(&watch.seen, "echo", 300);
    let ran_on: HashSet<String> = succeeded_for(&watch.seen, "echo")
        .iter()
        .map(|e| e.data()["worker"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(ran_on.len(), 3, "every worker ran events: {ran_on:?}");
    Ok(())
}

/// Every `job` event has exactly one success for `handler`, and per aggregate the successes are
/// in the order of the events (their `n`).
fn check_exactly_once_in_order(all: &[LoggedEvent], handler: &str, expected: usize) {
    let jobs: HashMap<String, i64> = all
        .iter()
        .filter(|e| e.event_type() == "job")
        .map(|e| {
            let ev = e.event.as_ref().unwrap();
            (ev.id.clone(), ev.data["n"].as_i64().unwrap())
        })
        .collect();
    assert_eq!(jobs.len(), expected);
    let succeeded = succeeded_for(all, handler);
    let mut per_event: HashMap<String, usize> = HashMap::new();
    let mut per_aggregate: HashMap<String, Vec<i64>> = HashMap::new();
    for s in &succeeded {
        let cause = s.data()["event_id"].as_str().unwrap().to_string();
        *per_event.entry(cause.clone()).or_default() += 1;
        let agg = s.subject.split('.').nth(2).unwrap().to_string();
        per_aggregate.entry(agg).or_default().push(jobs[&cause]);
    }
    assert_eq!(per_event.len(), expected, "every event handled");
    assert!(
        per_event.values().all(|&c| c == 1),
        "no event handled twice"
    );
    for (agg, ns) in per_aggregate {
        let mut sorted = ns.clone();
        sorted.sort();
        assert_eq!(ns, sorted, "aggregate {agg} handled out of log order");
    }
}

#[tokio::test]
async fn a_worker_killed_mid_run_loses_nothing() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let script = env.write_script("echo.py", ECHO_PROCESS);
    env.write_handler(
        "echo",
        &format!("name: echo\non: [\"events.agent.*.job\"]\nkind: process\ncommand: [\"python3\", \"{}\"]\nconcurrency: 2\n", script.display()),
    );
    let _listener = env.start_listener().await?;
    let mut worker = ChildProcess::start("grizzly-worker", &env.settings, &[])?;
    let mut watch = env.watch().await?;
    for i in 0..400 {
        env.nats
            .js
            .publish(
                format!("events.agent.k{}.job", i % 20),
                json!({"n": i}).to_string().into(),
            )
            .await?;
    }
    env.nats.js.wait_for_acks().await;
    watch
        .wait_for_type("handler_succeeded", 50, DEADLINE)
        .await?;
    worker.kill();
    let handled_before = watch.of_type("handler_succeeded").len();
    let _replacement = ChildProcess::start("grizzly-worker", &env.settings, &[])?;
    watch
        .wait_until(Duration::from_secs(120), |seen| {
            let ids: HashSet<_> = seen
                .iter()
                .filter(|e| e.event_type() == "handler_succeeded")
                .map(|e| {
                    e.data()["event_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                })
                .collect();
            ids.len() >= 400
        })
        .await?;
    assert!(
        handled_before < 400,
        "the kill happened mid-run ({handled_before} done)"
    );
    let all = watch.seen.clone();
    check_exactly_once_in_order(&all, "echo", 400);
    Ok(())
}

#[tokio::test]
async fn bad_input_is_dead_lettered_with_the_reason_and_good_events_are_unaffected()
-> anyhow::Result<()> {
    let mut env = TestEnv::start().await?;
    env.settings.max_event_bytes = 1024;
    let script = env.write_script("echo.py", ECHO_PROCESS);
    env.write_handler(
        "echo",
        &format!(
            "name: echo\non: [\"events.>\"]\nkind: process\ncommand: [\"python3\", \"{}\"]\n",
            script.display()
        ),
    );
    let _listener = env.start_listener().await?;
    let _worker = env.start_worker().await?;
    let mut watch = env.watch().await?;
    let mut dlq = env.watch_dlq().await?;

    env.publish_raw("events.agent.g1.job", json!({"n": 1}).to_string())
        .await?;
    env.publish_raw("events.agent.b1.job", "this is not json")
        .await?;
    env.publish_raw("events.agent.g1.job", json!({"n": 2}).to_string())
        .await?;
    env.publish_raw("events.agent.short", "{}").await?;
    env.publish_raw("events.agent.b2.job.extra", "{}").await?;
    env.publish_raw(
        "events.agent.b3.job",
        format!("{{\"pad\":\"{}\"}}", "x".repeat(2000)),
    )
    .await?;
    env.publish_raw(
        "events.agent.b4.job",
        json!({"specversion": "1.0", "type": "other", "id": "x", "source": "t"}).to_string(),
    )
    .await?;
    env.publish_raw("events.agent.g1.job", json!({"n": 3}).to_string())
        .await?;

    let dead = dlq
        .wait_until(DEADLINE, |seen| seen.len() >= 5)
        .await?
        .to_vec();
    let records: Vec<serde_json::Value> = dead
        .iter()
        .map(|d| serde_json::from_slice(&d.payload).unwrap())
        .collect();
    assert!(dead.iter().all(|d| d.subject == "dlq._ingest"));
    let by_subject: HashMap<&str, &serde_json::Value> = records
        .iter()
        .map(|r| (r["original_subject"].as_str().unwrap(), r))
        .collect();
    assert_eq!(by_subject["events.agent.b1.job"]["kind"], "not_json");
    assert_eq!(
        by_subject["events.agent.b1.job"]["original_payload"],
        "this is not json"
    );
    assert!(
        by_subject["events.agent.b1.job"]["error"]
            .as_str()
            .unwrap()
            .contains("events.agent.b1.job")
    );
    assert_eq!(by_subject["events.agent.short"]["kind"], "bad_subject");
    assert!(
        by_subject["events.agent.short"]["error"]
            .as_str()
            .unwrap()
            .contains("3 tokens")
    );
    assert_eq!(
        by_subject["events.agent.b2.job.extra"]["kind"],
        "bad_subject"
    );
    assert_eq!(by_subject["events.agent.b3.job"]["kind"], "oversized");
    assert!(
        by_subject["events.agent.b3.job"]["error"]
            .as_str()
            .unwrap()
            .contains("1024")
    );
    assert_eq!(
        by_subject["events.agent.b4.job"]["kind"],
        "invalid_cloudevent"
    );

    // The good events around them are all handled, in order.
    let outcomes = watch
        .wait_for_type("handler_succeeded", 3, DEADLINE)
        .await?;
    let ns: Vec<i64> = outcomes
        .iter()
        .map(|o| o.data()["output"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(ns, vec![1, 2, 3]);
    Ok(())
}

#[tokio::test]
async fn a_failing_handler_retries_then_dead_letters_with_its_history() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let script = env.write_script("echo.py", ECHO_PROCESS);
    env.write_handler(
        "echo",
        &format!(
            "name: echo\non: [\"events.agent.*.job\"]\nkind: process\ncommand: [\"python3\", \"{}\"]\nretry: {{ max_attempts: 3, initial_backoff: 10ms, max_backoff: 50ms }}\n",
            script.display()
        ),
    );
    let _listener = env.start_listener().await?;
    let _worker = env.start_worker().await?;
    let mut watch = env.watch().await?;
    let mut dlq = env.watch_dlq().await?;
    env.publish_raw("events.agent.f1.job", json!({"fail": true}).to_string())
        .await?;
    env.publish_raw("events.agent.f1.job", json!({"n": 7}).to_string())
        .await?;
    let dead = dlq.wait_until(DEADLINE, |seen| !seen.is_empty()).await?[0].clone();
    assert_eq!(dead.subject, "dlq.echo");
    let record: serde_json::Value = serde_json::from_slice(&dead.payload)?;
    assert_eq!(record["attempts"], 3);
    assert_eq!(record["history"].as_array().unwrap().len(), 3);
    assert!(record["error"].as_str().unwrap().contains("asked to fail"));
    assert_eq!(record["event"]["data"], json!({"fail": true}));
    let failed = watch.wait_for_type("handler_failed", 3, DEADLINE).await?;
    let attempts: Vec<u64> = failed
        .iter()
        .map(|f| f.data()["attempt"].as_u64().unwrap())
        .collect();
    assert_eq!(attempts, vec![1, 2, 3]);
    assert_eq!(failed[2].data()["dead_lettered"], true);
    // The next event of the same aggregate waited for the failing one, then ran.
    let ok = watch
        .wait_for_type("handler_succeeded", 1, DEADLINE)
        .await?;
    assert_eq!(ok[0].data()["output"]["n"], 7);
    assert!(ok[0].seq > failed[2].seq);
    Ok(())
}

/// A process handler that emits what the event asks for: `{"emit": {type, aggregate_type, aggregate_id}}`.
const EMITTER: &str = r#"
import json, sys
for line in sys.stdin:
    e = json.loads(line)
    print(json.dumps(e["data"]["emit"]), flush=True)
    print(json.dumps({"done": True, "output": "emitted"}), flush=True)
"#;

#[tokio::test]
async fn handlers_emit_only_what_their_emits_allows_and_never_forge_control_events()
-> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let script = env.write_script("emitter.py", EMITTER);
    let handler = |name: &str, on: &str, extra: &str| {
        env.write_handler(
            name,
            &format!(
                "name: {name}\non: [\"{on}\"]\nkind: process\ncommand: [\"python3\", \"{}\"]\nretry: {{ max_attempts: 1 }}\n{extra}",
                script.display()
            ),
        );
    };
    handler("plain", "events.agent.*.plain", "");
    handler(
        "operator",
        "events.agent.*.operator",
        "emits: [\"events.workflow.*.cancel_requested\"]\n",
    );
    let _listener = env.start_listener().await?;
    let _worker = env.start_worker().await?;
    let mut watch = env.watch().await?;
    let mut dlq = env.watch_dlq().await?;
    let cancel = json!({"emit": {"type": "cancel_requested", "aggregate_type": "workflow", "aggregate_id": "w1"}});
    // Without `emits`, a workflow control event is refused: the attempt fails, nothing is
    // appended, and the event is dead-lettered with the reason.
    env.publish_raw("events.agent.p1.plain", cancel.to_string())
        .await?;
    let dead = dlq.wait_until(DEADLINE, |seen| !seen.is_empty()).await?[0].clone();
    assert_eq!(dead.subject, "dlq.plain");
    let record: Value = serde_json::from_slice(&dead.payload)?;
    assert!(
        record["error"]
            .as_str()
            .unwrap()
            .contains("workflow control events are not open to handlers"),
        "{record}"
    );
    // `emits` opens exactly that subject for the operator handler...
    env.publish_raw("events.agent.o1.operator", cancel.to_string())
        .await?;
    watch.wait_for_type("cancel_requested", 1, DEADLINE).await?;
    // ...but an outcome type stays closed to everyone.
    let forge = json!({"emit": {"type": "handler_succeeded"}});
    env.publish_raw("events.agent.o2.operator", forge.to_string())
        .await?;
    let dead = dlq.wait_until(DEADLINE, |seen| seen.len() >= 2).await?[1].clone();
    let record: Value = serde_json::from_slice(&dead.payload)?;
    assert!(
        record["error"]
            .as_str()
            .unwrap()
            .contains("written by Grizzly only"),
        "{record}"
    );
    let cancels: Vec<_> = watch
        .seen
        .iter()
        .filter(|e| e.subject == "events.workflow.w1.cancel_requested")
        .collect();
    assert_eq!(cancels.len(), 1, "only the operator's cancel got in");
    assert_eq!(
        cancels[0].event.as_ref().unwrap().source,
        "grizzly/handler/operator"
    );
    Ok(())
}
