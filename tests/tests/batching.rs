//! Batching, debounce and rate limit against a real nats-server with the real listener and
//! worker in-process: batches close on size, time and bytes and never exceed their limits,
//! overflow goes to the next batch, a failing batch retries and then dead-letters every event,
//! debounce runs the last event of a burst per key, and a rate limit records what it drops.
//! Every event ends with exactly one outcome.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use grizzly_shared::nats::TASKS_STREAM;
use grizzly_tests::{LoggedEvent, TestEnv};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(90);

/// A persistent handler: a batch request is `{"batch_id", "events": [...]}`; it answers with the
/// `n` of each event and the byte size of each envelope as it received it. `fail` in an event's
/// data makes the whole request fail; `sleep` (seconds) makes it slow. Its first argument, if
/// any, is echoed as `ran_on`.
const BATCHER: &str = r#"
import json, sys, time
for line in sys.stdin:
    request = json.loads(line)
    events = request["events"] if "events" in request else [request]
    time.sleep(max(e["data"].get("sleep", 0) for e in events))
    if any(e["data"].get("fail") for e in events):
        print(json.dumps({"done": True, "error": "boom"}), flush=True)
        continue
    print(json.dumps({"done": True, "output": {
        "batch_id": request.get("batch_id"),
        "ran_on": sys.argv[1] if len(sys.argv) > 1 else None,
        "n": [e["data"]["n"] for e in events],
        "aggregates": [e["aggregateid"] for e in events],
        "bytes": [len(json.dumps(e, separators=(",", ":"), ensure_ascii=False)) for e in events],
    }}), flush=True)
"#;

fn handler(env: &TestEnv, name: &str, on: &str, extra: &str) -> std::path::PathBuf {
    let script = env.write_script(&format!("{name}.py"), BATCHER);
    env.write_handler(
        name,
        &format!(
            "name: {name}\non: [\"{on}\"]\nkind: process\nconcurrency: 1\ncommand: [\"python3\", \"{}\"]\n{extra}\n",
            script.display()
        ),
    )
}

/// Waits until `TASKS` holds `n` tasks, so a worker started next finds them all at once.
async fn tasks_waiting(env: &TestEnv, n: u64) -> anyhow::Result<()> {
    let until = tokio::time::Instant::now() + DEADLINE;
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    loop {
        poll.tick().await;
        let mut stream = env.nats.js.get_stream(TASKS_STREAM).await?;
        let have = stream.info().await?.state.messages;
        if have >= n {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < until,
            "only {have} of {n} tasks arrived"
        );
    }
}

fn succeeded(seen: &[LoggedEvent], handler: &str) -> Vec<Value> {
    of_type(seen, "handler_succeeded", handler)
}

fn of_type(seen: &[LoggedEvent], event_type: &str, handler: &str) -> Vec<Value> {
    seen.iter()
        .filter(|e| e.event_type() == event_type && e.data()["handler"] == handler)
        .map(|e| e.data())
        .collect()
}

/// The batches seen in the outcomes, in the order they finished: id → outcomes by index.
fn batches(outcomes: &[Value]) -> Vec<(String, Vec<Value>)> {
    let mut order: Vec<String> = Vec::new();
    let mut by_id: HashMap<String, Vec<Value>> = HashMap::new();
    for o in outcomes {
        let id = o["batch_id"].as_str().expect("batch_id").to_string();
        if !by_id.contains_key(&id) {
            order.push(id.clone());
        }
        by_id.entry(id).or_default().push(o.clone());
    }
    order
        .into_iter()
        .map(|id| {
            let mut members = by_id.remove(&id).unwrap();
            members.sort_by_key(|o| o["batch_index"].as_u64());
            (id, members)
        })
        .collect()
}

/// Each event handled has exactly one outcome of `handler` (succeeded or skipped).
fn one_outcome_each(seen: &[LoggedEvent], event_type: &str, handler: &str) -> usize {
    let sources: Vec<String> = seen
        .iter()
        .filter(|e| e.event_type() == event_type)
        .map(|e| e.event.as_ref().unwrap().id.clone())
        .collect();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for e in seen {
        if matches!(e.event_type(), "handler_succeeded" | "handler_skipped")
            && e.data()["handler"] == handler
        {
            *counts
                .entry(e.data()["event_id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    for id in &sources {
        assert_eq!(counts.get(id), Some(&1), "event {id}: {counts:?}");
    }
    assert_eq!(counts.len(), sources.len(), "outcomes for unknown events");
    sources.len()
}

#[tokio::test]
async fn batches_close_on_size_and_overflow_goes_to_the_next_batch() -> anyhow::Result<()> {
    let mut env = TestEnv::start().await?;
    // One partition: without a key every task of the handler may share a batch.
    env.settings.partitions = 1;
    handler(
        &env,
        "bulk",
        "events.item.*.added",
        "batch: { max_size: 10, max_wait: 2s }",
    );
    let _listener = env.start_listener().await?;
    let mut watch = env.watch().await?;
    // 25 events over 5 aggregates, interleaved.
    for n in 0..25 {
        env.publish_raw(
            &format!("events.item.i{}.added", n % 5),
            json!({"n": n}).to_string(),
        )
        .await?;
    }
    tasks_waiting(&env, 25).await?;
    let _worker = env.start_worker().await?;
    watch
        .wait_for_type("handler_succeeded", 25, DEADLINE)
        .await?;
    let outcomes = succeeded(&watch.seen, "bulk");
    let batches = batches(&outcomes);
    assert_eq!(sizes(&outcomes), vec![10, 10, 5], "{batches:#?}");
    for (id, members) in &batches {
        for (i, o) in members.iter().enumerate() {
            assert_eq!(o["batch_size"], json!(members.len()));
            assert_eq!(o["batch_index"], json!(i));
            assert_eq!(
                o["output"]["batch_id"],
                json!(id),
                "the handler saw the same batch"
            );
        }
        assert_eq!(
            members[0]["output"]["n"].as_array().unwrap().len(),
            members.len()
        );
    }
    assert_eq!(one_outcome_each(&watch.seen, "added", "bulk"), 25);
    // Per aggregate, the handler saw the events in log order across and within batches.
    let mut seen_by_aggregate: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (_, members) in &batches {
        let out = &members[0]["output"];
        for (n, aggregate) in out["n"]
            .as_array()
            .unwrap()
            .iter()
            .zip(out["aggregates"].as_array().unwrap())
        {
            seen_by_aggregate
                .entry(aggregate.as_str().unwrap().to_string())
                .or_default()
                .push(n.as_u64().unwrap());
        }
    }
    for (aggregate, ns) in &seen_by_aggregate {
        let mut sorted = ns.clone();
        sorted.sort();
        assert_eq!(ns, &sorted, "{aggregate} out of order");
        assert_eq!(ns.len(), 5);
    }
    Ok(())
}

#[tokio::test]
async fn a_batch_closes_when_its_window_ends() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    handler(
        &env,
        "window",
        "events.tick.t1.beat",
        "batch: { max_size: 10, max_wait: 300ms }",
    );
    // An `exec` handler reads the same batch object on stdin.
    env.write_handler(
        "window_exec",
        r#"name: window_exec
on: ["events.tick.t1.beat"]
kind: exec
command: ["python3", "-c", "import json, sys; r = json.load(sys.stdin); print(r['batch_id'], [e['data']['n'] for e in r['events']])"]
batch: { max_size: 10, max_wait: 300ms }
"#,
    );
    let _listener = env.start_listener().await?;
    let mut watch = env.watch().await?;
    for n in 0..3 {
        env.publish_raw("events.tick.t1.beat", json!({"n": n}).to_string())
            .await?;
    }
    tasks_waiting(&env, 6).await?;
    let _worker = env.start_worker().await?;
    watch
        .wait_for_type("handler_succeeded", 6, DEADLINE)
        .await?;
    let outcomes = succeeded(&watch.seen, "window");
    let batches = batches(&outcomes);
    assert_eq!(batches.len(), 1, "{batches:#?}");
    assert_eq!(batches[0].1[0]["output"]["n"], json!([0, 1, 2]));
    let exec = batches_of(&watch.seen, "window_exec");
    assert_eq!(exec.len(), 1, "{exec:#?}");
    let (id, members) = &exec[0];
    assert_eq!(members.len(), 3);
    assert_eq!(members[0]["output"], json!(format!("{id} [0, 1, 2]")));
    // A later event starts a new batch, which closes on time as well.
    env.publish_raw("events.tick.t1.beat", json!({"n": 3}).to_string())
        .await?;
    watch
        .wait_for_type("handler_succeeded", 8, DEADLINE)
        .await?;
    let outcomes = succeeded(&watch.seen, "window");
    assert_eq!(sizes(&outcomes), vec![3, 1]);
    assert_eq!(one_outcome_each(&watch.seen, "beat", "window"), 4);
    assert_eq!(one_outcome_each(&watch.seen, "beat", "window_exec"), 4);
    Ok(())
}

fn batches_of(seen: &[LoggedEvent], handler: &str) -> Vec<(String, Vec<Value>)> {
    batches(&succeeded(seen, handler))
}

fn sizes(outcomes: &[Value]) -> Vec<usize> {
    batches(outcomes).iter().map(|(_, m)| m.len()).collect()
}

#[tokio::test]
async fn a_batch_never_exceeds_its_bytes() -> anyhow::Result<()> {
    let mut env = TestEnv::start().await?;
    env.settings.partitions = 1;
    const MAX_BYTES: u64 = 2000;
    handler(
        &env,
        "sized",
        "events.doc.*.saved",
        &format!("batch: {{ max_size: 100, max_wait: 2s, max_bytes: {MAX_BYTES} }}"),
    );
    let _listener = env.start_listener().await?;
    let mut watch = env.watch().await?;
    // Envelopes of ~600 bytes: three fit in 2000 bytes, four do not.
    for n in 0..12 {
        env.publish_raw(
            &format!("events.doc.d{n}.saved"),
            json!({"n": n, "text": "x".repeat(300)}).to_string(),
        )
        .await?;
    }
    tasks_waiting(&env, 12).await?;
    let _worker = env.start_worker().await?;
    watch
        .wait_for_type("handler_succeeded", 12, DEADLINE)
        .await?;
    let outcomes = succeeded(&watch.seen, "sized");
    let batches = batches(&outcomes);
    for (_, members) in &batches {
        let bytes: Vec<u64> = members[0]["output"]["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap())
            .collect();
        let total: u64 = bytes.iter().sum();
        assert!(total <= MAX_BYTES, "a batch of {total} bytes: {bytes:?}");
        assert!(
            bytes.iter().all(|b| *b > 500 && *b < 700),
            "envelope sizes as planned: {bytes:?}"
        );
    }
    // Overflow started the next batch: 12 events in batches of three.
    assert_eq!(sizes(&outcomes), vec![3, 3, 3, 3]);
    assert_eq!(one_outcome_each(&watch.seen, "saved", "sized"), 12);
    Ok(())
}

#[tokio::test]
async fn a_failing_batch_retries_as_a_batch_then_dead_letters_every_event() -> anyhow::Result<()> {
    let mut env = TestEnv::start().await?;
    env.settings.partitions = 1;
    handler(
        &env,
        "fragile",
        "events.job.*.queued",
        "batch: { max_size: 4, max_wait: 2s }\nretry: { max_attempts: 2, initial_backoff: 50ms, max_backoff: 100ms }\nbreaker: { failure_threshold: 100 }",
    );
    let _listener = env.start_listener().await?;
    let mut watch = env.watch().await?;
    let mut dlq = env.watch_dlq().await?;
    for n in 0..4 {
        env.publish_raw(
            &format!("events.job.j{n}.queued"),
            json!({"n": n, "fail": n == 2}).to_string(),
        )
        .await?;
    }
    tasks_waiting(&env, 4).await?;
    let _worker = env.start_worker().await?;
    let dead = dlq
        .wait_until(DEADLINE, |seen| seen.len() >= 4)
        .await?
        .to_vec();
    watch.wait_for_type("handler_failed", 8, DEADLINE).await?;
    let failed = of_type(&watch.seen, "handler_failed", "fragile");
    assert_eq!(failed.len(), 8, "one failure per event per attempt");
    let batch_ids: std::collections::HashSet<&Value> =
        failed.iter().map(|f| &f["batch_id"]).collect();
    assert_eq!(batch_ids.len(), 1, "the batch retried as one: {failed:#?}");
    for f in &failed {
        assert_eq!(f["batch_size"], json!(4));
        assert_eq!(f["will_retry"], json!(f["attempt"] == json!(1)));
    }
    let queued: Vec<String> = watch
        .of_type("queued")
        .iter()
        .map(|e| e.event.as_ref().unwrap().id.clone())
        .collect();
    let mut dead_ids: Vec<String> = dead
        .iter()
        .map(|d| {
            let letter: Value = serde_json::from_slice(&d.payload).unwrap();
            assert_eq!(letter["handler"], json!("fragile"));
            assert_eq!(letter["attempts"], json!(2));
            letter["event"]["id"].as_str().unwrap().to_string()
        })
        .collect();
    dead_ids.sort();
    let mut expected = queued.clone();
    expected.sort();
    assert_eq!(dead_ids, expected, "every event of the batch dead-lettered");
    assert!(succeeded(&watch.seen, "fragile").is_empty());
    Ok(())
}

#[tokio::test]
async fn debounce_runs_the_last_event_of_each_key_and_records_the_rest() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    handler(
        &env,
        "settle",
        "events.doc.*.edited",
        "debounce: { period: 2s, key: \"{{ data.doc }}\" }",
    );
    let _listener = env.start_listener().await?;
    let _worker = env.start_worker().await?;
    let mut watch = env.watch().await?;
    // A burst of 5 on doc a (over several aggregates), 2 on doc b.
    for (n, doc) in ["a", "a", "b", "a", "a", "b", "a"].iter().enumerate() {
        env.publish_raw(
            &format!("events.doc.e{n}.edited"),
            json!({"n": n, "doc": doc}).to_string(),
        )
        .await?;
    }
    watch
        .wait_until(DEADLINE, |seen| {
            seen.iter()
                .filter(|e| matches!(e.event_type(), "handler_succeeded" | "handler_skipped"))
                .count()
                >= 7
        })
        .await?;
    let edited = watch.of_type("edited");
    let id_of = |n: usize| edited[n].event.as_ref().unwrap().id.clone();
    let mut runs: Vec<u64> = succeeded(&watch.seen, "settle")
        .iter()
        .map(|o| o["output"]["n"][0].as_u64().unwrap())
        .collect();
    runs.sort();
    assert_eq!(runs, vec![5, 6], "the last event of each key ran");
    let skipped = of_type(&watch.seen, "handler_skipped", "settle");
    assert_eq!(skipped.len(), 5);
    for s in &skipped {
        assert_eq!(s["reason"], json!("debounced"));
        let n = edited
            .iter()
            .position(|e| e.event.as_ref().unwrap().id == s["event_id"].as_str().unwrap())
            .unwrap();
        let last = if edited[n].data()["doc"] == "a" { 6 } else { 5 };
        assert_eq!(s["superseded_by"], json!(id_of(last)), "{s}");
    }
    assert_eq!(one_outcome_each(&watch.seen, "edited", "settle"), 7);
    Ok(())
}

#[tokio::test]
async fn a_rate_limit_runs_at_most_its_limit_per_period_and_records_the_rest() -> anyhow::Result<()>
{
    let env = TestEnv::start().await?;
    handler(
        &env,
        "guarded",
        "events.feed.*.item",
        "rate_limit: { limit: 2, period: 1s, key: \"{{ data.source }}\" }",
    );
    // Two replicas decide for the flood's partitions side by side, one window per source.
    let _listeners = [env.start_listener().await?, env.start_listener().await?];
    env.listeners_spread(2, DEADLINE).await?;
    let _worker = env.start_worker().await?;
    let mut watch = env.watch().await?;
    // A flood of 30 from source `noisy` over ~1.5 s, and 2 from `quiet` in the middle.
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    for burst in 0..3 {
        tick.tick().await;
        for i in 0..10 {
            let n = burst * 10 + i;
            env.publish_raw(
                &format!("events.feed.f{n}.item"),
                json!({"n": n, "source": "noisy"}).to_string(),
            )
            .await?;
        }
        if burst == 1 {
            for n in 100..102 {
                env.publish_raw(
                    &format!("events.feed.q{n}.item"),
                    json!({"n": n, "source": "quiet"}).to_string(),
                )
                .await?;
            }
        }
    }
    watch
        .wait_until(DEADLINE, |seen| {
            seen.iter()
                .filter(|e| matches!(e.event_type(), "handler_succeeded" | "handler_skipped"))
                .count()
                >= 32
        })
        .await?;
    assert_eq!(one_outcome_each(&watch.seen, "item", "guarded"), 32);
    let items = watch.of_type("item");
    let time_of = |id: &str| {
        let e = items
            .iter()
            .find(|e| e.event.as_ref().unwrap().id == id)
            .unwrap();
        let t = time::OffsetDateTime::parse(
            &e.event.as_ref().unwrap().time,
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        (t.unix_timestamp_nanos() / 1_000_000) as i64
    };
    let ran = succeeded(&watch.seen, "guarded");
    let mut noisy: Vec<i64> = ran
        .iter()
        .filter(|o| o["output"]["n"][0].as_u64().unwrap() < 100)
        .map(|o| time_of(o["event_id"].as_str().unwrap()))
        .collect();
    noisy.sort();
    assert!(
        (2..=6).contains(&noisy.len()),
        "30 events over ~1.5 s at 2/s: {} ran",
        noisy.len()
    );
    for (i, t) in noisy.iter().enumerate() {
        let within = noisy[i..].iter().take_while(|u| *u - t < 1000).count();
        assert!(within <= 2, "{within} runs within 1 s from {t}: {noisy:?}");
    }
    let quiet = ran
        .iter()
        .filter(|o| o["output"]["n"][0].as_u64().unwrap() >= 100)
        .count();
    assert_eq!(quiet, 2, "another source has its own limit");
    let skipped = of_type(&watch.seen, "handler_skipped", "guarded");
    assert_eq!(skipped.len(), 30 - noisy.len());
    for s in &skipped {
        assert_eq!(s["reason"], json!("rate_limited"));
        assert_eq!(s["rate_limit_key"], json!("noisy"));
    }
    Ok(())
}

#[tokio::test]
async fn a_batch_window_not_shorter_than_ack_wait_is_refused_with_its_location()
-> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    // The test kit's ack_wait is 5 s.
    let path = handler(
        &env,
        "late",
        "events.x.*.y",
        "batch:\n  max_size: 5\n  max_wait: 5s\n",
    );
    let err = match env.start_worker().await {
        Ok(_) => anyhow::bail!("a worker started with batch.max_wait = ack_wait"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&format!(
            "{}:8:3: batch.max_wait: 5s must be shorter than the worker's ack_wait (5s)",
            path.display()
        )),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn a_worker_killed_mid_batch_loses_nothing_and_keeps_aggregate_order() -> anyhow::Result<()> {
    let mut env = TestEnv::start().await?;
    env.settings.partitions = 2;
    handler(
        &env,
        "bulk",
        "events.item.*.added",
        "batch: { max_size: 8, max_wait: 200ms }",
    );
    let _listener = env.start_listener().await?;
    let mut worker = grizzly_tests::ChildProcess::start("grizzly-worker", &env.settings, &[])?;
    let mut watch = env.watch().await?;
    for n in 0..200 {
        env.nats
            .js
            .publish(
                format!("events.item.i{}.added", n % 10),
                json!({"n": n, "sleep": 0.1}).to_string().into(),
            )
            .await?;
    }
    env.nats.js.wait_for_acks().await;
    watch
        .wait_for_type("handler_succeeded", 20, DEADLINE)
        .await?;
    worker.kill();
    let before = watch.of_type("handler_succeeded").len();
    let _replacement = grizzly_tests::ChildProcess::start("grizzly-worker", &env.settings, &[])?;
    watch
        .wait_until(Duration::from_secs(120), |seen| {
            let ids: std::collections::HashSet<_> = seen
                .iter()
                .filter(|e| e.event_type() == "handler_succeeded")
                .map(|e| {
                    e.data()["event_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                })
                .collect();
            ids.len() >= 200
        })
        .await?;
    assert!(before < 200, "the kill happened mid-run ({before} done)");
    // Outcome ids derive from the event: a batch re-run after the crash is not recorded twice.
    assert_eq!(one_outcome_each(&watch.seen, "added", "bulk"), 200);
    let outcomes = succeeded(&watch.seen, "bulk");
    for (_, members) in batches(&outcomes) {
        assert!(members.len() <= 8, "a batch over max_size");
    }
    // Per aggregate, outcomes are in log order.
    let mut last: HashMap<String, u64> = HashMap::new();
    for o in &outcomes {
        let i = o["batch_index"].as_u64().unwrap() as usize;
        let n = o["output"]["n"][i].as_u64().unwrap();
        let aggregate = o["output"]["aggregates"][i].as_str().unwrap().to_string();
        if let Some(prev) = last.insert(aggregate.clone(), n) {
            assert!(prev < n, "{aggregate}: {n} after {prev}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_batch_runs_on_the_version_its_tasks_were_routed_to() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let script = env.write_script("versioned.py", BATCHER);
    let yaml = |version: u32| {
        format!(
            "name: versioned\nversion: {version}\non: [\"events.vb.*.go\"]\nkind: process\nconcurrency: 1\ncommand: [\"python3\", \"{}\", \"v{version}\"]\nbatch: {{ max_size: 10, max_wait: 1s }}\n",
            script.display()
        )
    };
    env.write_handler("versioned", &yaml(1));
    let _listener = env.start_listener().await?;
    let mut watch = env.watch().await?;
    let publish = |n: u64| env.publish_raw("events.vb.one.go", json!({"n": n}).to_string());
    // One aggregate, so every task is in one lane of one partition: without a worker they wait
    // in TASKS, routed first to v1, then — once v2 is registered — to v2.
    for n in 0..3 {
        publish(n).await?;
    }
    tasks_waiting(&env, 3).await?;
    let v2 = env.path().join("versioned-v2.yaml");
    std::fs::write(&v2, yaml(2))?;
    let out = env
        .grizzly()
        .args(["handler", "register", v2.to_str().unwrap()])
        .output()
        .await?;
    assert!(out.status.success(), "{out:?}");
    let mut tasks = env.nats.js.get_stream(TASKS_STREAM).await?;
    let mut n = 3;
    loop {
        publish(n).await?;
        n += 1;
        tasks_waiting(&env, n).await?;
        let last = tasks.info().await?.state.last_sequence;
        let task: Value = serde_json::from_slice(&tasks.get_raw_message(last).await?.payload)?;
        if task["handler_version"] == 2 {
            break;
        }
        anyhow::ensure!(n < 20, "the listener never routed to v2");
    }
    publish(n).await?;
    let total = n + 1;
    tasks_waiting(&env, total).await?;

    // The worker finds both versions' tasks at once.
    let _worker = env.start_worker().await?;
    watch
        .wait_until(DEADLINE, |s| {
            succeeded(s, "versioned").len() == total as usize
        })
        .await?;
    let done = succeeded(&watch.seen, "versioned");
    for (_, members) in batches(&done) {
        let version = &members[0]["handler_version"];
        for o in &members {
            assert_eq!(
                &o["handler_version"], version,
                "one version per batch: {members:?}"
            );
            assert_eq!(o["output"]["ran_on"], json!(format!("v{version}")), "{o}");
        }
    }
    let v1 = done.iter().filter(|o| o["handler_version"] == 1).count();
    assert!(v1 >= 3 && v1 < total as usize, "{done:?}");
    // In log order: the lane's v1 events ran before its v2 events.
    let ns: Vec<u64> = batches(&done)
        .iter()
        .flat_map(|(_, m)| {
            m.iter().map(|o| {
                o["output"]["n"][o["batch_index"].as_u64().unwrap() as usize]
                    .as_u64()
                    .unwrap()
            })
        })
        .collect();
    assert!(ns.windows(2).all(|w| w[0] < w[1]), "{ns:?}");
    Ok(())
}
