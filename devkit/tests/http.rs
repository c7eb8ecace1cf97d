//! Plain-HTTP tests of the fake: SSE shape, tool round trip, failure modes
//! and the runtime control endpoints.

mod common;

use std::time::{Duration, Instant};

use common::{DEADLINE, body_text, messages_request, parse_sse, send, send_json};
use grizzly_devkit::{FailureMode, FakeApiConfig, FakeApiHandle, FakeMessagesApi, ReplyMode};
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tokio::time::timeout;

/// How long "nothing happens" is observed for hang/stall: a deadline on an
/// awaited response, not a sleep.
const QUIET: Duration = Duration::from_millis(300);

async fn start() -> FakeApiHandle {
    FakeMessagesApi::start(FakeApiConfig::default())
        .await
        .unwrap()
}

/// POSTs a streaming request and returns the parsed SSE events.
async fn stream(fake: &FakeApiHandle, body: Value) -> Vec<(String, Value)> {
    let resp = send(fake.addr(), "POST", "/v1/messages?beta=true", Some(body))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    parse_sse(&body_text(resp).await.unwrap())
}

/// Concatenated text and tool-input deltas of a stream.
fn collect_deltas(events: &[(String, Value)]) -> (String, String) {
    let (mut text, mut json) = (String::new(), String::new());
    for (_, data) in events {
        let d = &data["delta"];
        match d["type"].as_str() {
            Some("text_delta") => text.push_str(d["text"].as_str().unwrap()),
            Some("input_json_delta") => json.push_str(d["partial_json"].as_str().unwrap()),
            _ => {}
        }
    }
    (text, json)
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": [{"type": "text", "text": text}]})
}

#[tokio::test]
async fn sse_stream_has_the_real_event_shape() {
    let fake = start().await;
    let long = "x".repeat(300);
    let events = stream(&fake, messages_request(json!([user(&long)]), json!([]))).await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    // Event name and data.type agree, and the order is the API's.
    assert!(events.iter().all(|(n, d)| d["type"] == n.as_str()));
    assert_eq!(
        &names[..3],
        ["message_start", "ping", "content_block_start"]
    );
    assert_eq!(
        &names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    assert!(
        names[3..names.len() - 3]
            .iter()
            .all(|n| *n == "content_block_delta")
    );
    assert!(
        names.len() - 6 > 1,
        "long text is streamed in several deltas"
    );

    let start = &events[0].1["message"];
    assert_eq!(start["model"], "claude-test");
    assert_eq!(start["role"], "assistant");
    assert!(start["usage"]["input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        events[2].1["content_block"],
        json!({"type": "text", "text": ""})
    );
    let delta = &events[names.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert!(delta["usage"]["output_tokens"].as_u64().unwrap() > 0);

    let (text, _) = collect_deltas(&events);
    assert_eq!(text, format!("fake reply: {}", "x".repeat(200)));
    let stats = fake.stats();
    assert_eq!(
        (
            stats.requests,
            stats.message_requests,
            stats.streaming_requests
        ),
        (1, 1, 1)
    );
    let log = fake.requests();
    assert_eq!(log[0].path, "/v1/messages?beta=true");
    assert!(
        log[0].headers.iter().all(|(k, _)| k != "x-api-key"),
        "credentials are not logged"
    );
}

#[tokio::test]
async fn non_streaming_count_tokens_and_fixed_reply() {
    let fake = start().await;
    fake.set_reply(ReplyMode::Fixed("always this".into()));
    let mut req = messages_request(json!([user("hi")]), json!([]));
    req["stream"] = json!(false);
    let (status, msg) = send_json(fake.addr(), "POST", "/v1/messages", Some(req.clone()))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(msg["type"], "message");
    assert_eq!(
        msg["content"],
        json!([{"type": "text", "text": "always this"}])
    );
    assert_eq!(msg["stop_reason"], "end_turn");
    assert!(msg["usage"]["output_tokens"].as_u64().unwrap() > 0);

    let (status, count) = send_json(fake.addr(), "POST", "/v1/messages/count_tokens", Some(req))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(count["input_tokens"].as_u64().unwrap() > 0);
    let stats = fake.stats();
    assert_eq!(
        (
            stats.message_requests,
            stats.streaming_requests,
            stats.count_tokens_requests
        ),
        (1, 0, 1)
    );
}

#[tokio::test]
async fn unknown_paths_get_anthropic_style_404() {
    let fake = start().await;
    let (status, body) = send_json(fake.addr(), "GET", "/v1/models", None)
        .await
        .unwrap();
    assert_eq!(status, 404);
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "not_found_error");
    assert_eq!(fake.stats().not_found, 1);
    assert_eq!(fake.requests()[0].path, "/v1/models");
}

#[tokio::test]
async fn tool_use_round_trip() {
    let fake = start().await;
    let tools = json!([{"name": "other", "input_schema": {}},
                       {"name": "mcp__grizzly__emit_event", "input_schema": {}}]);
    let prompt = user(r#"please [[tool:emit_event {"kind":"started","payload":{"n":[1,2]}}]] now"#);
    let events = stream(&fake, messages_request(json!([prompt]), tools.clone())).await;

    let block = &events
        .iter()
        .find(|(n, _)| n == "content_block_start")
        .unwrap()
        .1["content_block"];
    assert_eq!(block["type"], "tool_use");
    assert_eq!(block["name"], "mcp__grizzly__emit_event");
    assert_eq!(block["input"], json!({}));
    let id = block["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("toolu_"));
    let (_, partial) = collect_deltas(&events);
    let input: Value = serde_json::from_str(&partial).unwrap();
    assert_eq!(input, json!({"kind": "started", "payload": {"n": [1, 2]}}));
    let delta = &events.iter().find(|(n, _)| n == "message_delta").unwrap().1;
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");

    // The follow-up carries the tool result as the last user message.
    let history = json!([
        prompt,
        {"role": "assistant", "content": [{"type": "tool_use", "id": id,
            "name": "mcp__grizzly__emit_event", "input": input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": id,
            "content": [{"type": "text", "text": "event recorded"}]}]},
    ]);
    let events = stream(&fake, messages_request(history, tools)).await;
    let (text, _) = collect_deltas(&events);
    assert_eq!(
        text,
        "fake reply: tool mcp__grizzly__emit_event done: event recorded"
    );
    let delta = &events.iter().find(|(n, _)| n == "message_delta").unwrap().1;
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    let stats = fake.stats();
    assert_eq!((stats.tool_calls, stats.tool_results), (1, 1));
}

#[tokio::test]
async fn marker_without_matching_tool_answers_text() {
    let fake = start().await;
    let events = stream(
        &fake,
        messages_request(json!([user("[[tool:emit_event]]")]), json!([])),
    )
    .await;
    assert_eq!(
        collect_deltas(&events).0,
        "fake reply: no tool matching emit_event (available: )"
    );
    assert_eq!(fake.stats().tool_calls, 0);
}

#[tokio::test]
async fn error_status_persists_until_reset() {
    let fake = start().await;
    fake.set_failure(FailureMode::ErrorStatus(529));
    let req = messages_request(json!([user("hi")]), json!([]));
    for _ in 0..2 {
        let (status, body) = send_json(fake.addr(), "POST", "/v1/messages", Some(req.clone()))
            .await
            .unwrap();
        assert_eq!(status, 529);
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "overloaded_error");
    }
    fake.set_failure(FailureMode::None);
    assert_eq!(stream(&fake, req).await.len(), 7);
    assert_eq!(fake.stats().injected_failures, 2);
}

#[tokio::test]
async fn fail_next_recovers_by_itself() {
    let fake = start().await;
    fake.set_failure(FailureMode::FailNext(2));
    let req = messages_request(json!([user("hi")]), json!([]));
    for _ in 0..2 {
        let (status, body) = send_json(fake.addr(), "POST", "/v1/messages", Some(req.clone()))
            .await
            .unwrap();
        assert_eq!(status, 500);
        assert_eq!(body["error"]["type"], "api_error");
    }
    assert_eq!(
        collect_deltas(&stream(&fake, req).await).0,
        "fake reply: hi"
    );
    let (_, cfg) = send_json(fake.addr(), "GET", "/_fake/config", None)
        .await
        .unwrap();
    assert_eq!(cfg["failure"], "none");
}

#[tokio::test]
async fn hang_never_answers_until_shutdown() {
    let fake = start().await;
    fake.set_failure(FailureMode::Hang);
    let (addr, req) = (
        fake.addr(),
        messages_request(json!([user("hi")]), json!([])),
    );
    let mut pending = tokio::spawn(async move {
        let resp = send(addr, "POST", "/v1/messages", Some(req)).await?;
        anyhow::Ok(resp.status().as_u16())
    });
    // The request arrives, but no response head within the quiet window.
    timeout(DEADLINE, fake.wait_for_requests(1)).await.unwrap();
    assert!(
        timeout(QUIET, &mut pending).await.is_err(),
        "hung request was answered"
    );
    assert_eq!(fake.stats().injected_failures, 1);

    // Shutdown releases the hung handler instead of waiting forever.
    fake.shutdown().await.unwrap();
    let status = timeout(DEADLINE, pending).await.unwrap().unwrap().unwrap();
    assert_eq!(status, 503);
}

#[tokio::test]
async fn stall_mid_stream_sends_message_start_then_nothing() {
    let fake = start().await;
    fake.set_failure(FailureMode::StallMidStream);
    let req = messages_request(json!([user("hi")]), json!([]));
    let resp = send(fake.addr(), "POST", "/v1/messages", Some(req))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = timeout(DEADLINE, body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let first = String::from_utf8(first.into_data().unwrap().to_vec()).unwrap();
    let events = parse_sse(&first);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, "message_start");
    assert!(
        timeout(QUIET, body.frame()).await.is_err(),
        "stalled stream continued"
    );

    // Shutdown ends the stalled body (truncated: no message_stop ever came).
    fake.shutdown().await.unwrap();
    let rest = timeout(DEADLINE, body.collect()).await.unwrap();
    assert!(rest.map_or(true, |b| b.to_bytes().is_empty()));
}

#[tokio::test]
async fn latency_delays_the_first_byte() {
    let fake = start().await;
    fake.set_latency(Duration::from_millis(300));
    let t0 = Instant::now();
    let resp = send(
        fake.addr(),
        "POST",
        "/v1/messages",
        Some(messages_request(json!([user("hi")]), json!([]))),
    )
    .await
    .unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn control_endpoints_drive_the_fake_over_http() {
    let fake = start().await;
    let (status, cfg) = send_json(
        fake.addr(),
        "POST",
        "/_fake/config",
        Some(json!({"latency_ms": 5, "failure": {"error_status": 503}, "reply": {"fixed": "ok"}})),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        cfg,
        json!({"latency_ms": 5, "failure": {"error_status": 503}, "reply": {"fixed": "ok"}})
    );

    let req = messages_request(json!([user("hi")]), json!([]));
    let (status, _) = send_json(fake.addr(), "POST", "/v1/messages", Some(req.clone()))
        .await
        .unwrap();
    assert_eq!(status, 503);

    // Partial update: only the failure changes.
    let (_, cfg) = send_json(
        fake.addr(),
        "POST",
        "/_fake/config",
        Some(json!({"failure": "none"})),
    )
    .await
    .unwrap();
    assert_eq!(cfg["latency_ms"], 5);
    assert_eq!(collect_deltas(&stream(&fake, req).await).0, "ok");

    let (_, stats) = send_json(fake.addr(), "GET", "/_fake/stats", None)
        .await
        .unwrap();
    assert_eq!(stats, serde_json::to_value(fake.stats()).unwrap());
    assert_eq!(
        (
            stats["requests"].as_u64(),
            stats["injected_failures"].as_u64()
        ),
        (Some(2), Some(1))
    );

    let (_, log) = send_json(fake.addr(), "GET", "/_fake/requests", None)
        .await
        .unwrap();
    assert_eq!(log.as_array().unwrap().len(), 2);
    assert_eq!(log[1]["body"]["messages"][0]["content"][0]["text"], "hi");
    let (status, _) = send_json(fake.addr(), "DELETE", "/_fake/requests", None)
        .await
        .unwrap();
    assert_eq!(status, 204);
    assert!(fake.requests().is_empty());

    let resp = send(
        fake.addr(),
        "POST",
        "/_fake/config",
        Some(json!({"failure": "bogus"})),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 422, "bad knobs are rejected, not ignored");
}
