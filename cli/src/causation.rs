//! The causation tree behind `grizzly events trace <event-id>`: what one event caused, through
//! handlers and workflows, with timings.
//!
//! [`TraceBuilder`] is fed the log once, in order. Effects are appended after their cause, so a
//! single pass suffices: before the root appears nothing is kept; after it, an event joins the
//! tree when its `causationid` is already in the tree (child of that node), or — when it has no
//! cause in the tree — when its `correlationid` is the root's id (attached to the root as
//! `correlated`). Only the tree's events are held in memory.

use std::collections::HashMap;

use grizzly_shared::EventEnvelope;
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// How a node is attached to its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Relation {
    Root,
    /// Its `causationid` is the parent's id.
    Caused,
    /// No cause in the tree, but its `correlationid` is the root's id.
    Correlated,
}

/// One handler attempt, read from a `handler_succeeded` / `handler_failed` outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HandlerRun {
    pub handler: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u64>,
    pub succeeded: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// When its task was scheduled (stored in `TASKS`), in ms after the root was appended:
    /// the wait before it is routing, the wait after it the worker's (slots, order, throttle).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduled_offset_ms: Option<i64>,
    /// When the attempt started, in ms after the root was appended (successes only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_offset_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One event in the tree.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceNode {
    pub seq: u64,
    pub id: String,
    pub subject: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub source: String,
    pub relation: Relation,
    /// When the log stored it (RFC 3339).
    pub logged: String,
    /// Milliseconds after the root was stored.
    pub offset_ms: i64,
    /// What produced it: `handler <name>`, `workflow <name> step <step>`, or its source.
    pub by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handler_run: Option<HandlerRun>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caused_by: Option<String>,
    pub children: Vec<TraceNode>,
}

impl TraceNode {
    /// Events in this subtree, this one included.
    pub fn event_count(&self) -> usize {
        1 + self
            .children
            .iter()
            .map(TraceNode::event_count)
            .sum::<usize>()
    }

    /// The tree as indented lines, one per event.
    pub fn render(&self) -> String {
        let mut out = format!("{}\n", self.line());
        self.render_children("", &mut out);
        out
    }

    fn render_children(&self, indent: &str, out: &mut String) {
        for (i, child) in self.children.iter().enumerate() {
            let last = i + 1 == self.children.len();
            out.push_str(&format!(
                "{indent}{} {}\n",
                if last { "└─" } else { "├─" },
                child.line()
            ));
            child.render_children(
                &format!("{indent}{}", if last { "   " } else { "│  " }),
                out,
            );
        }
    }

    fn line(&self) -> String {
        let mut line = format!(
            "{}  seq {}  +{}ms  {}",
            self.subject, self.seq, self.offset_ms, self.by
        );
        if let Some(run) = &self.handler_run {
            let mut what = if run.succeeded {
                "succeeded".to_string()
            } else {
                "failed".to_string()
            };
            if let Some(a) = run.attempt {
                what = format!("attempt {a} {what}");
            }
            if let Some(d) = run.duration_ms {
                what.push_str(&format!(" in {d}ms"));
            }
            match (run.scheduled_offset_ms, run.started_offset_ms) {
                (Some(q), Some(s)) => {
                    what.push_str(&format!(" (scheduled +{q}ms, started +{s}ms)"))
                }
                (Some(q), None) => what.push_str(&format!(" (scheduled +{q}ms)")),
                (None, Some(s)) => what.push_str(&format!(" (started +{s}ms)")),
                (None, None) => {}
            }
            if let Some(e) = &run.error {
                what.push_str(&format!(": {}", short(e, 80)));
            }
            line.push_str(&format!(": {what}"));
        }
        match self.relation {
            Relation::Root => {
                if let Some(cause) = &self.caused_by {
                    line.push_str(&format!("  (caused by {cause})"));
                }
            }
            Relation::Correlated => line.push_str("  [correlated, no cause in this tree]"),
            Relation::Caused => {}
        }
        line.push_str(&format!("  id {}", self.id));
        line
    }
}

fn short(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(max).collect::<String>())
    }
}

/// What produced an event, from its attributes: outcome data, the handler source prefix, or the
/// coordinator's step metadata.
fn producer(event: &EventEnvelope) -> String {
    let d = &event.data;
    let s = |k: &str| d.get(k).and_then(Value::as_str);
    if let Some(name) = event.source.strip_prefix("grizzly/handler/") {
        return format!("handler {name}");
    }
    if event.source == grizzly_coordinator::instance::SOURCE {
        let workflow = s("workflow").unwrap_or("?");
        let step = s("step").or_else(|| d.pointer("/_step/step").and_then(Value::as_str));
        return match step {
            Some(step) => format!("workflow {workflow} step {step}"),
            None => format!("workflow {workflow}"),
        };
    }
    format!("from {}", event.source)
}

fn handler_run(event: &EventEnvelope, root_ms: i64) -> Option<HandlerRun> {
    let succeeded = match event.event_type.as_str() {
        "handler_succeeded" => true,
        "handler_failed" => false,
        _ => return None,
    };
    let d = &event.data;
    Some(HandlerRun {
        handler: d.get("handler")?.as_str()?.to_string(),
        version: d.get("handler_version").and_then(Value::as_u64),
        attempt: d.get("attempt").and_then(Value::as_u64),
        succeeded,
        duration_ms: d.get("duration_ms").and_then(Value::as_u64),
        scheduled_offset_ms: d
            .get("scheduled_at")
            .and_then(Value::as_str)
            .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
            .map(|t| unix_ms(t) - root_ms),
        started_offset_ms: d
            .get("started_at_ms")
            .and_then(Value::as_i64)
            .map(|ms| ms - root_ms),
        error: d.get("error").and_then(Value::as_str).map(str::to_string),
    })
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// Builds the tree of one root from events offered in log order.
pub struct TraceBuilder {
    root_id: String,
    root_ms: i64,
    /// Flat nodes with their parent's index; nested by [`TraceBuilder::finish`].
    nodes: Vec<(Option<usize>, TraceNode)>,
    index: HashMap<String, usize>,
}

impl TraceBuilder {
    pub fn new(root_id: &str) -> Self {
        Self {
            root_id: root_id.to_string(),
            root_ms: 0,
            nodes: Vec::new(),
            index: HashMap::new(),
        }
    }

    /// Whether the root has been seen.
    pub fn found(&self) -> bool {
        !self.nodes.is_empty()
    }

    /// Offers the next event of the log (`logged`: when the log stored it).
    pub fn offer(
        &mut self,
        seq: u64,
        logged: OffsetDateTime,
        subject: &str,
        event: &EventEnvelope,
    ) {
        // Ids are unique per effect; a copy appended again later (past the duplicate window)
        // is not a new node.
        if self.index.contains_key(&event.id) {
            return;
        }
        let (parent, relation) = if !self.found() {
            if event.id != self.root_id {
                return;
            }
            self.root_ms = unix_ms(logged);
            (None, Relation::Root)
        } else if let Some(&p) = event.causationid.as_ref().and_then(|c| self.index.get(c)) {
            (Some(p), Relation::Caused)
        } else if event.correlationid.as_deref() == Some(self.root_id.as_str()) {
            (Some(0), Relation::Correlated)
        } else {
            return;
        };
        let node = TraceNode {
            seq,
            id: event.id.clone(),
            subject: subject.to_string(),
            event_type: event.event_type.clone(),
            source: event.source.clone(),
            relation,
            logged: grizzly_shared::envelope::format_time(logged),
            offset_ms: unix_ms(logged) - self.root_ms,
            by: producer(event),
            handler_run: handler_run(event, self.root_ms),
            caused_by: event.causationid.clone(),
            children: Vec::new(),
        };
        self.index.insert(event.id.clone(), self.nodes.len());
        self.nodes.push((parent, node));
    }

    /// The tree, or `None` when the root never appeared.
    pub fn finish(self) -> Option<TraceNode> {
        // Children come after their parent in `nodes`, so folding from the back nests each node
        // into its parent before the parent itself is moved.
        let mut nodes: Vec<Option<(Option<usize>, TraceNode)>> =
            self.nodes.into_iter().map(Some).collect();
        for i in (1..nodes.len()).rev() {
            let (parent, node) = nodes[i].take().expect("each node is moved once");
            let parent = parent.expect("only the root has no parent");
            let siblings = &mut nodes[parent].as_mut().expect("parents precede").1.children;
            siblings.insert(0, node);
        }
        nodes.into_iter().next().flatten().map(|(_, root)| root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grizzly_shared::EventSubject;
    use grizzly_shared::envelope::format_time;
    use serde_json::json;
    use time::Duration;

    fn subject(s: &str) -> EventSubject {
        EventSubject::parse(s).unwrap()
    }

    #[test]
    fn builds_the_tree_in_one_pass_with_timings_and_producers() {
        let t0 = OffsetDateTime::UNIX_EPOCH + Duration::seconds(1_000);
        let before = EventEnvelope::new(&subject("events.agent.a0.ping"), "cli", json!({}));
        let mut root = EventEnvelope::new(&subject("events.agent.a1.ping"), "cli", json!({}));
        root.causationid = Some("outside".into());
        let pong = root.caused(
            &subject("events.agent.a1.pong"),
            "grizzly/handler/echo",
            json!({}),
            &["echo", "emit", "0"],
        );
        let ok = root.caused(
            &subject("events.agent.a1.handler_succeeded"),
            "grizzly/handler/echo",
            json!({"handler": "echo", "handler_version": 1, "attempt": 1, "duration_ms": 7,
                   "scheduled_at": format_time(t0 + Duration::milliseconds(12)),
                   "started_at_ms": unix_ms(t0) + 20}),
            &["echo", "succeeded"],
        );
        let step = pong.caused(
            &subject("events.workflow.w1.step_started"),
            grizzly_coordinator::instance::SOURCE,
            json!({"workflow": "wf", "_step": {"step": "a"}}),
            &[],
        );
        let unrelated = EventEnvelope::new(&subject("events.agent.a2.ping"), "cli", json!({}));
        let mut correlated =
            EventEnvelope::new(&subject("events.agent.a3.note"), "nats", json!({}));
        correlated.correlationid = Some(root.id.clone());

        let mut b = TraceBuilder::new(&root.id);
        let feed = [
            &before,
            &root,
            &unrelated,
            &pong,
            &ok,
            &correlated,
            &step,
            &pong,
        ];
        for (i, e) in feed.into_iter().enumerate() {
            let logged = t0 + Duration::milliseconds(10 * i as i64 - 10);
            b.offer(i as u64 + 1, logged, &e.subject().unwrap().to_string(), e);
        }
        let tree = b.finish().unwrap();
        assert_eq!(tree.event_count(), 5);
        assert_eq!(tree.relation, Relation::Root);
        assert_eq!(tree.caused_by.as_deref(), Some("outside"));
        assert_eq!(tree.offset_ms, 0);
        let kids: Vec<(&str, Relation, i64, &str)> = tree
            .children
            .iter()
            .map(|c| {
                (
                    c.event_type.as_str(),
                    c.relation,
                    c.offset_ms,
                    c.by.as_str(),
                )
            })
            .collect();
        assert_eq!(
            kids,
            [
                ("pong", Relation::Caused, 20, "handler echo"),
                ("handler_succeeded", Relation::Caused, 30, "handler echo"),
                ("note", Relation::Correlated, 40, "from nats"),
            ]
        );
        let run = tree.children[1].handler_run.as_ref().unwrap();
        assert_eq!(
            (
                run.duration_ms,
                run.scheduled_offset_ms,
                run.started_offset_ms,
                run.succeeded
            ),
            (Some(7), Some(12), Some(20), true)
        );
        let grandchild = &tree.children[0].children[0];
        assert_eq!(grandchild.by, "workflow wf step a");
        assert_eq!(grandchild.seq, 7);

        let text = tree.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(
            lines[0]
                .starts_with("events.agent.a1.ping  seq 2  +0ms  from cli  (caused by outside)")
        );
        assert!(lines[1].starts_with("├─ events.agent.a1.pong  seq 4  +20ms  handler echo"));
        assert!(lines[2].starts_with("│  └─ events.workflow.w1.step_started  seq 7  +50ms"));
        assert!(
            lines[3].contains(
                "handler echo: attempt 1 succeeded in 7ms (scheduled +12ms, started +20ms)"
            )
        );
        assert!(
            lines[4].starts_with("└─ events.agent.a3.note") && lines[4].contains("[correlated")
        );
    }

    #[test]
    fn an_unknown_root_gives_no_tree() {
        let mut b = TraceBuilder::new("nope");
        let e = EventEnvelope::new(&subject("events.agent.a1.ping"), "cli", json!({}));
        b.offer(1, OffsetDateTime::UNIX_EPOCH, "events.agent.a1.ping", &e);
        assert!(!b.found());
        assert!(b.finish().is_none());
    }
}
