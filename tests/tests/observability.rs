//! Observability end to end, against a real nats-server:
//! - `/metrics` counters move by exactly the events sent; `/healthz`, `/readyz`, pprof answer;
//! - one event's journey is ONE trace with the right parent/child links across processes:
//!   `grizzly emit` (root) → `grizzly-listener` (`route`) → `grizzly-worker` (`handle` →
//!   `attempt`) → the listener again for what the attempt wrote. Every process exports OTLP/HTTP
//!   to a receiver this test runs on loopback.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grizzly_shared::http::ObservabilityServer;
use grizzly_shared::nats;
use grizzly_tests::{ChildProcess, TestEnv, bin_path};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);

/// A persistent JSON-lines handler that answers every request with success.
const ECHO_PROCESS: &str = r#"
import json, sys
for line in sys.stdin:
    event = json.loads(line)
    print(json.dumps({"done": True, "output": event["data"].get("n")}), flush=True)
"#;

/// An exec handler that answers each event with a `pong`.
const PONG_SCRIPT: &str = r#"
import json, sys
event = json.load(sys.stdin)
print(json.dumps({"type": "pong", "data": {"got": event["data"]}}))
"#;

/// `GET` over plain HTTP/1.0: (status, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP header end"))?;
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("bad status line: {head}"))?;
    Ok((status, response[split + 4..].to_vec()))
}

/// Every sample of a scrape, by `name{labels}` as printed.
async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<HashMap<String, f64>> {
    let (status, body) = http_get(addr, "/metrics").await?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    let text = String::from_utf8(body)?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect())
}

fn sample(samples: &HashMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

/// Scrapes until `done` holds for a sample set; fails with the last scrape at the deadline.
async fn scrape_until(
    addr: std::net::SocketAddr,
    what: &str,
    mut done: impl FnMut(&HashMap<String, f64>) -> bool,
) -> anyhow::Result<HashMap<String, f64>> {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let samples = scrape(addr).await?;
        if done(&samples) {
            return Ok(samples);
        }
        if tokio::time::Instant::now() > until {
            anyhow::bail!("deadline passed waiting for {what}; last scrape: {samples:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn metrics_count_exactly_the_events_sent_and_probes_answer() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let script = env.write_script("echo.py", ECHO_PROCESS);
    env.write_handler(
        "obs_metrics",
        &format!("name: obs_metrics\non: [\"events.agent.*.obs_job\"]\nkind: process\ncommand: [\"python3\", \"{}\"]\nconcurrency: 3\n", script.display()),
    );
    let ops = ObservabilityServer::start("127.0.0.1:0").await?;
    let addr = ops.local_addr();
    assert_ne!(addr.port(), 0, "the bound port is reported");
    assert_eq!(http_get(addr, "/healthz").await?.0, 200);
    // No component tracked yet: alive, not ready.
    assert_eq!(http_get(addr, "/readyz").await?.0, 503);

    let stop = CancellationToken::new();
    let nats = nats::connect(&env.settings.nats_url, "test-ops", false).await?;
    ops.track("test", &nats, &env.settings, stop.clone());
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (status, body) = http_get(addr, "/readyz").await?;
        if status == 200 {
            assert!(String::from_utf8_lossy(&body).contains("test: nats connected"));
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < until, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let before = scrape(addr).await?;
    let _listener = env.start_listener().await?;
    let _worker = env.start_worker().await?;
    let mut watch = env.watch().await?;
    const N: usize = 25;
    for i in 0..N {
        env.publish_raw(
            &format!("events.agent.m{}.obs_job", i % 5),
            json!({"n": i}).to_string(),
        )
        .await?;
    }
    env.publish_raw("events.agent.m0.obs_job", "not json")
        .await?;
    watch
        .wait_for_type("handler_succeeded", N, DEADLINE)
        .await?;
    // The outcomes are events too: the listener consumes them (and routes them nowhere).
    let consumed = (2 * N + 1) as f64;
    let in_before = sample(&before, "grizzly_events_in_total");
    let after = scrape_until(addr, "the listener to consume every event", |s| {
        sample(s, "grizzly_events_in_total") - in_before >= consumed
    })
    .await?;
    let delta = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(delta("grizzly_events_in_total"), consumed);
    assert_eq!(
        delta(r#"grizzly_events_routed_total{handler="obs_metrics"}"#),
        N as f64
    );
    assert_eq!(
        delta(r#"grizzly_handler_invocations_total{handler="obs_metrics",outcome="succeeded"}"#),
        N as f64
    );
    assert_eq!(
        delta(r#"grizzly_handler_invocations_total{handler="obs_metrics",outcome="failed"}"#),
        0.0
    );
    assert_eq!(
        delta(r#"grizzly_handler_duration_seconds_count{handler="obs_metrics"}"#),
        N as f64
    );
    assert_eq!(
        delta(r#"grizzly_events_out_total{kind="outcome"}"#),
        N as f64
    );
    assert_eq!(
        delta(r#"grizzly_events_out_total{kind="dead_letter"}"#),
        1.0
    );
    assert_eq!(
        sample(&after, r#"grizzly_breaker_open{handler="obs_metrics"}"#),
        0.0
    );
    assert_eq!(
        sample(&after, r#"grizzly_pool_max{handler="obs_metrics"}"#),
        3.0
    );
    assert!(after.contains_key(r#"grizzly_pool_instances{handler="obs_metrics",state="idle"}"#));

    // Broker-side gauges are polled: the dead letter and the consumers' lag show up; the
    // listeners' lag (from their cursors, written once per lease round) comes down to zero.
    scrape_until(addr, "the broker gauges, everything routed", |s| {
        sample(s, "grizzly_dlq_messages") == 1.0
            && s.get(r#"grizzly_consumer_pending{consumer="grizzly-listener"}"#) == Some(&0.0)
            && s.keys()
                .any(|k| k.starts_with(r#"grizzly_consumer_pending{consumer="worker-obs_metrics-"#))
    })
    .await?;

    // The coordinator's registration function.
    grizzly_shared::metrics::metrics().set_workflow_instances("running", 2);
    let s = scrape(addr).await?;
    assert_eq!(
        sample(&s, r#"grizzly_workflow_instances{state="running"}"#),
        2.0
    );

    // A CPU profile on demand (pprof protobuf).
    let (status, profile) = http_get(addr, "/debug/pprof/profile?seconds=1").await?;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&profile));
    assert!(!profile.is_empty());
    stop.cancel();
    Ok(())
}

/// One span as an OTLP receiver sees it.
#[derive(Debug, Clone)]
struct ExportedSpan {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
}

/// A minimal OTLP/HTTP (protobuf) trace receiver on loopback.
struct OtlpReceiver {
    endpoint: String,
    spans: Arc<Mutex<Vec<ExportedSpan>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl OtlpReceiver {
    async fn start() -> anyhow::Result<Self> {
        let spans: Arc<Mutex<Vec<ExportedSpan>>> = Arc::default();
        let sink = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    match ExportTraceServiceRequest::decode(body) {
                        Ok(request) => {
                            sink.lock().unwrap().extend(flatten(request));
                            (
                                axum::http::StatusCode::OK,
                                [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                                Vec::new(),
                            )
                        }
                        Err(_) => (
                            axum::http::StatusCode::BAD_REQUEST,
                            [(axum::http::header::CONTENT_TYPE, "text/plain")],
                            b"not an ExportTraceServiceRequest".to_vec(),
                        ),
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Self {
            endpoint,
            spans,
            _stop: stop,
        })
    }

    /// Waits until `done` holds for the spans received so far.
    async fn wait_until(
        &self,
        what: &str,
        mut done: impl FnMut(&[ExportedSpan]) -> bool,
    ) -> anyhow::Result<Vec<ExportedSpan>> {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            let spans = self.spans.lock().unwrap().clone();
            if done(&spans) {
                return Ok(spans);
            }
            if tokio::time::Instant::now() > until {
                anyhow::bail!("deadline passed waiting for {what}; received: {spans:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn flatten(request: ExportTraceServiceRequest) -> Vec<ExportedSpan> {
    let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
        .as_ref()
        .and_then(|v| v.value.as_ref())
    {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    };
    let mut out = Vec::new();
    for rs in request.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .map(|kv| text(&kv.value))
            .unwrap_or_default();
        for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
            out.push(ExportedSpan {
                service: service.clone(),
                name: span.name.clone(),
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: hex(&span.parent_span_id),
                attributes: span
                    .attributes
                    .iter()
                    .map(|kv| (kv.key.clone(), text(&kv.value)))
                    .collect(),
            });
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `00-<trace>-<span>-<flags>` → (trace, span).
fn ids(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "malformed traceparent {traceparent}");
    (parts[1].to_string(), parts[2].to_string())
}

#[tokio::test]
async fn one_trace_follows_an_event_from_grizzly_emit_through_listener_and_worker_processes()
-> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let receiver = OtlpReceiver::start().await?;
    let script = env.write_script("pong.py", PONG_SCRIPT);
    env.write_handler(
        "obs_pong",
        &format!("name: obs_pong\non: [\"events.agent.*.obs_ping\"]\nkind: exec\ncommand: [\"python3\", \"{}\"]\n", script.display()),
    );
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.clone()),
        // Export promptly: the test waits for spans, and children are killed at the end.
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
        ("GRIZZLY_METRICS_ADDR", "127.0.0.1:0".to_string()),
    ];
    let _listener = ChildProcess::start("grizzly-listener", &env.settings, &otel)?;
    let _worker = ChildProcess::start("grizzly-worker", &env.settings, &otel)?;
    let mut watch = env.watch().await?;

    let emitted = tokio::process::Command::new(bin_path("grizzly"))
        .args(["emit", "events.agent.t1.obs_ping", r#"{"x":1}"#])
        .env("GRIZZLY_NATS_URL", &env.settings.nats_url)
        .envs(otel.iter().map(|(k, v)| (k, v)))
        .output()
        .await?;
    assert!(
        emitted.status.success(),
        "grizzly emit failed: {}",
        String::from_utf8_lossy(&emitted.stderr)
    );

    watch
        .wait_for_type("handler_succeeded", 1, DEADLINE)
        .await?;
    let ping = watch.wait_for_type("obs_ping", 1, DEADLINE).await?[0]
        .event
        .clone()
        .expect("ping parsed");
    let pong = watch.wait_for_type("pong", 1, DEADLINE).await?[0]
        .event
        .clone()
        .expect("pong parsed");
    let outcome = watch.of_type("handler_succeeded")[0]
        .event
        .clone()
        .expect("outcome parsed");
    let (trace_id, emit_span) = ids(ping.traceparent.as_deref().expect("emit sets traceparent"));

    let route_of = |spans: &[ExportedSpan], subject: &str| {
        spans
            .iter()
            .find(|s| {
                s.name == "route"
                    && s.attributes.get("subject").map(String::as_str) == Some(subject)
            })
            .cloned()
    };
    let spans = receiver
        .wait_until("every span of the journey", |spans| {
            ["emit", "handle", "attempt"]
                .iter()
                .all(|n| spans.iter().any(|s| s.name == *n))
                && route_of(spans, "events.agent.t1.obs_ping").is_some()
                && route_of(spans, "events.agent.t1.pong").is_some()
                && route_of(spans, "events.agent.t1.handler_succeeded").is_some()
        })
        .await?;
    let one = |name: &str| {
        let found: Vec<&ExportedSpan> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "one {name} span: {found:#?}");
        found[0].clone()
    };
    let emit = one("emit");
    let handle = one("handle");
    let attempt = one("attempt");
    let route_ping = route_of(&spans, "events.agent.t1.obs_ping").unwrap();
    let route_pong = route_of(&spans, "events.agent.t1.pong").unwrap();
    let route_outcome = route_of(&spans, "events.agent.t1.handler_succeeded").unwrap();

    // One trace, rooted at `grizzly emit`, across three processes.
    for s in [
        &emit,
        &handle,
        &attempt,
        &route_ping,
        &route_pong,
        &route_outcome,
    ] {
        assert_eq!(s.trace_id, trace_id, "{s:#?} is in another trace");
    }
    assert_eq!(emit.service, "grizzly");
    assert_eq!(route_ping.service, "grizzly-listener");
    assert_eq!(handle.service, "grizzly-worker");
    assert_eq!(emit.parent_span_id, "", "emit is the root");
    assert_eq!(
        emit.span_id, emit_span,
        "the event carries the emit span's context"
    );
    // Parent/child links follow the event's path.
    assert_eq!(route_ping.parent_span_id, emit.span_id);
    assert_eq!(handle.parent_span_id, route_ping.span_id);
    assert_eq!(attempt.parent_span_id, handle.span_id);
    assert_eq!(route_pong.parent_span_id, attempt.span_id);
    assert_eq!(route_outcome.parent_span_id, attempt.span_id);
    assert_eq!(handle.attributes["event.id"], ping.id);
    // What the attempt wrote carries the attempt's context.
    for written in [&pong, &outcome] {
        assert_eq!(
            written.traceparent.as_deref().map(ids),
            Some((trace_id.clone(), attempt.span_id.clone()))
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_claude_turn_and_what_its_agent_emits_through_mcp_join_the_publishers_trace()
-> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let receiver = OtlpReceiver::start().await?;
    let fake = grizzly_devkit::FakeMessagesApi::start(Default::default()).await?;
    let mut yaml = "name: obs_agent\non: [\"events.agent.*.obs_asked\"]\nkind: claude\ntemplate: \"{{ data.text }}\"\nenv:\n".to_string();
    for (k, v) in fake.claude_env() {
        yaml.push_str(&format!("  {k}: \"{v}\"\n"));
    }
    env.write_handler("obs_agent", &yaml);
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.clone()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
        ("GRIZZLY_METRICS_ADDR", "127.0.0.1:0".to_string()),
    ];
    let _listener = ChildProcess::start("grizzly-listener", &env.settings, &otel)?;
    let _worker = ChildProcess::start("grizzly-worker", &env.settings, &otel)?;
    let mut watch = env.watch().await?;

    // A plain publisher that is itself traced (`nats pub -H traceparent:...`).
    let (trace_id, publisher_span) = ("5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{trace_id}-{publisher_span}-01").as_str(),
    );
    let text = r#"summarise [[tool:emit_event {"type":"obs_summary","data":{"k":1}}]]"#;
    env.nats
        .js
        .publish_with_headers(
            "events.agent.c1.obs_asked",
            headers,
            json!({ "text": text }).to_string().into(),
        )
        .await?
        .await?;
    watch
        .wait_for_type("handler_succeeded", 1, Duration::from_secs(120))
        .await?;
    let summary = watch.wait_for_type("obs_summary", 1, DEADLINE).await?[0]
        .event
        .clone()
        .expect("summary parsed");

    let spans = receiver
        .wait_until("the agent's spans", |spans| {
            ["handle", "attempt", "claude_turn", "mcp_emit_event"]
                .iter()
                .all(|n| spans.iter().any(|s| s.name == *n))
                && spans.iter().any(|s| {
                    s.name == "route"
                        && s.attributes.get("subject").map(String::as_str)
                            == Some("events.agent.c1.obs_summary")
                })
        })
        .await?;
    let by_name = |name: &str| spans.iter().find(|s| s.name == name).cloned().unwrap();
    let route_for = |subject: &str| {
        spans
            .iter()
            .find(|s| {
                s.name == "route"
                    && s.attributes.get("subject").map(String::as_str) == Some(subject)
            })
            .cloned()
            .unwrap()
    };
    let (route_asked, handle, attempt, turn, mcp, route_summary) = (
        route_for("events.agent.c1.obs_asked"),
        by_name("handle"),
        by_name("attempt"),
        by_name("claude_turn"),
        by_name("mcp_emit_event"),
        route_for("events.agent.c1.obs_summary"),
    );
    for s in [&route_asked, &handle, &attempt, &turn, &mcp, &route_summary] {
        assert_eq!(s.trace_id, trace_id, "{s:#?} is in another trace");
    }
    assert_eq!(
        mcp.service, "grizzly-mcp",
        "the MCP server exports as its own process"
    );
    assert_eq!(route_asked.parent_span_id, publisher_span);
    assert_eq!(handle.parent_span_id, route_asked.span_id);
    assert_eq!(attempt.parent_span_id, handle.span_id);
    assert_eq!(turn.parent_span_id, attempt.span_id);
    assert_eq!(mcp.parent_span_id, turn.span_id);
    assert_eq!(route_summary.parent_span_id, mcp.span_id);
    assert_eq!(
        summary.traceparent.as_deref().map(ids),
        Some((trace_id.to_string(), mcp.span_id.clone()))
    );
    Ok(())
}

#[tokio::test]
async fn a_workflow_instance_joins_the_trace_of_the_event_that_started_it() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let receiver = OtlpReceiver::start().await?;
    env.write_handler(
        "obs_step",
        "name: obs_step\nkind: exec\ncommand: [\"sh\", \"-c\", \"cat > /dev/null\"]\n",
    );
    std::fs::write(
        env.settings.workflows_dir.join("obs_flow.yaml"),
        "name: obs_flow\non: [\"events.order.*.placed\"]\ndo:\n  - id: first\n    call: obs_step\n  - id: second\n    call: obs_step\n",
    )?;
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.clone()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
    ];
    let _worker = ChildProcess::start("grizzly-worker", &env.settings, &otel)?;
    let _coordinator = ChildProcess::start("grizzly-coordinator", &env.settings, &otel)?;
    let mut watch = env.watch().await?;
    let emitted = tokio::process::Command::new(bin_path("grizzly"))
        .args(["emit", "events.order.o1.placed", r#"{"total":3}"#])
        .env("GRIZZLY_NATS_URL", &env.settings.nats_url)
        .envs(otel.iter().map(|(k, v)| (k, v)))
        .output()
        .await?;
    assert!(
        emitted.status.success(),
        "{}",
        String::from_utf8_lossy(&emitted.stderr)
    );
    watch.wait_for_type("completed", 1, DEADLINE).await?;
    let placed = watch.wait_for_type("placed", 1, DEADLINE).await?[0]
        .event
        .clone()
        .expect("parsed");
    let (trace_id, emit_span) = ids(placed
        .traceparent
        .as_deref()
        .expect("emit sets traceparent"));

    // The coordinator's spans: the trigger, then each step's outcome; the worker's: one per step.
    let spans = receiver
        .wait_until("the workflow's spans", |spans| {
            spans.iter().filter(|s| s.name == "workflow").count() >= 3
                && spans.iter().filter(|s| s.name == "handle").count() >= 2
        })
        .await?;
    let in_trace: Vec<&ExportedSpan> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    let by = |name: &str| -> Vec<&ExportedSpan> {
        in_trace
            .iter()
            .copied()
            .filter(|s| s.name == name)
            .collect()
    };
    let (workflow, handle, attempt) = (by("workflow"), by("handle"), by("attempt"));
    assert_eq!(workflow.len(), 3, "{spans:#?}");
    assert_eq!(handle.len(), 2, "{spans:#?}");
    assert!(workflow.iter().all(|s| s.service == "grizzly-coordinator"));
    // trigger → step 1 runs → its outcome moves the instance on → step 2 runs → its outcome
    // completes the instance: each hop is a child of the one before.
    let trigger = workflow
        .iter()
        .find(|s| s.parent_span_id == emit_span)
        .expect("the trigger's span is a child of emit");
    let first = handle
        .iter()
        .find(|s| s.parent_span_id == trigger.span_id)
        .expect("step 1 runs under the trigger's span");
    let first_attempt = attempt
        .iter()
        .find(|s| s.parent_span_id == first.span_id)
        .expect("step 1's attempt");
    let next = workflow
        .iter()
        .find(|s| s.parent_span_id == first_attempt.span_id)
        .expect("step 1's outcome is handled under its attempt");
    let second = handle
        .iter()
        .find(|s| s.parent_span_id == next.span_id)
        .expect("step 2 runs under the coordinator span that scheduled it");
    let second_attempt = attempt
        .iter()
        .find(|s| s.parent_span_id == second.span_id)
        .expect("step 2's attempt");
    assert!(
        workflow
            .iter()
            .any(|s| s.parent_span_id == second_attempt.span_id),
        "step 2's outcome is handled under its attempt: {workflow:#?}"
    );
    Ok(())
}
