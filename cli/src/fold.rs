//! The fold behind `grizzly events replay`: one aggregate's events, in log order, become a state,
//! and each step reports what it changed.
//!
//! - Workflow instances (`workflow/<id>`) fold with the coordinator's read model
//!   ([`InstanceView::apply`]), so a replay ends in the state `grizzly workflow status` shows.
//! - Every other aggregate (agent, system, or any type of yours) folds into an
//!   [`AggregateState`]: counters by event type, the last event, handler outcomes by handler, and
//!   the merged `data` of its domain events.
//!
//! "What changed" is a field-by-field diff of the state before and after the event, leaving out
//! the bookkeeping every event moves (counters, last event, last sequence).

use std::collections::BTreeMap;

use grizzly_coordinator::projection::InstanceView;
use grizzly_shared::EventEnvelope;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The two outcome event types a worker writes on the handled event's aggregate.
const OUTCOMES: [&str; 2] = ["handler_succeeded", "handler_failed"];

/// The last event folded into a state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LastEvent {
    pub seq: u64,
    #[serde(rename = "type")]
    pub event_type: String,
    pub id: String,
    pub time: String,
}

/// What the outcomes of one handler on this aggregate add up to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HandlerOutcomes {
    pub succeeded: u64,
    /// Failed attempts (each retry that failed counts).
    pub failed: u64,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub last_output: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The generic state of a non-workflow aggregate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AggregateState {
    pub aggregate: String,
    pub events: u64,
    pub last_seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event: Option<LastEvent>,
    /// Events by type.
    pub counts: BTreeMap<String, u64>,
    /// Outcomes (`handler_succeeded` / `handler_failed`) by handler.
    pub handlers: BTreeMap<String, HandlerOutcomes>,
    /// Every domain event's `data` merged in log order (see [`merge`]): the latest known fields.
    pub data: Value,
}

impl AggregateState {
    /// Folds one event; an event at or below the last folded sequence changes nothing.
    pub fn apply(&mut self, event: &EventEnvelope, seq: u64) {
        if seq <= self.last_seq {
            return;
        }
        self.last_seq = seq;
        self.events += 1;
        *self.counts.entry(event.event_type.clone()).or_default() += 1;
        self.last_event = Some(LastEvent {
            seq,
            event_type: event.event_type.clone(),
            id: event.id.clone(),
            time: event.time.clone(),
        });
        let handler = event.data.get("handler").and_then(Value::as_str);
        match handler {
            Some(handler) if OUTCOMES.contains(&event.event_type.as_str()) => {
                let h = self.handlers.entry(handler.to_string()).or_default();
                if event.event_type == "handler_succeeded" {
                    h.succeeded += 1;
                    h.last_output = event.data.get("output").cloned().unwrap_or_default();
                } else {
                    h.failed += 1;
                    h.last_error = event
                        .data
                        .get("error")
                        .and_then(Value::as_str)
                        .map(str::to_string);
                }
            }
            _ => merge(&mut self.data, &event.data),
        }
    }
}

/// Merges `patch` into `target`: objects field by field (recursively), any other value
/// (including `null`, arrays and scalars) replaces what was there.
pub fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (target, patch) => {
            // An object patch onto a non-object starts a fresh object, field by field.
            if patch.is_object() {
                *target = Value::Object(Map::new());
                merge(target, patch);
            } else {
                *target = patch.clone();
            }
        }
    }
}

/// One changed field: `from` absent = added, `to` absent = removed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Value>,
}

/// Field-by-field differences between two JSON values (objects recursively; anything else as a
/// whole), with dotted paths under `prefix`. A missing or `null` value that becomes an object
/// counts as an empty one, so a first event shows its fields one by one.
pub fn diff(prefix: &str, before: Option<&Value>, after: Option<&Value>, out: &mut Vec<Change>) {
    let empty = Value::Object(Map::new());
    let (before, after) = match (before, after) {
        (None | Some(Value::Null), Some(a @ Value::Object(_))) => (Some(&empty), Some(a)),
        other => other,
    };
    match (before, after) {
        (Some(Value::Object(b)), Some(Value::Object(a))) => {
            let mut keys: Vec<&String> = b.keys().chain(a.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                diff(&path, b.get(k), a.get(k), out);
            }
        }
        (b, a) if b != a => out.push(Change {
            path: prefix.to_string(),
            from: b.cloned(),
            to: a.cloned(),
        }),
        _ => {}
    }
}

/// The state being rebuilt, by aggregate type.
#[derive(Debug, Clone)]
pub enum Fold {
    Workflow(Box<InstanceView>),
    Generic(AggregateState),
}

impl Fold {
    /// The fold for an aggregate: the workflow read model for `workflow`, else generic.
    pub fn for_aggregate(aggregate_type: &str, aggregate_id: &str) -> Self {
        if aggregate_type == grizzly_coordinator::instance::AGGREGATE {
            Self::Workflow(Box::default())
        } else {
            Self::Generic(AggregateState {
                aggregate: format!("{aggregate_type}/{aggregate_id}"),
                ..Default::default()
            })
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Workflow(_) => "workflow",
            Self::Generic(_) => "generic",
        }
    }

    /// The state as JSON (what `--json` prints; for workflows, what `workflow status --json`
    /// prints).
    pub fn state(&self) -> Value {
        match self {
            Self::Workflow(v) => serde_json::to_value(v),
            Self::Generic(s) => serde_json::to_value(s),
        }
        .expect("states serialize")
    }

    /// Folds one event and returns what it changed.
    pub fn apply(&mut self, event: &EventEnvelope, seq: u64) -> Vec<Change> {
        let before = self.tracked();
        match self {
            Self::Workflow(v) => v.apply(event, seq),
            Self::Generic(s) => s.apply(event, seq),
        }
        let mut changes = Vec::new();
        diff("", Some(&before), Some(&self.tracked()), &mut changes);
        changes
    }

    /// The state without the bookkeeping every event moves.
    fn tracked(&self) -> Value {
        let mut state = self.state();
        let bookkeeping: &[&str] = match self {
            Self::Workflow(_) => &["events", "last_seq", "updated"],
            Self::Generic(_) => &["events", "last_seq", "last_event", "counts"],
        };
        if let Value::Object(m) = &mut state {
            for k in bookkeeping {
                m.remove(*k);
            }
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grizzly_shared::EventSubject;
    use serde_json::json;

    fn event(subject: &str, data: Value) -> EventEnvelope {
        EventEnvelope::new(&EventSubject::parse(subject).unwrap(), "test", data)
    }

    fn paths(changes: &[Change]) -> Vec<String> {
        changes.iter().map(|c| c.path.clone()).collect()
    }

    #[test]
    fn merge_is_field_by_field_for_objects_and_replaces_the_rest() {
        let mut v = Value::Null;
        merge(&mut v, &json!({"a": 1, "o": {"x": 1, "y": 2}}));
        merge(&mut v, &json!({"b": 2, "o": {"y": 3}, "a": null}));
        assert_eq!(v, json!({"a": null, "b": 2, "o": {"x": 1, "y": 3}}));
        merge(&mut v, &json!([1, 2]));
        assert_eq!(v, json!([1, 2]));
        merge(&mut v, &json!({"c": 1}));
        assert_eq!(v, json!({"c": 1}));
    }

    #[test]
    fn diff_names_added_changed_and_removed_fields() {
        let mut out = Vec::new();
        diff(
            "",
            Some(&json!({"a": 1, "o": {"x": 1}, "gone": true, "same": [1]})),
            Some(&json!({"a": 2, "o": {"x": 1, "y": 2}, "same": [1]})),
            &mut out,
        );
        assert_eq!(
            out,
            vec![
                Change {
                    path: "a".into(),
                    from: Some(json!(1)),
                    to: Some(json!(2))
                },
                Change {
                    path: "gone".into(),
                    from: Some(json!(true)),
                    to: None
                },
                Change {
                    path: "o.y".into(),
                    from: None,
                    to: Some(json!(2))
                },
            ]
        );
    }

    #[test]
    fn generic_fold_counts_merges_and_tracks_handler_outcomes() {
        let mut fold = Fold::for_aggregate("agent", "a1");
        assert_eq!(fold.kind(), "generic");
        let ping = event("events.agent.a1.ping", json!({"n": 1, "note": "first"}));
        let changes = fold.apply(&ping, 3);
        assert_eq!(paths(&changes), ["data.n", "data.note"]);

        let changes = fold.apply(&event("events.agent.a1.ping", json!({"n": 2})), 5);
        assert_eq!(
            changes,
            vec![Change {
                path: "data.n".into(),
                from: Some(json!(1)),
                to: Some(json!(2))
            }]
        );

        let ok = ping.caused(
            &EventSubject::parse("events.agent.a1.handler_succeeded").unwrap(),
            "worker",
            json!({"handler": "echo", "output": "pong", "duration_ms": 3}),
            &["echo"],
        );
        let changes = fold.apply(&ok, 6);
        assert_eq!(
            paths(&changes),
            [
                "handlers.echo.failed",
                "handlers.echo.last_output",
                "handlers.echo.succeeded"
            ],
            "the outcome is not merged into data"
        );
        let failed = ping.caused(
            &EventSubject::parse("events.agent.a1.handler_failed").unwrap(),
            "worker",
            json!({"handler": "echo", "error": "boom"}),
            &["echo", "failed"],
        );
        let changes = fold.apply(&failed, 8);
        assert_eq!(
            paths(&changes),
            ["handlers.echo.failed", "handlers.echo.last_error"]
        );
        // A replayed (already folded) sequence changes nothing.
        assert!(fold.apply(&failed, 8).is_empty());

        let Fold::Generic(state) = &fold else {
            unreachable!()
        };
        assert_eq!(state.aggregate, "agent/a1");
        assert_eq!(state.events, 4);
        assert_eq!(state.last_seq, 8);
        assert_eq!(
            state.last_event.as_ref().unwrap().event_type,
            "handler_failed"
        );
        assert_eq!(
            state.counts,
            BTreeMap::from([
                ("handler_failed".into(), 1),
                ("handler_succeeded".into(), 1),
                ("ping".into(), 2)
            ])
        );
        assert_eq!(
            state.handlers["echo"],
            HandlerOutcomes {
                succeeded: 1,
                failed: 1,
                last_output: json!("pong"),
                last_error: Some("boom".into())
            }
        );
        assert_eq!(state.data, json!({"n": 2, "note": "first"}));
    }

    #[test]
    fn workflow_fold_is_the_read_model() {
        let mut fold = Fold::for_aggregate("workflow", "w1");
        assert_eq!(fold.kind(), "workflow");
        let created = EventEnvelope::new(
            &EventSubject::parse("events.workflow.w1.created").unwrap(),
            grizzly_coordinator::instance::SOURCE,
            json!({"workflow": "wf", "version": 2}),
        );
        let started = EventEnvelope::new(
            &EventSubject::parse("events.workflow.w1.step_started").unwrap(),
            grizzly_coordinator::instance::SOURCE,
            json!({"step": "a", "_step": {"step": "a", "kind": "call", "handler": "h"}}),
        );
        let mut view = InstanceView::default();
        for (seq, e) in [(1, &created), (2, &started)] {
            view.apply(e, seq);
            fold.apply(e, seq);
        }
        assert_eq!(fold.state(), serde_json::to_value(&view).unwrap());
        let changes = fold.apply(
            &EventEnvelope::new(
                &EventSubject::parse("events.workflow.w1.step_completed").unwrap(),
                grizzly_coordinator::instance::SOURCE,
                json!({"step": "a"}),
            ),
            3,
        );
        assert_eq!(paths(&changes), ["steps.a.finished", "steps.a.status"]);
        assert_eq!(changes[1].to, Some(json!("succeeded")));
    }
}
