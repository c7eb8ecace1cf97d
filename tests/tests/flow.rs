//! Listener and scheduling features against a real nats-server: priority under a backlog,
//! content de-duplication across restarts, throttling, and listener fail-over (order kept).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::HeaderMap;
use futures::StreamExt as _;
use grizzly_shared::nats::TASKS_STREAM;
use grizzly_tests::{LoggedEvent, TestEnv};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(90);

/// A persistent handler that reports when it started each event (seconds since the epoch).
const TIMED: &str = r#"
import json, sys, time
for line in sys.stdin:
    event = json.loads(line)
    started = time.time()
    time.sleep(event["data"].get("sleep", 0))
    print(json.dumps({"done": True, "output": {"started": started, "n": event["data"].get("n"), "priority": event.get("priority")}}), flush=True)
"#;

fn handler(env: &TestEnv, name: &str, on: &str, extra: &str) {
    let script = env.write_script(&format!("{name}.py"), TIMED);
    env.write_handler(
        name,
        &format!("name: {name}\non: [\"{on}\"]\nkind: process\ncommand: [\"python3\", \"{}\"]\n{extra}\n", script.display()),
    );
}

fn outcomes(seen: &[LoggedEvent], handler: &str) -> Vec<serde_json::Value> {
    seen.iter()
        .filter(|e| e.event_type() == "handler_succeeded" && e.data()["handler"] == handler)
        .map(|e| e.data())
        .collect()
}

#[tokio::test]
async fn critical_events_overtake_a_backlog_of_low_ones() -> anyhow::Result<()> {
    let mut env = TestEnv::start().await?;
    // Several partitions: each runner orders the tasks it holds, and the runners' claims on the
    // handler's single slot are served by priority too (the worker's priority gate).
    env.settings.partitions = 4;
    handler(&env, "slow", "events.job.*.run", "concurrency: 1");
    let _listener = env.start_listener().await?;
    let _worker = env.start_worker().await?;
    let mut watch = env.watch().await?;
    // Sends an event; the returned future confirms it.
    let publish = |n: usize, priority: &'static str, sleep: f64| {
        let js = env.nats.js.clone();
        async move {
            let mut headers = HeaderMap::new();
            headers.insert("Grizzly-Priority", priority);
            js.publish_with_headers(
                format!("events.job.j{n}.run"),
                headers,
                json!({"n": n, "sleep": sleep}).to_string().into(),
            )
            .await
        }
    };
    for n in 0..500 {
        publish(n, "low", 0.002).await?.await?;
    }
    // The backlog is being worked through when the critical events arrive.
    watch
        .wait_for_type("handler_succeeded", 10, DEADLINE)
        .await?;
    // All ten are sent before any confirmation is awaited, and each runs long enough for the
    // rest to reach the worker meanwhile: a low one running between them would then be the
    // scheduler's choice, not a critical event still on its way (as on a loaded machine).
    let mut confirms = Vec::new();
    for n in 500..510 {
        confirms.push(publish(n, "critical", 0.05).await?);
    }
    for confirm in confirms {
        confirm.await?;
    }
    watch
        .wait_for_type("handler_succeeded", 510, Duration::from_secs(180))
        .await?;
    let done = outcomes(&watch.seen, "slow");
    let last_critical = done
        .iter()
        .rposition(|o| o["output"]["n"].as_u64().unwrap() >= 500)
        .unwrap();
    let low_before = done[..last_critical]
        .iter()
        .filter(|o| o["output"]["n"].as_u64().unwrap() < 500)
        .count();
    let first_critical = done
        .iter()
        .position(|o| o["output"]["n"].as_u64().unwrap() >= 500)
        .unwrap();
    // Once the critical events reach the worker they run before every low one still waiting
    // (how many lows finish while they travel depends on the machine's load, not on priority).
    let between: Vec<(u64, f64)> = done[first_critical..=last_critical]
        .iter()
        .map(|o| {
            (
                o["output"]["n"].as_u64().unwrap(),
                o["output"]["started"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        last_critical - first_critical,
        9,
        "a low event ran between critical ones: {between:?}"
    );
    assert!(
        low_before < 250,
        "critical events waited behind {low_before} low ones"
    );
    assert_eq!(done.len(), 510, "nothing lost");
    Ok(())
}

#[tokio::test]
async fn duplicate_content_is_handled_once_within_the_window_even_across_restarts()
-> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    handler(
        &env,
        "once",
        "events.order.*.placed",
        "dedup: { window: 4s }",
    );
    let listener = env.start_listener().await?;
    let _worker = env.start_worker().await?;
    let mut watch = env.watch().await?;
    let body = json!({"n": 1, "item": "book"}).to_string();
    let first_at = tokio::time::Instant::now();
    for _ in 0..3 {
        env.publish_raw("events.order.o1.placed", body.clone())
            .await?;
    }
    env.publish_raw(
        "events.order.o1.placed",
        json!({"n": 2, "item": "pen"}).to_string(),
    )
    .await?;
    watch
        .wait_for_type("duplicate_skipped", 2, DEADLINE)
        .await?;
    watch
        .wait_for_type("handler_succeeded", 2, DEADLINE)
        .await?;
    let skipped = watch.of_type("duplicate_skipped");
    let placed: Vec<String> = watch
        .of_type("placed")
        .iter()
        .map(|e| e.event.as_ref().unwrap().id.clone())
        .collect();
    assert!(
        skipped
            .iter()
            .all(|s| s.data()["first_event_id"] == json!(placed[0]))
    );

    // A new listener remembers: the same content is still a duplicate.
    listener.shutdown().await?;
    let _listener = env.start_listener().await?;
    env.publish_raw("events.order.o1.placed", body.clone())
        .await?;
    watch
        .wait_for_type("duplicate_skipped", 3, DEADLINE)
        .await?;

    // After the window the same content is handled again.
    tokio::time::sleep_until(first_at + Duration::from_secs(5)).await;
    env.publish_raw("events.order.o1.placed", body.clone())
        .await?;
    watch
        .wait_for_type("handler_succeeded", 3, DEADLINE)
        .await?;
    let ns: Vec<u64> = outcomes(&watch.seen, "once")
        .iter()
        .map(|o| o["output"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, vec![1, 2, 1]);
    assert_eq!(watch.of_type("duplicate_skipped").len(), 3);
    Ok(())
}

#[tokio::test]
async fn a_throttled_handler_never_exceeds_its_rate_and_loses_nothing() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    handler(
        &env,
        "limited",
        "events.api.*.call",
        "concurrency: 4\nthrottle: { limit: 5, period: 1s }",
    );
    // Two replicas route the flood's partitions side by side and share the schedule.
    let _listeners = [env.start_listener().await?, env.start_listener().await?];
    env.listeners_spread(2, DEADLINE).await?;
    let _worker = env.start_worker().await?;
    let mut watch = env.watch().await?;
    // A 10 s flood: 5 events every 250 ms (20/s), four times the limit.
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    for burst in 0..40 {
        tick.tick().await;
        for i in 0..5 {
            env.publish_raw(
                &format!("events.api.c{}.call", burst * 5 + i),
                json!({"n": burst * 5 + i}).to_string(),
            )
            .await?;
        }
    }
    watch
        .wait_for_type("handler_succeeded", 200, Duration::from_secs(120))
        .await?;
    // Start times as the worker recorded them (ms).
    let mut starts: Vec<u64> = outcomes(&watch.seen, "limited")
        .iter()
        .map(|o| o["started_at_ms"].as_u64().unwrap())
        .collect();
    starts.sort();
    for (i, t) in starts.iter().enumerate() {
        let in_window = starts[i..].iter().take_while(|u| *u - t < 1000).count();
        assert!(in_window <= 5, "{in_window} starts within 1 s from {t}");
    }
    let span_s = (starts[199] - starts[0]) as f64 / 1000.0;
    assert!(
        span_s >= 39.0 * 200.0 / 1000.0 * 0.95 * 5.0 / 5.0,
        "200 starts at 5/s span ~40 s, got {span_s}"
    );
    let ns: HashSet<u64> = outcomes(&watch.seen, "limited")
        .iter()
        .map(|o| o["output"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns.len(), 200, "every event handled once");
    // The outcomes say where the events waited: each task was scheduled (stored in `TASKS`)
    // right after its event, and the throttle held it in the worker until its start.
    let rfc3339 = |t: &str| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|e| panic!("{t:?} is not RFC 3339: {e}"))
    };
    let stored: HashMap<&str, time::OffsetDateTime> = watch
        .seen
        .iter()
        .filter_map(|e| e.event.as_ref())
        .map(|e| (e.id.as_str(), rfc3339(&e.time)))
        .collect();
    let mut longest_routing = Duration::ZERO;
    let mut longest_wait_ms = 0;
    for o in outcomes(&watch.seen, "limited") {
        let scheduled = rfc3339(o["scheduled_at"].as_str().expect("scheduled_at"));
        let event = stored[o["event_id"].as_str().unwrap()];
        assert!(
            event <= scheduled,
            "{o}: scheduled before its event was stored"
        );
        longest_routing = longest_routing.max((scheduled - event).try_into()?);
        let scheduled_ms = (scheduled.unix_timestamp_nanos() / 1_000_000) as u64;
        let started_ms = o["started_at_ms"].as_u64().unwrap();
        // Broker and worker clocks are the same host's: 1 ms covers rounding.
        assert!(
            scheduled_ms <= started_ms + 1,
            "{o}: started before it was scheduled"
        );
        longest_wait_ms = longest_wait_ms.max(started_ms.saturating_sub(scheduled_ms));
    }
    assert!(
        longest_routing < Duration::from_secs(5),
        "routing took {longest_routing:?}"
    );
    assert!(
        longest_wait_ms > 20_000,
        "the last events waited for the throttle in the worker, not in routing: {longest_wait_ms} ms"
    );
    Ok(())
}

#[tokio::test]
async fn listener_replicas_share_partitions_and_a_killed_ones_move_without_loss_or_reordering()
-> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    handler(&env, "ordered", "events.acct.*.op", "concurrency: 4");
    let publish = |ns: std::ops::Range<u64>| {
        let js = env.nats.js.clone();
        async move {
            for n in ns {
                js.publish(
                    format!("events.acct.a{}.op", n % 20),
                    json!({"n": n}).to_string().into(),
                )
                .await?;
            }
            js.wait_for_acks().await;
            anyhow::Ok(())
        }
    };
    let replica = |id: &str| {
        let mut s = env.settings.clone();
        s.listener.id = Some(id.to_string());
        env.start_listener_with(s)
    };
    // Two replicas split the 4 partitions 2 + 2; a third joins (a scale-up) and gets its share.
    let mut replicas = HashMap::new();
    for id in ["l1", "l2"] {
        replicas.insert(id, replica(id).await?);
    }
    env.listeners_spread(2, DEADLINE).await?;
    replicas.insert("l3", replica("l3").await?);
    let _worker = env.start_worker().await?;
    let mut watch = env.watch().await?;
    let mut dlq = env.watch_dlq().await?;
    let partitions = env.settings.partitions;

    // Every partition is routed, and by all three replicas.
    let owners = env.listeners_spread(3, DEADLINE).await?;
    assert_eq!(owners.len(), usize::from(partitions));
    publish(0..100).await?;
    watch
        .wait_for_type("handler_succeeded", 100, DEADLINE)
        .await?;

    // The victim holds events it cannot write when it dies: TASKS refuses every write.
    let victim = owners[&0].clone();
    let victim_partitions: Vec<u16> = owners
        .iter()
        .filter(|(_, o)| **o == victim)
        .map(|(p, _)| *p)
        .collect();
    let leases = env
        .nats
        .js
        .get_key_value(grizzly_shared::nats::LEASES_BUCKET)
        .await?;
    let mut tasks = env.nats.js.get_stream(TASKS_STREAM).await?;
    let mut config = tasks.info().await?.config.clone();
    let room = config.max_bytes;
    config.max_bytes = 1;
    env.nats.js.update_stream(&config).await?;
    publish(100..200).await?;
    // Two heartbeats of the victim's after the publish: it has had a lease round to read them
    // (its cursor cannot pass them: nothing is confirmed).
    let mut revisions = leases.watch(format!("listener.{victim}")).await?;
    for _ in 0..2 {
        tokio::time::timeout(DEADLINE, revisions.next())
            .await?
            .context("cursor watch ended")??;
    }
    replicas.remove(victim.as_str()).expect("victim").abort();
    let killed = tokio::time::Instant::now();
    config.max_bytes = room;
    env.nats.js.update_stream(&config).await?;
    // Newer events of the same accounts, and one that is not JSON.
    publish(200..250).await?;
    env.publish_raw("events.acct.a3.op", "not json").await?;
    publish(250..300).await?;

    // The victim's partitions move to the survivors.
    loop {
        let owners = env.route_owners().await?;
        if victim_partitions
            .iter()
            .all(|p| owners.get(p).is_some_and(|o| *o != victim))
        {
            println!(
                "partitions {victim_partitions:?} of {victim} taken over {:.1}s after the kill",
                killed.elapsed().as_secs_f64()
            );
            break;
        }
        anyhow::ensure!(
            killed.elapsed() < DEADLINE,
            "nobody took over {victim_partitions:?}: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watch
        .wait_for_type("handler_succeeded", 300, DEADLINE)
        .await?;
    let dead = dlq.wait_until(DEADLINE, |s| !s.is_empty()).await?;
    let record: serde_json::Value = serde_json::from_slice(&dead[0].payload)?;
    assert_eq!(record["kind"], "not_json", "{record}");
    let done = outcomes(&watch.seen, "ordered");
    let mut per_event: HashMap<String, usize> = HashMap::new();
    let mut per_account: HashMap<u64, Vec<u64>> = HashMap::new();
    for o in &done {
        *per_event
            .entry(o["event_id"].as_str().unwrap().to_string())
            .or_default() += 1;
        let n = o["output"]["n"].as_u64().unwrap();
        per_account.entry(n % 20).or_default().push(n);
    }
    assert_eq!(per_event.len(), 300, "none lost");
    assert!(per_event.values().all(|c| *c == 1), "none handled twice");
    for (acct, ns) in per_account {
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "account {acct} out of order: {ns:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn capability_requests_go_only_to_qualified_healthy_handlers_and_spread() -> anyhow::Result<()>
{
    let env = TestEnv::start().await?;
    for (name, capability) in [
        ("alpha", "summarize"),
        ("beta", "summarize"),
        ("gamma", "translate"),
    ] {
        handler(
            &env,
            name,
            "events.never.*.x",
            &format!("capabilities: [{capability}]"),
        );
    }
    // Worker 1 serves alpha and gamma; nobody serves beta yet.
    let only = |names: &[&str]| -> anyhow::Result<grizzly_shared::Settings> {
        let dir = env.path().join(format!("w-{}", names.join("-")));
        std::fs::create_dir_all(&dir)?;
        for n in names {
            std::fs::copy(
                env.settings.handlers_dir.join(format!("{n}.yaml")),
                dir.join(format!("{n}.yaml")),
            )?;
        }
        let mut s = env.settings.clone();
        s.handlers_dir = dir;
        Ok(s)
    };
    let _w1 = env.start_worker_with(only(&["alpha", "gamma"])?).await?;
    // The listener starts once worker 1's heartbeat is in the bucket.
    let leases =
        grizzly_shared::nats::ensure_lease_bucket(&env.nats.js, env.settings.worker.lease_ttl, 1)
            .await?;
    let until = tokio::time::Instant::now() + DEADLINE;
    while grizzly_listener::health::HandlerHealth::read(&leases)
        .await
        .map(|h| !h.is_healthy("alpha"))
        .unwrap_or(true)
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < until,
            "worker 1 never sent a heartbeat"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listener = env.start_listener().await?;
    let mut watch = env.watch().await?;
    let mut dlq = env.watch_dlq().await?;
    let ask = |capability: &'static str, n: usize| {
        let js = env.nats.js.clone();
        async move {
            let mut headers = HeaderMap::new();
            headers.insert("Grizzly-Capability", capability);
            js.publish_with_headers(
                format!("events.req.r{n}.asked"),
                headers,
                json!({"n": n}).to_string().into(),
            )
            .await?
            .await?;
            anyhow::Ok(())
        }
    };
    for n in 0..10 {
        ask("summarize", n).await?;
    }
    ask("translate", 10).await?;
    ask("fly", 11).await?;
    watch
        .wait_for_type("handler_succeeded", 11, DEADLINE)
        .await?;
    let by_handler = |seen: &[LoggedEvent]| {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for o in seen
            .iter()
            .filter(|e| e.event_type() == "handler_succeeded")
        {
            *counts
                .entry(o.data()["handler"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        counts
    };
    let counts = by_handler(&watch.seen);
    assert_eq!(counts.get("alpha"), Some(&10), "{counts:?}");
    assert_eq!(counts.get("gamma"), Some(&1), "{counts:?}");
    assert_eq!(
        counts.get("beta"),
        None,
        "beta has no live worker: {counts:?}"
    );
    let dead = dlq.wait_until(DEADLINE, |s| !s.is_empty()).await?[0].clone();
    let record: serde_json::Value = serde_json::from_slice(&dead.payload)?;
    assert_eq!(record["kind"], "unknown_capability");

    // Once beta has a worker, summarize requests spread over alpha and beta.
    let _w2 = env.start_worker_with(only(&["beta"])?).await?;
    // Ask one at a time until the listener has seen beta's heartbeat and routes one to it.
    let until = tokio::time::Instant::now() + DEADLINE;
    let mut n = 100;
    while !by_handler(&watch.seen).contains_key("beta") {
        anyhow::ensure!(
            tokio::time::Instant::now() < until,
            "beta never got a request"
        );
        let done = by_handler(&watch.seen).values().sum::<usize>();
        ask("summarize", n).await?;
        n += 1;
        watch
            .wait_until(DEADLINE, |seen| {
                by_handler(seen).values().sum::<usize>() > done
            })
            .await?;
    }
    let before = by_handler(&watch.seen);
    let spread_from = env
        .nats
        .js
        .get_stream(grizzly_shared::nats::EVENTS_STREAM)
        .await?
        .info()
        .await?
        .state
        .last_sequence
        + 1;
    for n in 1000..1020 {
        ask("summarize", n).await?;
    }
    let total_before: usize = before.values().sum();
    watch
        .wait_until(DEADLINE, |seen| {
            by_handler(seen).values().sum::<usize>() >= total_before + 20
        })
        .await?;
    let after = by_handler(&watch.seen);
    let alpha = after["alpha"] - before["alpha"];
    let beta = after["beta"] - before.get("beta").copied().unwrap_or(0);
    assert!(
        alpha >= 5 && beta >= 5,
        "load not spread: alpha {alpha}, beta {beta}"
    );

    // A successor routing those requests again (the old router's cursors lost) picks the same
    // handler for each: the broker drops every task as a copy, none runs twice.
    let mut tasks = env.nats.js.get_stream(TASKS_STREAM).await?;
    let written = tasks.info().await?.state.last_sequence;
    let _successor = route_again_from(&env, listener, spread_from).await?;
    assert_eq!(
        tasks.info().await?.state.last_sequence,
        written,
        "the successor wrote tasks again"
    );
    Ok(())
}

/// Stops `listener`, turns every partition's cursor back to `from`, and starts a successor that
/// routes from there: it returns once the successor has routed to the end of the log.
async fn route_again_from(
    env: &TestEnv,
    listener: grizzly_tests::Component,
    from: u64,
) -> anyhow::Result<grizzly_tests::Component> {
    let js = &env.nats.js;
    listener.shutdown().await?;
    let cursors = js
        .get_key_value(grizzly_shared::nats::CURSORS_BUCKET)
        .await?;
    for p in 0..env.settings.partitions {
        cursors
            .put(format!("cursor.{p}"), from.to_string().into())
            .await?;
    }
    let mut settings = env.settings.clone();
    settings.listener.id = Some("successor".into());
    let successor = env.start_listener_with(settings).await?;
    let end = js
        .get_stream(grizzly_shared::nats::EVENTS_STREAM)
        .await?
        .info()
        .await?
        .state
        .last_sequence;
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let cursors = grizzly_shared::nats::listener_cursors(js)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if cursors.len() == usize::from(env.settings.partitions)
            && cursors.values().all(|c| *c > end)
        {
            return Ok(successor);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < until,
            "the successor never routed to the end: {cursors:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes `count` events over 20 accounts while `TASKS` refuses every write, waits until the
/// listener has read them all, then lets `TASKS` take writes again: each partition's first round
/// waited meanwhile, and everything after it piled up behind it — a backlog, in bundles.
async fn publish_behind_full_tasks(
    env: &TestEnv,
    count: u64,
    data: impl Fn(u64) -> serde_json::Value,
) -> anyhow::Result<()> {
    let js = &env.nats.js;
    let mut tasks = js.get_stream(TASKS_STREAM).await?;
    let mut config = tasks.info().await?.config.clone();
    let room = config.max_bytes;
    config.max_bytes = 1;
    js.update_stream(&config).await?;
    for n in 0..count {
        js.publish(
            format!("events.acct.a{}.op", n % 20),
            data(n).to_string().into(),
        )
        .await?;
    }
    js.wait_for_acks().await;
    let events = js.get_stream(grizzly_shared::nats::EVENTS_STREAM).await?;
    let read_all = tokio::time::Instant::now();
    loop {
        let mut consumers = events.consumers();
        let mut behind = 0;
        while let Some(info) = consumers.next().await {
            behind += info?.num_pending;
        }
        if behind == 0 {
            break;
        }
        anyhow::ensure!(
            read_all.elapsed() < DEADLINE,
            "the listener never read the log"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    config.max_bytes = room;
    js.update_stream(&config).await?;
    Ok(())
}

/// Under a backlog the listener writes a partition's events in bundles: one `TASKS` message
/// per handler partition and round, announced in `round.<p>` first. A router that takes the
/// partition over from an older cursor forms the announced round again exactly, so the broker
/// drops every copy; every task runs once, in order per aggregate.
#[tokio::test]
async fn a_backlog_goes_out_in_bundles_that_a_new_router_forms_again_exactly() -> anyhow::Result<()>
{
    let env = TestEnv::start().await?;
    handler(&env, "bulk", "events.acct.*.op", "concurrency: 8");
    let listener = env.start_listener().await?;
    env.listeners_spread(1, DEADLINE).await?;
    let js = env.nats.js.clone();
    let mut tasks = js.get_stream(TASKS_STREAM).await?;
    let before = tasks.info().await?.state.last_sequence;
    publish_behind_full_tasks(&env, 400, |n| json!({"n": n})).await?;
    let _worker = env.start_worker().await?;
    let mut watch = env.watch().await?;
    watch
        .wait_for_type("handler_succeeded", 400, DEADLINE)
        .await?;
    let written = tasks.info().await?.state.last_sequence - before;
    println!("400 tasks in {written} TASKS messages");
    assert!(
        written <= 40,
        "a backlog goes out in bundles: {written} messages"
    );

    let done = outcomes(&watch.seen, "bulk");
    let mut per_account: HashMap<u64, Vec<u64>> = HashMap::new();
    for o in &done {
        let n = o["output"]["n"].as_u64().unwrap();
        per_account.entry(n % 20).or_default().push(n);
    }
    assert_eq!(done.len(), 400, "each event handled once");
    for (acct, ns) in per_account {
        assert_eq!(ns.len(), 20, "account {acct}: {ns:?}");
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "account {acct} out of order: {ns:?}"
        );
    }

    // A new router from the oldest cursor: it starts at each partition's announced round and
    // forms it again; the broker drops every message as a duplicate.
    let rounds = js
        .get_key_value(grizzly_shared::nats::CURSORS_BUCKET)
        .await?;
    let mut announced = 0;
    for p in 0..env.settings.partitions {
        let entry = rounds
            .get(format!("round.{p}"))
            .await?
            .context("announcement")?;
        let value: serde_json::Value = serde_json::from_slice(&entry)?;
        announced += usize::from(value.get("from").is_some());
    }
    assert!(announced > 0, "no round was announced");
    let _successor = route_again_from(&env, listener, 1).await?;
    assert_eq!(
        tasks.info().await?.state.last_sequence - before,
        written,
        "the successor wrote tasks again"
    );
    Ok(())
}

/// A worker giving partitions back (a second worker joined) first finishes the bundles it has
/// started: a bundle is acked whole, so otherwise the next owner would run its done tasks
/// again. The handler's own log shows every event ran once.
#[tokio::test]
async fn a_worker_giving_back_a_partition_finishes_its_started_bundles_first() -> anyhow::Result<()>
{
    let env = TestEnv::start().await?;
    let ran = logged_handler(&env, "events.acct.*.op", 2);
    let _listener = env.start_listener().await?;
    env.listeners_spread(1, DEADLINE).await?;
    let worker = |id: &str| {
        let mut s = env.settings.clone();
        s.worker.id = Some(id.to_string());
        env.start_worker_with(s)
    };
    let _w1 = worker("w1").await?;
    publish_behind_full_tasks(&env, 200, |n| json!({"n": n, "sleep": 0.02})).await?;
    let mut watch = env.watch().await?;
    watch
        .wait_for_type("handler_succeeded", 10, DEADLINE)
        .await?;
    // Mid-run: the partitions are shared out, so w1 gives two back.
    let _w2 = worker("w2").await?;
    watch
        .wait_for_type("handler_succeeded", 200, DEADLINE)
        .await?;
    let ran_on: HashSet<String> = outcomes(&watch.seen, "logged")
        .iter()
        .map(|o| o["worker"].as_str().unwrap_or_default().to_string())
        .collect();
    println!("ran on {ran_on:?}");
    each_ran_once(&ran, 200)
}

/// A `process` handler `logged` on `on` that appends "<aggregate> <event id>" to the log file it
/// returns for every event it runs, then sleeps for the event's `data.sleep` seconds.
fn logged_handler(env: &TestEnv, on: &str, concurrency: usize) -> std::path::PathBuf {
    let ran = env.path().join("ran.log");
    let script = env.write_script(
        "logged.py",
        &format!(
            r#"
import json, sys, time
for line in sys.stdin:
    event = json.loads(line)
    with open({ran:?}, "a") as log:
        log.write(event["aggregateid"] + " " + event["id"] + "\n")
    time.sleep(event["data"]["sleep"])
    print(json.dumps({{"done": True}}), flush=True)
"#,
            ran = ran.display().to_string()
        ),
    );
    env.write_handler(
        "logged",
        &format!("name: logged\non: [\"{on}\"]\nkind: process\ncommand: [\"python3\", \"{}\"]\nconcurrency: {concurrency}\n", script.display()),
    );
    ran
}

/// The handler's own log (see [`logged_handler`]) shows `count` events, each run once.
fn each_ran_once(ran: &std::path::Path, count: usize) -> anyhow::Result<()> {
    let log = std::fs::read_to_string(ran)?;
    let runs = runs_in(&log);
    assert_eq!(runs.len(), count, "every event ran");
    let twice: Vec<_> = runs.iter().filter(|(_, c)| *c > 1).collect();
    assert!(twice.is_empty(), "ran more than once: {twice:?}");
    Ok(())
}

/// Each line of a [`logged_handler`] log with how often it is there, in order of first run.
fn runs_in(log: &str) -> Vec<(&str, usize)> {
    let mut runs: Vec<(&str, usize)> = Vec::new();
    let mut at: HashMap<&str, usize> = HashMap::new();
    for line in log.lines() {
        let i = *at.entry(line).or_insert_with(|| {
            runs.push((line, 0));
            runs.len() - 1
        });
        runs[i].1 += 1;
    }
    runs
}

/// A task for [`logged_handler`] on aggregate `acct/<aggregate>`, sleeping `sleep` seconds, in
/// a one-partition setup.
fn logged_task(
    seq: u64,
    aggregate: &str,
    sleep: f64,
    priority: grizzly_shared::Priority,
) -> grizzly_shared::Task {
    let subject = grizzly_shared::EventSubject::new("acct", aggregate, "op").expect("subject");
    let event = grizzly_shared::EventEnvelope::new(&subject, "test", json!({"sleep": sleep}));
    grizzly_shared::Task::new("logged", 1, seq, 1, priority, event)
}

/// Writes `tasks` to `TASKS` as one bundle with message id `id`, as the listener writes a
/// backlog's round (so which tasks share a message does not depend on the listener's timing);
/// returns where it is stored.
async fn write_bundle(
    env: &TestEnv,
    tasks: &[grizzly_shared::Task],
    id: &str,
) -> anyhow::Result<u64> {
    let mut headers = HeaderMap::new();
    headers.insert(
        grizzly_shared::task::BUNDLE_HEADER,
        tasks.len().to_string().as_str(),
    );
    headers.insert("Nats-Msg-Id", id);
    let ack = env
        .nats
        .js
        .publish_with_headers(
            tasks[0].subject(),
            headers,
            serde_json::to_vec(tasks)?.into(),
        )
        .await?
        .await?;
    Ok(ack.sequence)
}

/// A more urgent task of a later round starts its bundle while the earlier round's bundle has
/// not started; the later bundle's other tasks stand behind the earlier one's in their
/// aggregates' lanes. A worker stopping then runs those earlier tasks too, so both bundles are
/// finished and acked: its successor runs nothing twice. The two bundles are written to `TASKS`
/// here as the listener writes a backlog's rounds (one partition, ids and order of its own),
/// so which tasks share a message does not depend on the listener's timing.
#[tokio::test]
async fn a_stopping_worker_finishes_a_started_bundle_behind_an_unstarted_one() -> anyhow::Result<()>
{
    use grizzly_shared::{Priority, Task};

    let env = TestEnv::start().await?;
    let ran = logged_handler(&env, "events.never.*.op", 1);
    let mut settings = env.settings.clone();
    settings.partitions = 1;
    let mut seq = 0;
    let mut task = |aggregate: &str, sleep: f64, priority: Priority| {
        seq += 1;
        logged_task(seq, aggregate, sleep, priority)
    };
    // The earlier round: 100 tasks over ten accounts. The later one: a critical task for an
    // account of its own, then one more for each of the ten.
    let early: Vec<Task> = (0..100)
        .map(|n| task(&format!("a{}", n % 10), 0.0, Priority::Low))
        .collect();
    let mut late = vec![task("hot", 2.0, Priority::Critical)];
    late.extend((0..10).map(|n| task(&format!("a{n}"), 0.0, Priority::Low)));
    let subject = early[0].subject();
    // Alone and slow, ahead of both: they are in the worker before anything else starts.
    let gate = task("gate", 1.0, Priority::Low);
    env.nats
        .js
        .publish(subject.clone(), serde_json::to_vec(&gate)?.into())
        .await?
        .await?;
    for (k, bundle) in [&early, &late].into_iter().enumerate() {
        write_bundle(&env, bundle, &format!("bundle:test:{k}")).await?;
    }
    let worker = |id: &str| {
        let mut s = settings.clone();
        s.worker.id = Some(id.to_string());
        env.start_worker_with(s)
    };
    let w1 = worker("w1").await?;
    // The critical task starts next (the gate is the oldest of the rest), and with it the
    // later bundle, while nothing of the earlier one has.
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let log = std::fs::read_to_string(&ran).unwrap_or_default();
        if let Some(at) = log.lines().position(|l| l.starts_with("hot ")) {
            let before: Vec<&str> = log.lines().take(at).collect();
            assert!(
                before.iter().all(|l| l.starts_with("gate ")),
                "ran before the critical task: {before:?}"
            );
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < until,
            "the critical task never started: {log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w1.shutdown().await?;
    let _w2 = worker("w2").await?;
    let mut watch = env.watch().await?;
    watch
        .wait_for_type("handler_succeeded", 112, DEADLINE)
        .await?;
    each_ran_once(&ran, 112)
}

/// A bundle's task that waits for its time (throttle, debounce) is still finished by a
/// stopping worker once another task of the bundle has started: the bundle is acked whole, so
/// leaving it would make the next owner run the started task again. Written to `TASKS` here as
/// the listener writes a backlog's round.
#[tokio::test]
async fn a_stopping_worker_waits_for_a_started_bundles_delayed_task() -> anyhow::Result<()> {
    use grizzly_shared::Priority::Normal;

    let env = TestEnv::start().await?;
    let ran = logged_handler(&env, "events.never.*.op", 1);
    let mut settings = env.settings.clone();
    settings.partitions = 1;
    settings.worker.id = Some("w1".into());
    // The first runs at once and is still running when the worker is told to stop; the second
    // may not start for another 2.5 s.
    let mut later = logged_task(2, "later", 0.0, Normal);
    later.not_before_ms = Some(grizzly_shared::clock::now_ms() + 2_500);
    let bundle = vec![logged_task(1, "now", 0.5, Normal), later];
    write_bundle(&env, &bundle, "bundle:test:delayed").await?;
    let w1 = env.start_worker_with(settings).await?;
    let until = tokio::time::Instant::now() + DEADLINE;
    while !std::fs::read_to_string(&ran).is_ok_and(|log| log.contains("now ")) {
        anyhow::ensure!(
            tokio::time::Instant::now() < until,
            "the first task never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w1.shutdown().await?;
    // Both ran, once, and the bundle is acked (deleted from the work queue).
    each_ran_once(&ran, 2)?;
    let tasks = env
        .nats
        .js
        .get_stream(grizzly_shared::nats::TASKS_STREAM)
        .await?
        .info()
        .await?
        .state
        .messages;
    assert_eq!(tasks, 0, "the bundle was left for the next owner");
    Ok(())
}

/// A worker killed (SIGKILL) in the middle of a long bundle: the tasks it had recorded as done
/// in `grizzly_done` do not run again on the next owner, which runs only the rest and then
/// deletes the record. Without the record the whole done part ran twice.
#[tokio::test]
async fn a_worker_taking_over_a_half_done_bundle_runs_only_what_was_not_done() -> anyhow::Result<()>
{
    let env = TestEnv::start().await?;
    let ran = logged_handler(&env, "events.never.*.op", 1);
    let mut settings = env.settings.clone();
    settings.partitions = 1;
    // One aggregate: the ten run one after another, 0.3 s each.
    let bundle: Vec<_> = (1..=10)
        .map(|seq| logged_task(seq, "a", 0.3, grizzly_shared::Priority::Normal))
        .collect();
    let seq = write_bundle(&env, &bundle, "bundle:test:long").await?;
    let mut first = grizzly_tests::ChildProcess::start("grizzly-worker", &settings, &[])?;
    // The bucket exists once the worker is up.
    let until = tokio::time::Instant::now() + DEADLINE;
    let done = loop {
        if let Ok(kv) = env
            .nats
            .js
            .get_key_value(grizzly_shared::nats::DONE_BUCKET)
            .await
        {
            break kv;
        }
        anyhow::ensure!(tokio::time::Instant::now() < until, "no done bucket");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let key = format!("logged.0.{seq}");
    let recorded = |value: Option<bytes::Bytes>| -> Vec<u64> {
        value
            .and_then(|v| serde_json::from_slice::<serde_json::Value>(&v).ok())
            .and_then(|r| {
                r["done"]
                    .as_array()
                    .map(|d| d.iter().filter_map(|i| i.as_u64()).collect())
            })
            .unwrap_or_default()
    };
    let done_before = loop {
        let now = recorded(done.get(&key).await?);
        if now.len() >= 4 {
            break now;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < until,
            "no record of 4 done tasks: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    first.kill();
    let _second = grizzly_tests::ChildProcess::start("grizzly-worker", &settings, &[])?;
    // The rest runs, the bundle is acked and its record deleted.
    let tasks = env.nats.js.get_stream(TASKS_STREAM).await?;
    loop {
        let left = tasks.get_info().await?.state.messages;
        let record = done.get(&key).await?;
        if left == 0 && record.is_none() {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < until,
            "bundle not finished: {left} in TASKS, record {record:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(&ran)?;
    // One lane: first runs are in bundle order.
    let runs = runs_in(&log);
    assert_eq!(runs.len(), 10, "every task ran: {log}");
    for index in &done_before {
        assert_eq!(
            runs[*index as usize].1, 1,
            "task {index} was recorded done yet ran again: {log}"
        );
    }
    // At most the one running at the kill, and one done after the last record, ran twice.
    let twice = runs.iter().filter(|(_, n)| *n > 1).count();
    assert!(twice <= 2, "{twice} ran twice: {log}");
    Ok(())
}
