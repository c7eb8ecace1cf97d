//! The real Claude Code CLI against the fake. These tests FAIL (never skip)
//! when the CLI is missing: the fake is only worth something if it keeps
//! matching what the genuine CLI sends and accepts.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Claude, DEADLINE};
use grizzly_devkit::{FailureMode, FakeApiConfig, FakeApiHandle, FakeMessagesApi};
use serde_json::{Value, json};

/// Generous per-turn deadline: CLI start-up on a busy 2-core machine.
const TURN: Duration = Duration::from_secs(60);

async fn start() -> FakeApiHandle {
    FakeMessagesApi::start(FakeApiConfig::default())
        .await
        .unwrap()
}

fn assert_ok(result: &Value, expected: &str) {
    assert_eq!(result["is_error"], false, "{result}");
    assert_eq!(result["result"], expected, "{result}");
    assert!(
        result["usage"]["input_tokens"].as_u64().unwrap() > 0,
        "{result}"
    );
    assert!(
        result["usage"]["output_tokens"].as_u64().unwrap() > 0,
        "{result}"
    );
}

/// Text of every message of the last `/v1/messages` request the fake saw.
fn last_request_texts(fake: &FakeApiHandle) -> String {
    fake.requests().last().unwrap().body["messages"].to_string()
}

#[tokio::test]
async fn warm_turns_and_clear() {
    let fake = start().await;
    let mut claude = Claude::spawn(&fake, &["--tools", ""]).unwrap();
    for n in ["one", "two", "three"] {
        let result = claude.turn(&format!("turn {n}"), TURN).await.unwrap();
        assert_ok(&result, &format!("fake reply: turn {n}"));
    }
    assert!(
        last_request_texts(&fake).contains("turn one"),
        "warm: history is resent"
    );

    // `/clear` is answered locally: a result line, but no API call.
    let calls = fake.stats().message_requests;
    let result = claude.turn("/clear", TURN).await.unwrap();
    assert_eq!(result["is_error"], false, "{result}");
    assert_eq!(result["local_command"], "clear", "{result}");
    assert_eq!(fake.stats().message_requests, calls);

    let result = claude.turn("after clear", TURN).await.unwrap();
    assert_ok(&result, "fake reply: after clear");
    assert!(
        !last_request_texts(&fake).contains("turn one"),
        "history reset by /clear"
    );
    assert_eq!(fake.stats().message_requests, 4);
    claude.close().await.unwrap();
}

#[tokio::test]
async fn api_failures_surface_as_error_results() {
    let fake = start().await;
    let mut claude =
        Claude::spawn_with_env(&fake, &["--tools", ""], &[("API_TIMEOUT_MS", "1500")]).unwrap();
    assert_ok(
        &claude.turn("warm up", TURN).await.unwrap(),
        "fake reply: warm up",
    );

    fake.set_failure(FailureMode::FailNext(1));
    let result = claude.turn("doomed", TURN).await.unwrap();
    assert_eq!(result["is_error"], true, "{result}");
    assert_eq!(result["api_error_status"], 500, "{result}");

    // A hung request is only noticed after API_TIMEOUT_MS.
    fake.set_failure(FailureMode::Hang);
    let t0 = Instant::now();
    let result = claude.turn("hung", TURN).await.unwrap();
    assert_eq!(result["is_error"], true, "{result}");
    assert!(
        result["result"].as_str().unwrap().contains("timed out"),
        "{result}"
    );
    assert!(t0.elapsed() >= Duration::from_millis(1500));

    // Same process recovers. The failed prompts stay in the conversation
    // (merged into the next user message), hence `contains`.
    fake.set_failure(FailureMode::None);
    let result = claude.turn("recovered", TURN).await.unwrap();
    assert_eq!(result["is_error"], false, "{result}");
    assert!(
        result["result"].as_str().unwrap().ends_with("recovered"),
        "{result}"
    );
    claude.close().await.unwrap();
}

#[tokio::test]
async fn mcp_tool_round_trip() {
    let fake = start().await;
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls.jsonl");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mcp_emit_event.py");
    let mcp_config = dir.path().join("mcp.json");
    let servers =
        json!({"mcpServers": {"grizzly": {"command": "python3", "args": [fixture, calls]}}});
    std::fs::write(&mcp_config, servers.to_string()).unwrap();
    let mut claude = Claude::spawn(
        &fake,
        &[
            "--tools",
            "",
            "--mcp-config",
            mcp_config.to_str().unwrap(),
            "--allowedTools",
            "mcp__grizzly__emit_event",
            "--permission-mode",
            "bypassPermissions",
        ],
    )
    .unwrap();

    let prompt = r#"record it [[tool:emit_event {"kind":"started","payload":{"n":1}}]]"#;
    let result = claude.turn(prompt, TURN).await.unwrap();
    assert_ok(
        &result,
        "fake reply: tool mcp__grizzly__emit_event done: event recorded: started",
    );
    assert_eq!(result["num_turns"], 2, "{result}");
    // The fixture wrote the call before answering it, so it is on disk by now.
    let recorded: Value = serde_json::from_str(&std::fs::read_to_string(&calls).unwrap()).unwrap();
    assert_eq!(recorded, json!({"kind": "started", "payload": {"n": 1}}));
    let stats = fake.stats();
    assert_eq!(
        (stats.message_requests, stats.tool_calls, stats.tool_results),
        (2, 1, 1)
    );
    claude.close().await.unwrap();
}

/// Measures warm turn latency (stdin line written → `result` line read).
/// The bound is loose; the numbers are printed for humans (`--nocapture`).
#[tokio::test]
async fn warm_turn_latency() {
    let fake = start().await;
    let mut claude = Claude::spawn(&fake, &["--tools", ""]).unwrap();
    let t0 = Instant::now();
    claude.turn("first", TURN).await.unwrap();
    let cold = t0.elapsed();
    let mut samples = Vec::new();
    for i in 0..20 {
        // Clear every few turns so the resent history stays small, as a pooled worker would.
        if i % 5 == 0 {
            claude.turn("/clear", DEADLINE).await.unwrap();
        }
        let t0 = Instant::now();
        let result = claude.turn(&format!("turn {i}"), DEADLINE).await.unwrap();
        samples.push(t0.elapsed());
        assert_ok(&result, &format!("fake reply: turn {i}"));
    }
    samples.sort();
    let (p50, max) = (samples[samples.len() / 2], samples[samples.len() - 1]);
    eprintln!("first turn (incl. CLI start): {cold:?}; warm turns: p50 {p50:?}, max {max:?}");
    assert!(p50 < Duration::from_secs(2), "warm p50 {p50:?}");
    claude.close().await.unwrap();
}
