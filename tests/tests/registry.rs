//! The handler registry against a real nats-server, through the `grizzly handler` CLI: two live
//! versions of a handler, new events going to the newest (or a pinned) one, in-flight work
//! finishing on its own version while that version drains and is retired, and the refusals.

use std::path::Path;
use std::time::Duration;

use grizzly_tests::TestEnv;
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(60);

/// A `process` handler that answers with its version, and blocks while the event's `gate`
/// file does not exist.
const SCRIPT: &str = r#"
import json, os, sys, time
version = sys.argv[1]
for line in sys.stdin:
    event = json.loads(line)
    gate = (event.get("data") or {}).get("gate")
    while gate and not os.path.exists(gate):
        time.sleep(0.05)
    print(json.dumps({"done": True, "output": {"ran_on": version}}), flush=True)
"#;

fn handler_yaml(script: &Path, version: u32) -> String {
    format!(
        "name: step\nversion: {version}\nkind: process\non: [\"events.job.*.run\"]\ncommand: [\"python3\", \"{}\", \"v{version}\"]\nconcurrency: 4\n",
        script.display()
    )
}

/// Runs the CLI without blocking the test's runtime (the components under test run on it).
/// Returns (success, stdout, stdout + stderr).
async fn grizzly(env: &TestEnv, args: &[&str]) -> (bool, String, String) {
    let out = env
        .grizzly()
        .args(args)
        .output()
        .await
        .expect("run grizzly (cargo build --workspace first)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        text,
    )
}

/// (handler version that ran, event key) of every `handler_succeeded` seen so far.
fn ran(seen: &[grizzly_tests::LoggedEvent]) -> Vec<(u64, String)> {
    seen.iter()
        .filter(|e| e.event_type() == "handler_succeeded")
        .map(|e| {
            let d = e.data();
            (
                d["handler_version"].as_u64().unwrap_or(0),
                e.subject.split('.').nth(2).unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn two_versions_live_then_v1_retired_in_flight_work_finishes_on_v1() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let script = env.write_script("step.py", SCRIPT);
    env.write_handler("step", &handler_yaml(&script, 1));
    let _worker = env.start_worker().await?;
    let _listener = env.start_listener().await?;
    let mut w = env.watch().await?;
    let gate = env.path().join("gate");
    let gate_s = gate.display().to_string();

    // v1 takes a job that blocks until the gate opens. An ungated job published after it runs
    // to its end on v1: routing follows the log, so the held job was routed to v1 too.
    env.publish_raw("events.job.a.run", json!({"gate": gate_s}).to_string())
        .await?;
    env.publish_raw("events.job.w.run", "{}").await?;
    w.wait_until(DEADLINE, |s| ran(s).contains(&(1, "w".to_string())))
        .await?;

    // v2 is registered at run time; new events go to it while v1's job is still running.
    let v2 = env.path().join("step-v2.yaml");
    std::fs::write(&v2, handler_yaml(&script, 2))?;
    let (ok, _, out) = grizzly(&env, &["handler", "register", v2.to_str().unwrap()]).await;
    assert!(ok && out.contains("step v2 registered"), "{out}");
    // Registering the same content again changes nothing.
    let (ok, _, out) = grizzly(&env, &["handler", "register", v2.to_str().unwrap()]).await;
    assert!(ok && out.contains("already registered (active)"), "{out}");
    // The listener follows the registry: keep sending until an event lands on v2.
    let mut n = 0;
    while !ran(&w.seen).iter().any(|(v, _)| *v == 2) {
        n += 1;
        env.publish_raw(&format!("events.job.b{n}.run"), "{}")
            .await?;
        w.wait_until(DEADLINE, |s| {
            ran(s).iter().any(|(_, k)| *k == format!("b{n}"))
        })
        .await?;
        assert!(n < 20, "new events never reached v2: {:?}", ran(&w.seen));
    }
    // Once one event went to v2, every later one does.
    for i in 0..5 {
        env.publish_raw(&format!("events.job.c{i}.run"), "{}")
            .await?;
    }
    w.wait_until(DEADLINE, |s| {
        ran(s).iter().filter(|(_, k)| k.starts_with('c')).count() == 5
    })
    .await?;
    assert!(
        ran(&w.seen)
            .iter()
            .filter(|(_, k)| k.starts_with('c'))
            .all(|(v, _)| *v == 2),
        "{:?}",
        ran(&w.seen)
    );

    let (ok, json, out) = grizzly(&env, &["handler", "list", "--json"]).await;
    assert!(ok, "{out}");
    let rows: Value = serde_json::from_str(&json)?;
    let row = |v: u64| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["handler"] == "step" && r["version"] == v)
            .cloned()
            .unwrap()
    };
    assert_eq!(row(1)["state"], "active");
    assert_eq!(row(1)["routed"], false);
    assert_eq!(row(2)["routed"], true);
    assert!(row(2)["health"].as_str().unwrap().starts_with("healthy"));

    // Retire v1 while its job still runs: it drains and waits for the job.
    let mut retire = env.grizzly();
    retire.args(["handler", "retire", "step", "--version", "1"]);
    let retire = tokio::spawn(async move { retire.output().await });
    // Draining is visible while the job is held.
    let mut draining = false;
    for _ in 0..100 {
        let (_, json, _) = grizzly(&env, &["handler", "list", "--json"]).await;
        let rows: Value = serde_json::from_str(&json)?;
        if rows
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["version"] == 1 && r["state"] == "draining")
        {
            draining = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(draining, "v1 never showed as draining");
    assert!(!retire.is_finished(), "retire did not wait for v1's job");
    std::fs::write(&gate, "open")?;
    let out = retire.await??;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("step v1 retired"), "{text}");
    // The held job finished on v1, the version it was routed to (its outcome was written
    // before its task left TASKS, so it is in the log already).
    w.wait_until(DEADLINE, |s| ran(s).iter().any(|(_, k)| k == "a"))
        .await?;
    assert!(
        ran(&w.seen).contains(&(1, "a".to_string())),
        "{:?}",
        ran(&w.seen)
    );

    // After retirement every new event runs on v2; nothing is lost or doubled.
    for i in 0..5 {
        env.publish_raw(&format!("events.job.d{i}.run"), "{}")
            .await?;
    }
    w.wait_until(DEADLINE, |s| {
        ran(s).iter().filter(|(_, k)| k.starts_with('d')).count() == 5
    })
    .await?;
    let all = ran(&w.seen);
    assert!(
        all.iter()
            .filter(|(_, k)| k.starts_with('d'))
            .all(|(v, _)| *v == 2)
    );
    let mut keys: Vec<&String> = all.iter().map(|(_, k)| k).collect();
    let total = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), total, "an event ran twice: {all:?}");
    let (_, _, out) = grizzly(&env, &["handler", "list"]).await;
    assert!(
        out.lines()
            .any(|l| l.starts_with("step") && l.contains(" 1 ") && l.contains("retired")),
        "{out}"
    );
    Ok(())
}

#[tokio::test]
async fn a_pinned_version_takes_new_events_and_bad_requests_are_refused() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let script = env.write_script("step.py", SCRIPT);
    env.write_handler("step", &handler_yaml(&script, 1));
    let v2 = env.path().join("step-v2.yaml");
    std::fs::write(&v2, handler_yaml(&script, 2))?;
    let worker = env.start_worker().await?;
    let listener = env.start_listener().await?;
    let mut w = env.watch().await?;
    let (ok, _, out) = grizzly(&env, &["handler", "register", v2.to_str().unwrap()]).await;
    assert!(ok, "{out}");
    let (ok, _, out) = grizzly(&env, &["handler", "pin", "step", "--version", "1"]).await;
    assert!(ok && out.contains("go to v1"), "{out}");
    // Once the listener follows the pin, events run on v1 although v2 is newer.
    let mut n = 0;
    loop {
        n += 1;
        env.publish_raw(&format!("events.job.p{n}.run"), "{}")
            .await?;
        w.wait_until(DEADLINE, |s| {
            ran(s).iter().any(|(_, k)| *k == format!("p{n}"))
        })
        .await?;
        if ran(&w.seen).contains(&(1, format!("p{n}"))) {
            break;
        }
        assert!(n < 20, "the pin was never followed: {:?}", ran(&w.seen));
    }

    // Refusals, each with its reason; nothing changes.
    let changed = env.path().join("step-v2-changed.yaml");
    std::fs::write(
        &changed,
        handler_yaml(&script, 2).replace("concurrency: 4", "concurrency: 2"),
    )?;
    let (ok, _, out) = grizzly(&env, &["handler", "register", changed.to_str().unwrap()]).await;
    assert!(
        !ok && out.contains("already registered with different content"),
        "{out}"
    );
    let bad = env.path().join("bad.yaml");
    std::fs::write(&bad, "name: step\nversion: 3\nkind: process\nretries: 2\n")?;
    let (ok, _, out) = grizzly(&env, &["handler", "register", bad.to_str().unwrap()]).await;
    assert!(
        !ok && out.contains("bad.yaml:") && out.contains("nothing registered"),
        "{out}"
    );
    let (ok, _, out) = grizzly(&env, &["handler", "drain", "step", "--version", "7"]).await;
    assert!(
        !ok && out.contains("has no version 7 (registered: 1, 2)"),
        "{out}"
    );
    let (ok, _, out) = grizzly(&env, &["handler", "drain", "nope", "--version", "1"]).await;
    assert!(
        !ok && out.contains("handler `nope` is not registered"),
        "{out}"
    );
    let (ok, _, out) = grizzly(&env, &["handler", "drain", "step", "--version", "1"]).await;
    assert!(ok && out.contains("step v1 draining"), "{out}");
    // v2 is now the only active version: draining it too is refused.
    let (ok, _, out) = grizzly(&env, &["handler", "drain", "step", "--version", "2"]).await;
    assert!(!ok && out.contains("only active version"), "{out}");
    let (ok, _, out) = grizzly(&env, &["handler", "pin", "step", "--version", "1"]).await;
    assert!(!ok && out.contains("is draining: cannot pin it"), "{out}");
    // The pin to a draining version is ignored: new events go to v2.
    let mut m = 0;
    loop {
        m += 1;
        env.publish_raw(&format!("events.job.q{m}.run"), "{}")
            .await?;
        w.wait_until(DEADLINE, |s| {
            ran(s).iter().any(|(_, k)| *k == format!("q{m}"))
        })
        .await?;
        if ran(&w.seen).contains(&(2, format!("q{m}"))) {
            break;
        }
        assert!(m < 20, "the drain was never followed: {:?}", ran(&w.seen));
    }
    let (ok, _, out) = grizzly(&env, &["handler", "activate", "step", "--version", "1"]).await;
    assert!(ok && out.contains("step v1 active"), "{out}");
    let (ok, _, out) = grizzly(&env, &["handler", "retire", "step", "--version", "1"]).await;
    assert!(ok && out.contains("step v1 retired"), "{out}");
    let (ok, _, out) = grizzly(&env, &["handler", "activate", "step", "--version", "1"]).await;
    assert!(
        !ok && out.contains("is retired: cannot activate it"),
        "{out}"
    );
    // A restart registers the handler files again (v1's file is unchanged) and revives nothing.
    worker.shutdown().await?;
    listener.shutdown().await?;
    let _worker = env.start_worker().await?;
    let _listener = env.start_listener().await?;
    env.publish_raw("events.job.r.run", "{}").await?;
    w.wait_until(DEADLINE, |s| ran(s).iter().any(|(_, k)| k == "r"))
        .await?;
    assert!(
        ran(&w.seen).contains(&(2, "r".to_string())),
        "{:?}",
        ran(&w.seen)
    );
    let (_, json, _) = grizzly(&env, &["handler", "list", "--json"]).await;
    let rows: Value = serde_json::from_str(&json)?;
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .any(|r| r["version"] == 1 && r["state"] == "retired"),
        "{rows}"
    );
    Ok(())
}

#[tokio::test]
async fn workflow_steps_follow_a_version_registered_at_run_time() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let script = env.write_script("step.py", SCRIPT);
    env.write_handler("step", &handler_yaml(&script, 1));
    std::fs::write(
        env.settings.workflows_dir.join("order.yaml"),
        "name: order\non: [\"events.order.*.placed\"]\ndo:\n  - id: work\n    call: step\n",
    )?;
    let _worker = env.start_worker().await?;
    let _listener = env.start_listener().await?;
    let _coordinator = env.start_coordinator().await?;
    let mut w = env.watch().await?;
    // Versions of the step outcomes (on the workflow instances' aggregates).
    let steps = |seen: &[grizzly_tests::LoggedEvent]| -> Vec<u64> {
        seen.iter()
            .filter(|e| e.event_type() == "handler_succeeded" && e.subject.contains(".workflow."))
            .map(|e| e.data()["handler_version"].as_u64().unwrap_or(0))
            .collect()
    };
    env.publish_raw("events.order.o0.placed", "{}").await?;
    w.wait_until(DEADLINE, |s| steps(s).len() == 1).await?;
    assert_eq!(steps(&w.seen), [1]);

    // v2 registered while the coordinator runs: new steps call it, no restart needed.
    let v2 = env.path().join("step-v2.yaml");
    std::fs::write(&v2, handler_yaml(&script, 2))?;
    let (ok, _, out) = grizzly(&env, &["handler", "register", v2.to_str().unwrap()]).await;
    assert!(ok, "{out}");
    let mut n = 0;
    while !steps(&w.seen).contains(&2) {
        n += 1;
        assert!(n < 20, "new steps never called v2: {:?}", steps(&w.seen));
        env.publish_raw(&format!("events.order.o{n}.placed"), "{}")
            .await?;
        w.wait_until(DEADLINE, |s| steps(s).len() == n + 1).await?;
    }
    // Once a step called v2, every later one does.
    for i in 0..3 {
        env.publish_raw(&format!("events.order.p{i}.placed"), "{}")
            .await?;
    }
    w.wait_until(DEADLINE, |s| steps(s).len() == n + 4).await?;
    assert!(
        steps(&w.seen)[n + 1..].iter().all(|v| *v == 2),
        "{:?}",
        steps(&w.seen)
    );

    // A pinned older version takes new steps again.
    let (ok, _, out) = grizzly(&env, &["handler", "pin", "step", "--version", "1"]).await;
    assert!(ok, "{out}");
    let mut m = 0;
    while steps(&w.seen).last() != Some(&1) {
        m += 1;
        assert!(
            m < 20,
            "new steps never went back to v1: {:?}",
            steps(&w.seen)
        );
        env.publish_raw(&format!("events.order.q{m}.placed"), "{}")
            .await?;
        w.wait_until(DEADLINE, |s| steps(s).len() == n + 4 + m)
            .await?;
    }
    Ok(())
}
