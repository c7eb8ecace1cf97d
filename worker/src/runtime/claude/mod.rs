//! `claude`: a warm pool of long-lived Claude Code processes (`claude -p` in stream-json mode,
//! see [`instance`]); each event is one turn on one instance.
//!
//! Per event: render the handler's prompt template (minijinja; variables `event`, `data`,
//! `task`, `attempt`), check out an instance (with `session: per_aggregate`, preferably the one
//! holding the aggregate's conversation), write the MCP turn context, run the turn under the
//! handler's deadline, and record usage, cost, session, turns, instance and the events the agent
//! emitted through MCP. Conversations are reset with `/clear` between events (fresh mode), when
//! an instance switches aggregates (per-aggregate mode), and after every failed turn — after the
//! result is returned, so the reset costs the event nothing. A turn past its deadline is
//! interrupted and its process killed; a dead or hung process is replaced.

pub mod instance;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::future::BoxFuture;
use grizzly_shared::handler::{LoadedHandler, SessionMode};
use grizzly_shared::{Settings, trace};
use minijinja::value::Serde;
use minijinja::{Environment, UndefinedBehavior, context};
use serde_json::{Value, json};
use tokio::sync::OnceCell;
use tokio::time::{Instant, timeout_at};
use tracing::{Instrument as _, debug, warn};

pub use instance::{ClaudeInstance, Launch, TurnError};

use super::{HandlerResult, Invocation, InvokeError, Runtime};
use crate::pool::{Lease, Pool};

/// Idle instances above `pool.min` are stopped after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

pub struct ClaudeRuntime {
    handler: String,
    nats_url: String,
    /// The handler's `emits` patterns, passed to its agents' MCP server each turn.
    emits: Vec<String>,
    session: SessionMode,
    templates: Environment<'static>,
    pool: Pool<ClaudeInstance>,
    /// `pool.min` instances are started once, before the first checkout, so a checkout racing
    /// the pre-warm cannot push the pool over `max`.
    prewarmed: Arc<OnceCell<()>>,
}

impl ClaudeRuntime {
    pub fn new(handler: &LoadedHandler, settings: &Settings) -> anyhow::Result<Self> {
        let spec = &handler.spec;
        let template = handler.prompt_template.clone().with_context(|| {
            format!(
                "{}: a claude handler needs a prompt template",
                handler.path.display()
            )
        })?;
        let templates = templates(template)
            .with_context(|| format!("{}: invalid prompt template", handler.path.display()))?;
        let launch = Arc::new(Launch::new(spec, settings)?);
        let spawner = Arc::new(move || {
            let launch = launch.clone();
            Box::pin(async move { ClaudeInstance::start(&launch).await }) as BoxFuture<'static, _>
        });
        let pool = Pool::new(spec.pool.min, spec.pool_max(), IDLE_TIMEOUT, spawner);
        let prewarmed = Arc::new(OnceCell::new());
        let (cell, warm) = (prewarmed.clone(), pool.clone());
        tokio::spawn(async move {
            cell.get_or_init(|| warm.prewarm()).await;
        });
        Ok(Self {
            handler: spec.name.clone(),
            nats_url: settings.nats_url.clone(),
            emits: spec.emits.clone(),
            session: spec.session,
            templates,
            pool,
            prewarmed,
        })
    }

    pub fn pool(&self) -> &Pool<ClaudeInstance> {
        &self.pool
    }

    async fn run(&self, invocation: &Invocation<'_>) -> Result<HandlerResult, InvokeError> {
        let deadline = Instant::now() + invocation.timeout;
        let timed_out = InvokeError::Timeout(invocation.timeout);
        let event = &invocation.task.event;
        // Render first: a bad template never occupies an instance.
        let prompt = render(&self.templates, invocation)?;
        self.prewarmed.get_or_init(|| self.pool.prewarm()).await;
        let affinity = (self.session == SessionMode::PerAggregate).then(|| event.aggregate_key());
        let mut lease = timeout_at(deadline, self.pool.checkout(affinity.as_deref()))
            .await
            .map_err(|_| timed_out.clone())?
            .map_err(InvokeError::Start)?;
        let instance = &mut lease.instance;
        // Warm: the process already served a turn (so this one paid no start-up).
        let warm = instance.turns > 0;
        // Per-aggregate mode: the instance holds another aggregate's conversation.
        if instance.holds.is_some()
            && instance.holds != affinity
            && let Err(e) = instance.clear().await
        {
            self.pool.checkin(lease, false).await;
            return Err(InvokeError::Crashed(e));
        }
        // The turn's span; the agent's MCP emissions (read from the turn context) are its children.
        let span = tracing::debug_span!("claude_turn", handler = %self.handler, instance = instance.pid, warm);
        trace::follow(&span, event);
        let mut turn_event = event.clone();
        trace::stamp(&mut turn_event, &span);
        if let Err(e) =
            instance.write_turn_context(&self.handler, &self.nats_url, &self.emits, &turn_event)
        {
            self.pool.checkin(lease, false).await;
            return Err(InvokeError::Start(format!(
                "cannot write the MCP turn context: {e}"
            )));
        }
        let outcome = instance.turn(&prompt, deadline).instrument(span).await;
        let pid = instance.pid;
        let result = match outcome {
            Ok(result) => result,
            Err(error) => {
                let error = match error {
                    TurnError::Deadline => timed_out,
                    TurnError::Silent => InvokeError::Crashed(format!(
                        "claude (pid {pid}) produced no output for too long: presumed hung"
                    )),
                    TurnError::Died(what) => InvokeError::Crashed(what),
                };
                warn!(handler = %self.handler, pid, %error, "claude turn failed; replacing the instance");
                self.finish(lease, After::Abort).await;
                return Err(error);
            }
        };
        if result["is_error"] == true {
            // The process is fine; the API or the turn failed. Its text must not leak into the next turn.
            self.finish(lease, After::Clear).await;
            return Err(InvokeError::Failed(error_text(&result)));
        }
        let (emitted, failed): (Vec<Value>, Vec<Value>) = lease
            .instance
            .emitted()
            .into_iter()
            .partition(|e| e.get("error").is_none());
        if let Some(f) = failed.first() {
            // An event the agent meant to append is not in the log: this turn is not done.
            // The retry emits again; what did get in has the same ids and is dropped as a
            // duplicate.
            self.finish(lease, After::Clear).await;
            return Err(InvokeError::Failed(format!(
                "emit_event of {} failed during the turn: {}",
                f["subject"].as_str().unwrap_or("an event"),
                f["error"].as_str().unwrap_or("unknown error")
            )));
        }
        let mut details = serde_json::Map::new();
        for key in ["usage", "total_cost_usd", "session_id", "num_turns"] {
            details.insert(key.into(), result[key].clone());
        }
        details.insert("warm".into(), warm.into());
        details.insert("instance".into(), pid.into());
        details.insert("instance_turn".into(), lease.instance.turns.into());
        if !emitted.is_empty() {
            // The agent's MCP emissions are this handler's emitted events.
            details.insert(
                "emitted".into(),
                emitted.iter().map(|e| e["id"].clone()).collect(),
            );
            details.insert("emitted_events".into(), Value::Array(emitted));
        }
        details.insert("pool".into(), self.state());
        match &affinity {
            Some(aggregate) => {
                lease.instance.holds = Some(aggregate.clone());
                self.finish(lease, After::Keep).await;
            }
            None => self.finish(lease, After::Clear).await,
        }
        Ok(HandlerResult {
            output: result["result"].clone(),
            emitted: Vec::new(),
            details,
        })
    }

    /// Returns an instance to the pool after its turn. A kept conversation goes back at once (the
    /// aggregate's next event must find it); `/clear` and abort run in the background, holding
    /// the pool slot (so the pool stays within `max`) while the outcome is written.
    async fn finish(&self, mut lease: Lease<ClaudeInstance>, after: After) {
        if let After::Keep = after {
            return self.pool.checkin(lease, true).await;
        }
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let healthy = match after {
                After::Clear => match lease.instance.clear().await {
                    Ok(()) => true,
                    Err(e) => {
                        debug!(pid = lease.instance.pid, error = %e, "replacing instance");
                        false
                    }
                },
                _ => {
                    lease.instance.abort().await;
                    false
                }
            };
            pool.checkin(lease, healthy).await;
        });
    }
}

/// The handler's prompt template, compiled once.
fn templates(template: String) -> Result<Environment<'static>, minijinja::Error> {
    let mut templates = Environment::new();
    // A typo in a variable name is an error, not a silently empty prompt; `{% if data.x %}` and
    // `data.x | default(..)` still work for optional fields.
    templates.set_undefined_behavior(UndefinedBehavior::SemiStrict);
    templates.add_template_owned("prompt", template)?;
    Ok(templates)
}

/// Renders the prompt for one event (variables `event`, `data`, `task`, `attempt`); a batch
/// also gets `events` (every envelope, in order) and `batch` (`id`, `size`), while `event`,
/// `data` and `task` are its first event's.
fn render(
    templates: &Environment<'static>,
    invocation: &Invocation<'_>,
) -> Result<String, InvokeError> {
    let task = invocation.task;
    let (events, batch) = match invocation.batch {
        Some(b) => (
            b.tasks.iter().map(|t| &t.event).collect::<Vec<_>>(),
            Some(json!({"id": b.id, "size": b.tasks.len()})),
        ),
        None => (vec![&task.event], None),
    };
    let prompt = templates
        .get_template("prompt")
        .and_then(|t| {
            t.render(context! {
                event => Serde(&task.event),
                data => Serde(&task.event.data),
                task => Serde(task),
                attempt => invocation.attempt,
                events => Serde(&events),
                batch => Serde(&batch),
            })
        })
        .map_err(|e| InvokeError::Failed(format!("rendering the prompt template: {e:#}")))?;
    if prompt.trim().is_empty() {
        return Err(InvokeError::Failed(
            "the prompt template rendered empty text".into(),
        ));
    }
    Ok(prompt)
}

enum After {
    Keep,
    Clear,
    Abort,
}

/// A failed turn's message: the result text, else the subtype and any `errors`.
fn error_text(result: &Value) -> String {
    let text = result["result"].as_str().unwrap_or_default();
    if !text.is_empty() {
        return text.to_string();
    }
    let subtype = result["subtype"].as_str().unwrap_or("error");
    match &result["errors"] {
        Value::Array(errors) if !errors.is_empty() => {
            format!("{subtype}: {}", Value::Array(errors.clone()))
        }
        _ => format!("claude reported {subtype}"),
    }
}

impl Runtime for ClaudeRuntime {
    fn invoke<'a>(
        &'a self,
        invocation: Invocation<'a>,
    ) -> BoxFuture<'a, Result<HandlerResult, InvokeError>> {
        Box::pin(async move { self.run(&invocation).await })
    }

    fn state(&self) -> Value {
        json!(self.pool.stats_now())
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.pool.shutdown(Duration::from_secs(30)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grizzly_shared::{EventEnvelope, EventSubject, Priority, Task};

    fn render(t: &Environment<'static>, task: &Task, attempt: u32) -> Result<String, InvokeError> {
        super::render(
            t,
            &Invocation {
                task,
                attempt,
                timeout: Duration::from_secs(1),
                batch: None,
            },
        )
    }

    #[test]
    fn a_batch_renders_every_event() {
        let t = templates(
            "{{ batch.size }}:{% for e in events %}{{ e.data.n }},{% endfor %}{{ data.n }}".into(),
        )
        .unwrap();
        let tasks = vec![task(json!({"n": 1})), task(json!({"n": 2}))];
        let batch = super::super::BatchInput {
            id: "b1".into(),
            tasks,
        };
        let text = super::render(
            &t,
            &Invocation {
                task: &batch.tasks[0],
                attempt: 1,
                timeout: Duration::from_secs(1),
                batch: Some(&batch),
            },
        )
        .unwrap();
        assert_eq!(text, "2:1,2,1");
    }

    fn task(data: Value) -> Task {
        let subject = EventSubject::new("agent", "a1", "task_requested").unwrap();
        Task::new(
            "summarize",
            1,
            7,
            4,
            Priority::Normal,
            EventEnvelope::new(&subject, "test", data),
        )
    }

    #[test]
    fn renders_the_example_prompt_with_and_without_optional_fields() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../handlers/prompts/summarize.md"
        ))
        .unwrap();
        let t = templates(text).unwrap();
        let bare = render(&t, &task(json!({})), 1).unwrap();
        assert!(
            bare.contains("agent a1") && bare.contains("(no text given)"),
            "{bare}"
        );
        assert!(!bare.contains("[[tool:"), "{bare}");
        let full = render(&t, &task(json!({"text": "hello", "emit": true})), 1).unwrap();
        assert!(
            full.contains("hello") && full.contains("[[tool:emit_event"),
            "{full}"
        );
    }

    #[test]
    fn template_mistakes_are_named() {
        let t = templates("{{ data.missing }} {{ task.event_seq }}".into()).unwrap();
        let err = render(&t, &task(json!({})), 1).unwrap_err().to_string();
        assert!(err.contains("undefined"), "{err}");
        let t = templates("{{ task.event_seq }}/{{ attempt }}".into()).unwrap();
        assert_eq!(render(&t, &task(json!({})), 2).unwrap(), "7/2");
        assert!(templates("{% if %}".into()).is_err());
        let t = templates("{{ data.x | default(\"\") }}".into()).unwrap();
        assert!(
            render(&t, &task(json!({})), 1)
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
    }
}
