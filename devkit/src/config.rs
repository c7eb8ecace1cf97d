//! Configuration, runtime knobs and observable state of the fake API.
//!
//! Everything here is plain data with serde derives, because the same types
//! travel over the control endpoints (`/_fake/config`, `/_fake/stats`,
//! `/_fake/requests`) so that a separate process (e.g. the offline demo or a
//! load test) can steer a fake it did not start.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Startup configuration for [`crate::FakeMessagesApi::start`].
#[derive(Debug, Clone)]
pub struct FakeApiConfig {
    /// Address to bind. Defaults to `127.0.0.1:0` (ephemeral port), which is
    /// what tests want: no port clashes between parallel tests.
    pub bind: SocketAddr,
    /// Delay before the first byte of every `/v1/*` answer.
    pub latency: Duration,
    /// How plain (non-tool) prompts are answered.
    pub reply: ReplyMode,
    /// Injected failure for `POST /v1/messages`.
    pub failure: FailureMode,
    /// How many requests the in-memory log keeps (oldest dropped first), so a
    /// long-running dev fake does not grow without bound.
    pub max_logged_requests: usize,
}

impl Default for FakeApiConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            latency: Duration::ZERO,
            reply: ReplyMode::Echo,
            failure: FailureMode::None,
            max_logged_requests: 1000,
        }
    }
}

impl FakeApiConfig {
    /// Default config bound to `127.0.0.1:port`.
    pub fn with_port(port: u16) -> Self {
        Self {
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            ..Self::default()
        }
    }
}

/// How the fake answers a prompt that does not ask for a tool call.
///
/// JSON form: `"echo"` or `{"fixed": "text"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyMode {
    /// `fake reply: <first 200 chars of the last user text>`: deterministic
    /// and tied to the prompt, so tests can assert which turn was answered.
    Echo,
    /// Always this text.
    Fixed(String),
}

/// Failure injected into `POST /v1/messages` (other endpoints are unaffected).
///
/// JSON form: `"none"`, `"hang"`, `"stall_mid_stream"`,
/// `{"error_status": 529}`, `{"fail_next": 3}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Answer normally.
    None,
    /// Answer every request with this HTTP status and an Anthropic error body.
    ErrorStatus(u16),
    /// Accept the request and never answer (until shutdown). The CLI only
    /// notices after its `API_TIMEOUT_MS`.
    Hang,
    /// Send `200` + `message_start`, then nothing more (until shutdown).
    /// Beware: Claude Code 2.1 ignores `API_TIMEOUT_MS` once the stream has
    /// started; its idle watchdog fires after 5 min at the earliest
    /// (`CLAUDE_STREAM_IDLE_TIMEOUT_MS` can only raise that), so a worker
    /// needs its own turn deadline. Non-streaming requests answer normally.
    StallMidStream,
    /// The next N requests get a `500 api_error`, then the mode reverts to
    /// [`FailureMode::None`] by itself — models a transient outage.
    FailNext(u32),
}

/// Partial update of the runtime knobs; also the shape of
/// `POST /_fake/config` (all fields optional) and of its answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<ReplyMode>,
}

/// Counters since start (`GET /_fake/stats`). Control requests (`/_fake/*`)
/// are not counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FakeApiStats {
    /// Every non-control request, including unknown paths.
    pub requests: u64,
    /// `POST /v1/messages`, streaming or not.
    pub message_requests: u64,
    /// The subset of `message_requests` with `"stream": true`.
    pub streaming_requests: u64,
    /// `POST /v1/messages/count_tokens`.
    pub count_tokens_requests: u64,
    /// `tool_use` blocks the fake emitted.
    pub tool_calls: u64,
    /// Requests whose last user message carried `tool_result` blocks.
    pub tool_results: u64,
    /// Requests answered by an injected failure (error status, hang, stall).
    pub injected_failures: u64,
    /// Requests to paths the fake does not know (answered 404).
    pub not_found: u64,
}

/// One request as received (`GET /_fake/requests`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedRequest {
    /// 1-based arrival order.
    pub seq: u64,
    pub method: String,
    /// Path plus query, e.g. `/v1/messages?beta=true`.
    pub path: String,
    /// All headers except credentials (`x-api-key`, `authorization`).
    pub headers: Vec<(String, String)>,
    /// Parsed JSON body; a JSON string holding the raw text if it was not
    /// JSON; `null` if empty.
    pub body: serde_json::Value,
}
