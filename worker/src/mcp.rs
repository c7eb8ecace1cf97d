//! The MCP stdio server (`grizzly-worker mcp`) that gives Claude Code agents one tool,
//! `emit_event`, which appends an event to `EVENTS` and answers with its id and stream sequence.
//!
//! Each Claude instance starts its own server (named in the instance's `--mcp-config`). Before
//! every turn the worker writes a [`TurnContext`] to the file named by `GRIZZLY_TURN_FILE`; the
//! server reads it on each call, so an emitted event is `caused` by the handled event (same
//! correlation id and trace) and gets a deterministic id — cause + handler + `mcp` + the call's
//! number within the turn — so a retried turn that emits the same events is de-duplicated by the
//! stream. Without a turn context (a server started by hand) events are new and need an explicit
//! aggregate. stdout is the protocol: logs go to stderr.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::message::PublishMessage;
use grizzly_shared::nats::{self, Nats, publish_confirmed};
use grizzly_shared::subject::is_valid_token;
use grizzly_shared::{EventEnvelope, EventSubject};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    JsonObject, ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler, ServiceExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::OnceCell;

/// Env var naming the turn-context file.
pub const TURN_FILE_ENV: &str = "GRIZZLY_TURN_FILE";
/// Env var naming the broker when the turn context does not.
pub const NATS_URL_ENV: &str = "GRIZZLY_NATS_URL";
pub const TOOL_NAME: &str = "emit_event";
/// A publish the broker does not confirm by then fails the tool call (instead of hanging the turn).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(20);

/// What the worker tells the MCP server about the turn in progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TurnContext {
    /// Changes every turn; restarts the per-turn call counter.
    pub turn: u64,
    pub handler: String,
    pub nats_url: String,
    /// The handled event (its `data` left out: only the ids, aggregate and trace matter).
    pub event: EventEnvelope,
    /// The server appends one JSON line per emitted event here, for the outcome's `emitted`.
    pub emitted_file: PathBuf,
    /// The handler's `emits` patterns (see `grizzly_shared::handler::may_emit`).
    #[serde(default)]
    pub emits: Vec<String>,
}

impl TurnContext {
    /// Writes atomically (temp file + rename), so the server never reads half a context.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(self)?)?;
        std::fs::rename(&tmp, path)
    }
}

/// Appends one JSON line for the worker (best effort: logged when it cannot be written).
fn record_line(path: &Path, line: &Value) {
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = appended {
        tracing::warn!(error = %e, "cannot record the emission for the worker");
    }
}

/// Arguments of `emit_event`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmitArgs {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    data: Value,
    aggregate_type: Option<String>,
    aggregate_id: Option<String>,
}

struct EmitServer {
    turn_file: Option<PathBuf>,
    nats: OnceCell<Nats>,
    /// (turn, calls so far in that turn).
    calls: Mutex<(u64, u64)>,
}

fn tool() -> Tool {
    let schema = json!({
        "type": "object",
        "properties": {
            "type": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$",
                     "description": "Event type, e.g. summary_ready"},
            "data": {"description": "Event payload (any JSON)"},
            "aggregate_type": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$",
                               "description": "Defaults to the handled event's aggregate type"},
            "aggregate_id": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$",
                             "description": "Defaults to the handled event's aggregate id"}
        },
        "required": ["type"],
        "additionalProperties": false
    });
    let Value::Object(schema) = schema else {
        unreachable!("literal object")
    };
    Tool::new(
        TOOL_NAME,
        "Append an event to the Grizzly event log. Returns the new event's id and stream sequence.",
        schema,
    )
}

impl EmitServer {
    fn context(&self) -> Result<Option<TurnContext>, String> {
        let Some(path) = &self.turn_file else {
            return Ok(None);
        };
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("turn context {} is invalid: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read turn context {}: {e}", path.display())),
        }
    }

    /// The number of this call within the turn (0, 1, ...).
    fn next_call(&self, turn: u64) -> u64 {
        let mut calls = self.calls.lock().expect("calls lock");
        if calls.0 != turn {
            *calls = (turn, 0);
        }
        calls.1 += 1;
        calls.1 - 1
    }

    async fn emit(&self, args: JsonObject) -> Result<String, String> {
        let args: EmitArgs = serde_json::from_value(Value::Object(args))
            .map_err(|e| format!("invalid arguments: {e}"))?;
        if !is_valid_token(&args.event_type) {
            return Err(format!(
                "invalid `type` {:?}: it must match [A-Za-z0-9_-]+",
                args.event_type
            ));
        }
        let ctx = self.context()?;
        let (aggregate_type, aggregate_id) = match (&ctx, args.aggregate_type, args.aggregate_id) {
            (_, Some(t), Some(i)) => (t, i),
            (Some(c), t, i) => (
                t.unwrap_or_else(|| c.event.aggregatetype.clone()),
                i.unwrap_or_else(|| c.event.aggregateid.clone()),
            ),
            (None, _, _) => {
                return Err(
                    "`aggregate_type` and `aggregate_id` are required outside a handler turn"
                        .into(),
                );
            }
        };
        let subject = EventSubject::new(aggregate_type, aggregate_id, &args.event_type)
            .map_err(|e| e.to_string())?;
        // The agent may be steered by what it reads: only what its handler allows gets in.
        grizzly_shared::handler::may_emit(ctx.as_ref().map_or(&[][..], |c| &c.emits), &subject)
            .map_err(|e| format!("refused: {e}"))?;
        let envelope = match &ctx {
            Some(c) => {
                let n = self.next_call(c.turn).to_string();
                let source = format!("grizzly/handler/{}", c.handler);
                c.event
                    .caused(&subject, &source, args.data, &[&c.handler, "mcp", &n])
            }
            None => EventEnvelope::new(&subject, "grizzly/mcp", args.data),
        };
        // A child of the Claude turn (its context is in the turn file); the event carries this span.
        let span = tracing::debug_span!("mcp_emit_event", otel.kind = "producer", event.id = %envelope.id, subject = %subject);
        if let Some(c) = &ctx {
            grizzly_shared::trace::follow(&span, &c.event);
        }
        let mut envelope = envelope;
        grizzly_shared::trace::stamp(&mut envelope, &span);
        let url = ctx
            .as_ref()
            .map(|c| c.nats_url.clone())
            .or_else(|| std::env::var(NATS_URL_ENV).ok())
            .unwrap_or_else(|| grizzly_shared::Settings::default().nats_url);
        // Connecting and the confirmed publish share one deadline: a broker that is down for a
        // moment (restarting) is waited for, not reported as a failure at once.
        let subject = subject.to_string();
        let publish = PublishMessage::build()
            .payload(envelope.to_json_bytes())
            .headers(envelope.headers());
        let appended = tokio::time::timeout(PUBLISH_TIMEOUT, async {
            // Returns at once and connects in the background until it succeeds.
            let nats = self
                .nats
                .get_or_try_init(|| nats::connect(&url, "grizzly-mcp", true))
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(publish_confirmed(&nats.js, &subject, publish, None).await)
        })
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the broker did not confirm the event within {PUBLISH_TIMEOUT:?}"
            ))
        });
        let ack = match appended {
            Ok(ack) => ack,
            Err(error) => {
                // The turn must not pass for done with an effect missing: the worker fails the
                // attempt when it finds this line, and the retried turn emits again (same ids).
                if let Some(c) = &ctx {
                    record_line(
                        &c.emitted_file,
                        &json!({"error": error, "subject": subject}),
                    );
                }
                return Err(error);
            }
        };
        let record =
            json!({"id": envelope.id, "subject": subject, "stream_sequence": ack.sequence});
        tracing::info!(%subject, id = %envelope.id, seq = ack.sequence, "event emitted");
        if let Some(c) = &ctx {
            // The event is already durable; this feeds the outcome's `emitted`.
            record_line(&c.emitted_file, &record);
        }
        Ok(record.to_string())
    }
}

impl ServerHandler for EmitServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("grizzly", env!("CARGO_PKG_VERSION")))
            .with_instructions("Use `emit_event` to append events to the Grizzly event log.")
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(vec![tool()]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        if request.name != TOOL_NAME {
            return Err(McpError::invalid_params(
                format!("unknown tool `{}`", request.name),
                None,
            ));
        }
        // Bad input is a tool error (the agent sees it and can correct itself), not a protocol error.
        let result = match self.emit(request.arguments.unwrap_or_default()).await {
            Ok(text) => CallToolResult::success(vec![ContentBlock::text(text)]),
            Err(problem) => {
                tracing::warn!(%problem, "emit_event refused");
                CallToolResult::error(vec![ContentBlock::text(format!(
                    "emit_event failed: {problem}"
                ))])
            }
        };
        Ok(result.into())
    }
}

/// Serves MCP on stdin/stdout until the client (Claude Code) closes stdin.
pub async fn serve_stdio() -> anyhow::Result<()> {
    // Held while serving: flushes this process's spans when Claude Code closes it.
    let _telemetry = grizzly_shared::telemetry::init_as("grizzly-mcp", "text", "warn");
    let server = EmitServer {
        turn_file: std::env::var_os(TURN_FILE_ENV).map(PathBuf::from),
        nats: OnceCell::new(),
        calls: Mutex::new((u64::MAX, 0)),
    };
    let running = server
        .serve(rmcp::transport::stdio())
        .await
        .context("MCP initialization failed")?;
    running.waiting().await.context("MCP server failed")?;
    Ok(())
}
