//! The `grizzly` command line and the component binaries, run as real processes: bad input gets
//! a clear error naming the problem and its location, and `grizzly dev` runs the whole system.

use std::process::{Command, Stdio};
use std::time::Duration;

use grizzly_tests::{TestEnv, bin_path};
use serde_json::json;

fn grizzly(args: &[&str], nats_url: &str) -> std::process::Output {
    Command::new(bin_path("grizzly"))
        .args(["--nats-url", nats_url])
        .args(args)
        .output()
        .expect("run grizzly (cargo build --workspace first)")
}

#[tokio::test]
async fn emit_appends_a_cloud_event_and_refuses_bad_input_clearly() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let url = env.settings.nats_url.clone();
    let mut watch = env.watch().await?;

    let ok = grizzly(
        &[
            "emit",
            "events.agent.a1.ping",
            r#"{"x":1}"#,
            "--priority",
            "high",
        ],
        &url,
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let seen = watch
        .wait_until(Duration::from_secs(30), |s| !s.is_empty())
        .await?;
    let event = seen[0].event.clone().expect("a CloudEvent");
    assert_eq!(event.data, json!({"x": 1}));
    assert_eq!(event.source, "grizzly/cli");
    assert_eq!(event.priority, grizzly_shared::Priority::High);
    assert!(String::from_utf8_lossy(&ok.stdout).contains(&event.id));

    let bad_json = grizzly(&["emit", "events.agent.a1.ping", "{not json"], &url);
    assert!(!bad_json.status.success());
    let err = String::from_utf8_lossy(&bad_json.stderr);
    assert!(
        err.contains("not valid JSON") && err.contains("events.agent.a1.ping"),
        "{err}"
    );

    let bad_subject = grizzly(&["emit", "events.agent.ping", "{}"], &url);
    assert!(!bad_subject.status.success());
    let err = String::from_utf8_lossy(&bad_subject.stderr);
    assert!(
        err.contains("3 tokens") && err.contains("events.agent.ping"),
        "{err}"
    );

    // Data from stdin (`-`): too big for an argument, and over max_event_bytes.
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(300 * 1024));
    let mut child = Command::new(bin_path("grizzly"))
        .args(["--nats-url", &url, "emit", "events.agent.a1.ping", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), big.as_bytes())?;
    let oversized = child.wait_with_output()?;
    assert!(!oversized.status.success());
    assert!(String::from_utf8_lossy(&oversized.stderr).contains("max_event_bytes"));
    Ok(())
}

#[tokio::test]
async fn invalid_handler_files_are_reported_with_file_line_and_column() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    env.write_handler("broken", "name: broken\non: [\"events.>\"\nkind: exec\n");
    env.write_handler(
        "unknown_key",
        "name: k\non: [\"events.>\"]\nkind: exec\ncommand: [a]\ncolour: red\n",
    );
    env.write_handler("bad_kind", "name: b\non: [\"events.>\"]\nkind: shell\n");
    env.write_handler("missing", "name: m\non: [\"events.>\"]\nkind: process\n");

    let out = grizzly(
        &[
            "handler",
            "validate",
            env.settings.handlers_dir.to_str().unwrap(),
        ],
        &env.settings.nats_url,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for (file, needle) in [
        ("broken.yaml:", ""),
        ("unknown_key.yaml:5:1:", "unknown field `colour`"),
        ("bad_kind.yaml:3:", "shell"),
        ("missing.yaml", "command"),
    ] {
        let line = err
            .lines()
            .find(|l| l.contains(file))
            .unwrap_or_else(|| panic!("no error for {file}: {err}"));
        assert!(line.contains(needle), "{line}");
    }

    // A component refuses to start on them, naming the same problems.
    let listener = Command::new(bin_path("grizzly-listener"))
        .args([
            "--nats-url",
            &env.settings.nats_url,
            "--handlers",
            env.settings.handlers_dir.to_str().unwrap(),
        ])
        .stderr(Stdio::piped())
        .output()?;
    assert!(!listener.status.success());
    assert!(String::from_utf8_lossy(&listener.stderr).contains("unknown_key.yaml:5:1:"));
    Ok(())
}

#[tokio::test]
async fn grizzly_dev_runs_the_example_handlers_end_to_end() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    // Port 0: the embedded broker picks a free port itself and `grizzly dev` names it in its
    // banner (a port picked here and released could be taken by another test's broker first).
    let mut dev = KillOnDrop(
        Command::new(bin_path("grizzly"))
            .current_dir(&root)
            .env("GRIZZLY_NATS_URL", "nats://127.0.0.1:0")
            .args([
                "dev",
                "--state-dir",
                dir.path().to_str().unwrap(),
                "--fake-api",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    // Read stderr to its end (so the child never blocks on a full pipe); pass on the banner's URL.
    let (url_tx, url_rx) = std::sync::mpsc::channel();
    let stderr = dev.0.stderr.take().expect("piped stderr");
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(rest) = line.strip_prefix("grizzly dev: broker ") {
                let _ = url_tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let url = loop {
        match url_rx.recv_timeout(Duration::from_millis(200)) {
            Ok(url) => break url,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                anyhow::ensure!(dev.0.try_wait()?.is_none(), "grizzly dev exited early");
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "grizzly dev did not start within 60 s"
                );
            }
            Err(e) => anyhow::bail!("grizzly dev never printed its broker's URL: {e}"),
        }
    };
    let client = async_nats::connect(url.clone()).await?;
    let js = async_nats::jetstream::new(client);
    // The streams exist once the components are up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while js.get_stream("EVENTS").await.is_err() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "streams never appeared"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = grizzly(
        &["emit", "events.agent.dev1.ping", r#"{"hello":"dev"}"#],
        &url,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tail = tokio::task::spawn_blocking({
        let url = url.clone();
        move || {
            grizzly(
                &[
                    "events",
                    "tail",
                    "events.agent.dev1.>",
                    "--from-start",
                    "--count",
                    "3",
                    "--json",
                ],
                &url,
            )
        }
    });
    let tail = tokio::time::timeout(Duration::from_secs(60), tail).await??;
    let lines = String::from_utf8_lossy(&tail.stdout);
    let subjects: Vec<String> = lines
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["subject"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        subjects,
        [
            "events.agent.dev1.ping",
            "events.agent.dev1.pong",
            "events.agent.dev1.handler_succeeded"
        ]
    );

    // The worker's heartbeat shows the handlers as served.
    let list = Command::new(bin_path("grizzly"))
        .current_dir(&root)
        .args(["--nats-url", &url, "handler", "list"])
        .output()?;
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let text = String::from_utf8_lossy(&list.stdout);
    let echo = text
        .lines()
        .find(|l| l.starts_with("echo "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        echo.contains("healthy (1)") && echo.contains("process"),
        "{echo}"
    );

    // The coordinator runs the example workflows: the provisioning saga ends completed.
    let started = tokio::task::spawn_blocking({
        let (url, root) = (url.clone(), root.clone());
        move || {
            Command::new(bin_path("grizzly"))
                .current_dir(&root)
                .args(["--nats-url", &url, "workflow", "start", "provision"])
                .args(["--input", r#"{"env":"dev"}"#, "--id", "dev-prov"])
                .args(["--wait", "--timeout", "60s"])
                .output()
        }
    });
    let started = tokio::time::timeout(Duration::from_secs(90), started).await???;
    let text = String::from_utf8_lossy(&started.stdout);
    assert!(
        started.status.success() && text.contains("completed"),
        "{text}{}",
        String::from_utf8_lossy(&started.stderr)
    );
    Ok(())
}

/// Every figure `grizzly bench all` reports (its JSON `figures`); the values depend on the
/// machine, so the test checks only that each is there and is a number.
const BENCH_FIGURES: &[&str] = &[
    "workflow_instances_per_s",
    "workflow_steps_over_plain_events",
    "workflow_alone_p50_ms",
    "workflow_alone_over_steps_plain_alone",
    "cold_p50_ms",
    "cold_p99_ms",
    "cold_events_per_s",
    "warm1_p50_ms",
    "warm1_p99_ms",
    "warm1_events_per_s",
    "warm2_p50_ms",
    "warm2_events_per_s",
    "warm4_p50_ms",
    "warm4_events_per_s",
    "warm8_p50_ms",
    "warm8_events_per_s",
    "warm_vs_cold_throughput",
    "warm_instance_pss_mib",
    "cpu_bound_scaling2_vs_1",
    "cpu_bound_scaling4_vs_1",
    "cpu_bound_scaling8_vs_1",
    "latency1_events_per_s",
    "latency8_events_per_s",
    "latency8_p50_ms",
    "scaling2_vs_1",
    "scaling4_vs_1",
    "scaling8_vs_1",
    "latency8_together_p50_ms",
    "scaling8_together_vs_1",
    "raw_events_per_s_always",
    "relay_events_per_s_always",
    "full_events_per_s_always",
    "full_p50_ms_always",
    "full_over_raw_always",
    "full_over_relay_always",
    "raw_events_per_s_default",
    "relay_events_per_s_default",
    "full_events_per_s_default",
    "full_p50_ms_default",
    "full_over_raw_default",
    "full_over_relay_default",
    "cpu_raw_own_us_default",
    "cpu_raw_broker_us_default",
    "cpu_full_own_us_default",
    "cpu_full_broker_us_default",
    "cpu_full_handlers_us_default",
    "hop_p50_ms_always",
    "dispatch_p50_ms_always",
    "dispatch_over_hop_always",
    "hop_p50_ms_default",
    "dispatch_p50_ms_default",
    "dispatch_p99_ms_default",
    "dispatch_routing_p50_ms_default",
    "dispatch_worker_p50_ms_default",
    "at_rest_p50_ms_default",
    "dispatch_over_hop_default",
    "hop_from_publish_p50_ms_default",
    "dispatch_from_publish_p50_ms_default",
    "dispatch_from_publish_p99_ms_default",
    "dispatch_over_hop_from_publish_default",
    "dispatch_over_hop_from_publish_always",
    "success_pct",
    "first_attempt_success_pct",
];

/// Runs `grizzly bench <args> --json FILE`, which must succeed: its printed table and its JSON.
fn bench_json(args: &[&str]) -> anyhow::Result<(String, serde_json::Value)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench.json");
    let out = Command::new(bin_path("grizzly"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .arg(&path)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((stdout, serde_json::from_slice(&std::fs::read(&path)?)?))
}

/// The figures that have a target (a PASS/MISS row each).
const BENCH_TARGETS: &[&str] = &[
    "warm1_p50_ms",
    "warm4_p50_ms",
    "warm_vs_cold_throughput",
    "scaling2_vs_1",
    "scaling4_vs_1",
    "scaling8_vs_1",
    "full_events_per_s_default",
    "full_over_raw_default",
    "dispatch_over_hop_from_publish_default",
    "full_over_relay_always",
    "success_pct",
];

#[test]
fn bench_all_quick_reports_every_figure_beside_its_target_and_as_json() -> anyhow::Result<()> {
    let (stdout, report) = bench_json(&["all", "--quick"])?;
    for key in BENCH_FIGURES {
        assert!(
            report["figures"][key].is_number(),
            "figure {key} missing: {}",
            report["figures"]
        );
    }
    let targets = report["targets"].as_array().expect("targets");
    for key in BENCH_TARGETS {
        let t = targets
            .iter()
            .find(|t| t["key"] == *key)
            .unwrap_or_else(|| panic!("no target row for {key}: {targets:?}"));
        assert!(t["pass"].is_boolean() && t["target"].is_string(), "{t}");
        assert_eq!(t["value"], report["figures"][key], "{key}");
        // The printed table has the row with its verdict.
        let row = stdout
            .lines()
            .find(|l| l.contains(t["figure"].as_str().unwrap()))
            .unwrap_or_else(|| panic!("no row for {key} in:\n{stdout}"));
        assert!(row.contains("PASS") || row.contains("MISS"), "{row}");
    }
    // The one-at-a-time latencies: every round ran, the raw hop and the dispatch alike (50
    // events of each in the quick run).
    for mode in report["throughput"]["modes"].as_array().expect("modes") {
        for key in [
            "hop_from_publish",
            "dispatch_from_publish",
            "dispatch_worker",
        ] {
            assert_eq!(mode[key]["events"], 50, "{key}: {mode}");
        }
    }
    // The workflows bench runs in it too, reported without a target.
    assert_eq!(
        report["workflows"]["workflow_burst"]["events"], 60,
        "{report}"
    );
    assert!(
        stdout.contains("workflows of 3 no-op steps, fsync default: a burst of 60 instances"),
        "{stdout}"
    );
    assert!(report["quick"] == true);
    assert!(report["machine"]["cores"].as_u64().is_some_and(|c| c >= 1));
    assert!(report["date"].as_str().is_some_and(|d| d.len() >= 20));
    assert!(report.get("git_commit").is_some());

    // Bad input: an unknown broker mode and an unknown flag are refused, naming the problem.
    let bad = Command::new(bin_path("grizzly"))
        .args(["bench", "throughput", "--fsync", "sometimes"])
        .output()?;
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("`always` or `default`, not `sometimes`"),
        "{err}"
    );
    let bad = Command::new(bin_path("grizzly"))
        .args(["bench", "all", "--fast"])
        .output()?;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--fast"));
    Ok(())
}

#[test]
fn bench_workflows_runs_instances_beside_plain_events_and_reports_the_ratios() -> anyhow::Result<()>
{
    let (stdout, report) = bench_json(&["workflows", "--instances", "40"])?;
    // Every instance of the burst completed, and three plain events ran per instance.
    assert_eq!(report["workflow_burst"]["events"], 40, "{report}");
    assert_eq!(report["plain_burst"]["events"], 120, "{report}");
    for key in [
        "workflow_alone",
        "plain_alone",
        "workflow_burst",
        "plain_burst",
    ] {
        for figure in ["p50_ms", "events_per_s"] {
            let v = report[key][figure].as_f64().unwrap_or(0.0);
            assert!(v > 0.0, "{key}.{figure} = {v}: {report}");
        }
    }
    for key in [
        "workflow_steps_per_s_over_plain_events_per_s",
        "workflow_alone_over_steps_plain_alone",
    ] {
        assert!(
            report[key].as_f64().is_some_and(|v| v > 0.0),
            "{key}: {report}"
        );
        assert!(
            stdout.contains("workflow steps/s ÷ plain events/s"),
            "{stdout}"
        );
    }
    // Bad input: no instances is refused, naming the flag.
    let bad = Command::new(bin_path("grizzly"))
        .args(["bench", "workflows", "--instances", "0"])
        .output()?;
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("--instances must be at least 1"), "{err}");
    Ok(())
}
