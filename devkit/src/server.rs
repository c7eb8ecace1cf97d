//! The axum server: `/v1/*` endpoints, failure injection and control routes.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt as _;
use futures::stream;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{
    ConfigPatch, FailureMode, FakeApiConfig, FakeApiStats, RecordedRequest, ReplyMode,
};
use crate::reply::{self, Block, Plan};

/// Text and JSON deltas are streamed in pieces of this many chars, so the
/// CLI's incremental parsing is exercised as with the real API.
const DELTA_CHARS: usize = 48;

/// Entry point: `FakeMessagesApi::start(config)`.
pub struct FakeMessagesApi;

impl FakeMessagesApi {
    /// Binds `config.bind` and serves in a background task until the handle
    /// is shut down or dropped.
    pub async fn start(config: FakeApiConfig) -> anyhow::Result<FakeApiHandle> {
        let listener = tokio::net::TcpListener::bind(config.bind)
            .await
            .with_context(|| format!("binding fake Anthropic API on {}", config.bind))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            knobs: Mutex::new(Knobs {
                latency: config.latency,
                failure: config.failure,
                reply: config.reply,
            }),
            counters: Counters::default(),
            log: Mutex::new(VecDeque::new()),
            max_logged: config.max_logged_requests,
            seen: watch::Sender::new(0),
            cancel: CancellationToken::new(),
            ids: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/v1/messages", post(messages))
            .route("/v1/messages/count_tokens", post(count_tokens))
            .route("/_fake/config", get(get_config).post(post_config))
            .route("/_fake/stats", get(get_stats))
            .route("/_fake/requests", get(get_requests).delete(delete_requests))
            .fallback(not_found)
            .with_state(shared.clone());
        let cancel = shared.cancel.clone();
        let task = tokio::spawn(async move {
            // Graceful shutdown waits for open responses; hangs and stalls
            // watch the same token so they end instead of blocking it.
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(cancel.cancelled_owned())
                .await;
            if let Err(e) = served {
                warn!(error = %e, "fake Anthropic API server failed");
            }
        });
        info!(%addr, "fake Anthropic API listening");
        Ok(FakeApiHandle {
            addr,
            shared,
            task: Some(task),
        })
    }
}

/// Control handle of a running fake. Dropping it stops the server.
pub struct FakeApiHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl FakeApiHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, the value for `ANTHROPIC_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Environment that points a Claude Code CLI at this fake (add your own
    /// `HOME`, and `IS_SANDBOX=1` when running as root with bypassed permissions).
    pub fn claude_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("ANTHROPIC_BASE_URL", self.base_url()),
            ("ANTHROPIC_API_KEY", "sk-test".into()),
            ("DISABLE_TELEMETRY", "1".into()),
            ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1".into()),
            ("CLAUDE_CODE_MAX_RETRIES", "0".into()),
        ]
    }

    pub fn set_latency(&self, latency: Duration) {
        self.shared.knobs.lock().unwrap().latency = latency;
    }

    pub fn set_failure(&self, failure: FailureMode) {
        self.shared.knobs.lock().unwrap().failure = failure;
    }

    pub fn set_reply(&self, reply: ReplyMode) {
        self.shared.knobs.lock().unwrap().reply = reply;
    }

    /// Applies a partial update (same as `POST /_fake/config`); returns the
    /// resulting knobs.
    pub fn apply(&self, patch: ConfigPatch) -> ConfigPatch {
        self.shared.apply(patch)
    }

    pub fn stats(&self) -> FakeApiStats {
        self.shared.counters.snapshot()
    }

    /// The logged requests, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.log.lock().unwrap().iter().cloned().collect()
    }

    pub fn clear_requests(&self) {
        self.shared.log.lock().unwrap().clear();
    }

    /// Resolves once at least `n` non-control requests have arrived (counted
    /// since start, not cleared by [`Self::clear_requests`]). Lets tests
    /// synchronise on "the CLI has called us" without sleeping.
    pub async fn wait_for_requests(&self, n: u64) {
        let mut rx = self.shared.seen.subscribe();
        // Err only if the sender is gone, which cannot happen while `self` lives.
        let _ = rx.wait_for(|seen| *seen >= n).await;
    }

    /// Stops accepting, ends hung/stalled responses and waits for the server
    /// task (bounded, so a stuck client cannot block a test's teardown).
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.shared.cancel.cancel();
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
                anyhow::bail!("fake Anthropic API did not shut down within 5s");
            }
        }
        Ok(())
    }
}

impl Drop for FakeApiHandle {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}

struct Knobs {
    latency: Duration,
    failure: FailureMode,
    reply: ReplyMode,
}

struct Shared {
    knobs: Mutex<Knobs>,
    counters: Counters,
    log: Mutex<VecDeque<RecordedRequest>>,
    max_logged: usize,
    /// Count of non-control requests, observable by `wait_for_requests`.
    seen: watch::Sender<u64>,
    cancel: CancellationToken,
    ids: AtomicU64,
}

impl Shared {
    fn apply(&self, patch: ConfigPatch) -> ConfigPatch {
        let mut k = self.knobs.lock().unwrap();
        if let Some(ms) = patch.latency_ms {
            k.latency = Duration::from_millis(ms);
        }
        if let Some(f) = patch.failure {
            k.failure = f;
        }
        if let Some(r) = patch.reply {
            k.reply = r;
        }
        ConfigPatch {
            latency_ms: Some(k.latency.as_millis() as u64),
            failure: Some(k.failure),
            reply: Some(k.reply.clone()),
        }
    }

    /// Logs and counts a request; returns its parsed body.
    fn record(&self, method: &Method, uri: &Uri, headers: &HeaderMap, body: &Bytes) -> Value {
        let parsed = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
        };
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let mut seq = 0;
        self.seen.send_modify(|n| {
            *n += 1;
            seq = *n;
        });
        let path = uri
            .path_and_query()
            .map_or_else(|| uri.path().to_string(), |pq| pq.to_string());
        debug!(seq, %method, %path, "fake API request");
        let headers = headers
            .iter()
            .filter(|(name, _)| !matches!(name.as_str(), "x-api-key" | "authorization"))
            .map(|(name, v)| {
                (
                    name.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let mut log = self.log.lock().unwrap();
        if self.max_logged > 0 {
            if log.len() >= self.max_logged {
                log.pop_front();
            }
            log.push_back(RecordedRequest {
                seq,
                method: method.to_string(),
                path,
                headers,
                body: parsed.clone(),
            });
        }
        parsed
    }

    /// Waits the configured latency; false if the server is shutting down.
    async fn delay(&self) -> bool {
        let latency = self.knobs.lock().unwrap().latency;
        if latency.is_zero() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(latency) => true,
            _ = self.cancel.cancelled() => false,
        }
    }

    fn next_id(&self, prefix: &str) -> String {
        let n = self.ids.fetch_add(1, Ordering::Relaxed) + 1;
        format!("{prefix}_fake{n:012}")
    }
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    message_requests: AtomicU64,
    streaming_requests: AtomicU64,
    count_tokens_requests: AtomicU64,
    tool_calls: AtomicU64,
    tool_results: AtomicU64,
    injected_failures: AtomicU64,
    not_found: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> FakeApiStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FakeApiStats {
            requests: g(&self.requests),
            message_requests: g(&self.message_requests),
            streaming_requests: g(&self.streaming_requests),
            count_tokens_requests: g(&self.count_tokens_requests),
            tool_calls: g(&self.tool_calls),
            tool_results: g(&self.tool_results),
            injected_failures: g(&self.injected_failures),
            not_found: g(&self.not_found),
        }
    }
}

type AppState = State<Arc<Shared>>;

/// Anthropic-style error: `{"type":"error","error":{"type":..,"message":..}}`.
fn api_error(status: StatusCode, message: impl Into<String>) -> Response {
    let kind = match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    };
    let body = json!({"type": "error", "error": {"type": kind, "message": message.into()}});
    (status, Json(body)).into_response()
}

/// Rough token count for `usage` (~4 bytes per token); exactness is not the
/// point, non-zero plausible numbers in the CLI's `result` line are.
fn approx_tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4).max(1)
}

async fn messages(
    State(shared): AppState,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = shared.record(&method, &uri, &headers, &body);
    let c = &shared.counters;
    c.message_requests.fetch_add(1, Ordering::Relaxed);
    let streaming = req["stream"] == true;
    if streaming {
        c.streaming_requests.fetch_add(1, Ordering::Relaxed);
    }
    if !shared.delay().await {
        return api_error(StatusCode::SERVICE_UNAVAILABLE, "fake API shutting down");
    }

    // Decide the failure and consume a FailNext credit atomically, so
    // concurrent requests never fail more than N times in total.
    let (failure, mode) = {
        let mut k = shared.knobs.lock().unwrap();
        let failure = k.failure;
        if let FailureMode::FailNext(n) = failure {
            k.failure = if n > 1 {
                FailureMode::FailNext(n - 1)
            } else {
                FailureMode::None
            };
        }
        (failure, k.reply.clone())
    };
    match failure {
        FailureMode::None | FailureMode::StallMidStream | FailureMode::FailNext(0) => {}
        FailureMode::ErrorStatus(code) => {
            c.injected_failures.fetch_add(1, Ordering::Relaxed);
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return api_error(status, format!("fake injected error {code}"));
        }
        FailureMode::FailNext(_) => {
            c.injected_failures.fetch_add(1, Ordering::Relaxed);
            return api_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "fake injected error (fail_next)",
            );
        }
        FailureMode::Hang => {
            c.injected_failures.fetch_add(1, Ordering::Relaxed);
            shared.cancel.cancelled().await;
            return api_error(StatusCode::SERVICE_UNAVAILABLE, "fake API shutting down");
        }
    }

    let analysis = reply::plan(&req, &mode, || shared.next_id("toolu"));
    if analysis.saw_tool_result {
        c.tool_results.fetch_add(1, Ordering::Relaxed);
    }
    let plan = analysis.plan;
    let tool_calls = plan
        .blocks
        .iter()
        .filter(|b| matches!(b, Block::ToolUse { .. }))
        .count();
    let model = req["model"].as_str().unwrap_or("claude-fake").to_string();
    let input_tokens = approx_tokens(body.len());
    let msg_id = shared.next_id("msg");

    if streaming && failure == FailureMode::StallMidStream {
        c.injected_failures.fetch_add(1, Ordering::Relaxed);
        let start = message_start(&msg_id, &model, input_tokens);
        // After message_start, wait for shutdown and then end the body; the
        // client sees a truncated stream.
        let rest = stream::once(shared.cancel.clone().cancelled_owned())
            .filter_map(|()| async { None::<Event> });
        let events = stream::iter([start]).chain(rest);
        return Sse::new(events.map(Ok::<_, Infallible>)).into_response();
    }
    c.tool_calls.fetch_add(tool_calls as u64, Ordering::Relaxed);
    debug!(%msg_id, stop_reason = plan.stop_reason, tool_calls, "fake API reply");

    if streaming {
        let events = sse_events(&plan, &msg_id, &model, input_tokens);
        Sse::new(stream::iter(events.into_iter().map(Ok::<_, Infallible>))).into_response()
    } else {
        // Non-streaming answers are not used by Claude Code 2.1 for turns, but
        // keep them valid for other clients (and StallMidStream degrades to
        // a normal answer here: there is no stream to stall).
        Json(json!({
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": plan.blocks.iter().map(block_json).collect::<Vec<_>>(),
            "stop_reason": plan.stop_reason,
            "stop_sequence": null,
            "usage": usage(input_tokens, plan.output_tokens()),
        }))
        .into_response()
    }
}

fn usage(input_tokens: u64, output_tokens: u64) -> Value {
    json!({
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    })
}

fn block_json(b: &Block) -> Value {
    match b {
        Block::Text(text) => json!({"type": "text", "text": text}),
        Block::ToolUse { id, name, input } => {
            json!({"type": "tool_use", "id": id, "name": name, "input": input})
        }
    }
}

fn event(name: &str, data: Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

fn message_start(id: &str, model: &str, input_tokens: u64) -> Event {
    event(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": usage(input_tokens, 1),
        }}),
    )
}

fn chunks(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let cut = rest
            .char_indices()
            .nth(DELTA_CHARS)
            .map_or(rest.len(), |(i, _)| i);
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    out
}

/// The full SSE sequence of the real API for one message.
fn sse_events(plan: &Plan, id: &str, model: &str, input_tokens: u64) -> Vec<Event> {
    let mut out = vec![
        message_start(id, model, input_tokens),
        event("ping", json!({"type": "ping"})),
    ];
    for (index, block) in plan.blocks.iter().enumerate() {
        let (start, deltas) = match block {
            Block::Text(text) => (
                json!({"type": "text", "text": ""}),
                chunks(text)
                    .into_iter()
                    .map(|t| json!({"type": "text_delta", "text": t}))
                    .collect::<Vec<_>>(),
            ),
            Block::ToolUse { id, name, input } => (
                json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                chunks(&input.to_string())
                    .into_iter()
                    .map(|p| json!({"type": "input_json_delta", "partial_json": p}))
                    .collect(),
            ),
        };
        out.push(event(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": start}),
        ));
        out.extend(deltas.into_iter().map(|delta| {
            event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": delta}),
            )
        }));
        out.push(event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
    }
    out.push(event(
        "message_delta",
        json!({"type": "message_delta",
               "delta": {"stop_reason": plan.stop_reason, "stop_sequence": null},
               "usage": {"output_tokens": plan.output_tokens()}}),
    ));
    out.push(event("message_stop", json!({"type": "message_stop"})));
    out
}

async fn count_tokens(
    State(shared): AppState,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.record(&method, &uri, &headers, &body);
    shared
        .counters
        .count_tokens_requests
        .fetch_add(1, Ordering::Relaxed);
    if !shared.delay().await {
        return api_error(StatusCode::SERVICE_UNAVAILABLE, "fake API shutting down");
    }
    Json(json!({"input_tokens": approx_tokens(body.len())})).into_response()
}

async fn not_found(State(shared): AppState, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 16 << 20)
        .await
        .unwrap_or_default();
    shared.record(&parts.method, &parts.uri, &parts.headers, &body);
    shared.counters.not_found.fetch_add(1, Ordering::Relaxed);
    // Warn, not debug: an unknown path means the CLI grew a dependency the
    // fake does not serve yet.
    warn!(method = %parts.method, uri = %parts.uri, "fake API: unknown path");
    api_error(
        StatusCode::NOT_FOUND,
        format!(
            "fake API does not serve {} {}",
            parts.method,
            parts.uri.path()
        ),
    )
}

async fn get_config(State(shared): AppState) -> Json<ConfigPatch> {
    Json(shared.apply(ConfigPatch::default()))
}

async fn post_config(State(shared): AppState, Json(patch): Json<ConfigPatch>) -> Json<ConfigPatch> {
    info!(?patch, "fake API config change");
    Json(shared.apply(patch))
}

async fn get_stats(State(shared): AppState) -> Json<FakeApiStats> {
    Json(shared.counters.snapshot())
}

async fn get_requests(State(shared): AppState) -> Json<Vec<RecordedRequest>> {
    Json(shared.log.lock().unwrap().iter().cloned().collect())
}

async fn delete_requests(State(shared): AppState) -> StatusCode {
    shared.log.lock().unwrap().clear();
    StatusCode::NO_CONTENT
}
