//! W3C trace context across process boundaries. An event carries the context of the span that
//! wrote it, in its `traceparent` attribute and the NATS `traceparent` header; whoever handles
//! the event starts its span as a child of that context ([`follow`]) and stamps what it writes
//! with its own span's context ([`stamp`]). So one trace covers an event's whole journey:
//! `grizzly emit` → listener `route` → worker `handle` → `attempt` → Claude turn → MCP
//! `emit_event` → the next route, with correct parent/child links in every process.
//!
//! With tracing off (no OTLP endpoint, see [`crate::telemetry`]) spans have no OpenTelemetry
//! context: [`traceparent`] is `None` and [`stamp`] leaves the event's traceparent as it was, so a
//! context set upstream still passes through unchanged.

use std::collections::HashMap;

use async_nats::HeaderMap;
use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::envelope::EventEnvelope;
use crate::headers::{TRACEPARENT, TRACESTATE};

/// The OpenTelemetry context a W3C `traceparent` (and optional `tracestate`) names; an empty
/// context when there is none or it is malformed.
pub fn context_from(traceparent: Option<&str>, tracestate: Option<&str>) -> Context {
    let Some(traceparent) = traceparent.filter(|t| !t.is_empty()) else {
        return Context::new();
    };
    let mut carrier = HashMap::new();
    carrier.insert(TRACEPARENT.to_string(), traceparent.to_string());
    if let Some(state) = tracestate.filter(|s| !s.is_empty()) {
        carrier.insert(TRACESTATE.to_string(), state.to_string());
    }
    TraceContextPropagator::new().extract(&carrier)
}

/// Whether `traceparent` is a well-formed W3C `traceparent` naming a valid span.
pub fn is_valid(traceparent: &str) -> bool {
    context_from(Some(traceparent), None)
        .span()
        .span_context()
        .is_valid()
}

/// The context in message headers (`traceparent`, `tracestate`).
pub fn context_from_headers(headers: Option<&HeaderMap>) -> Context {
    let get = |name: &str| {
        headers
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_string())
    };
    context_from(get(TRACEPARENT).as_deref(), get(TRACESTATE).as_deref())
}

/// Makes `span` a child of the trace context `traceparent` names (a no-op without one). Call
/// it right after creating the span, before entering it or creating children.
pub fn follow_traceparent(span: &Span, traceparent: Option<&str>) {
    if span.is_disabled() {
        return;
    }
    let parent = context_from(traceparent, None);
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Makes `span` a child of the span that wrote `event` (its `traceparent`).
pub fn follow(span: &Span, event: &EventEnvelope) {
    follow_traceparent(span, event.traceparent.as_deref());
}

/// `span`'s context as a W3C `traceparent`; `None` when the span is not traced (tracing off or
/// the span filtered out).
pub fn traceparent(span: &Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Stamps `event` with `span`'s context, so what the event causes continues from `span`. Without
/// a traced span the event keeps the traceparent it has (inherited from its cause).
pub fn stamp(event: &mut EventEnvelope, span: &Span) {
    if let Some(tp) = traceparent(span) {
        event.traceparent = Some(tp);
    }
}

/// Sets the `traceparent` header to `span`'s context (when traced).
pub fn inject_headers(headers: &mut HeaderMap, span: &Span) {
    if let Some(tp) = traceparent(span) {
        headers.insert(TRACEPARENT, tp.as_str());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_traceparents() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = context_from(Some(tp), None);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(is_valid(tp));
        assert!(!is_valid("garbage"));
        assert!(!context_from(None, None).span().span_context().is_valid());
    }

    #[test]
    fn untraced_spans_leave_events_alone() {
        // No OpenTelemetry layer in this test: spans carry no context.
        let subject = crate::EventSubject::parse("events.agent.a1.ping").unwrap();
        let mut event = EventEnvelope::new(&subject, "test", serde_json::json!({}));
        event.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        let span = tracing::debug_span!("x");
        follow(&span, &event);
        stamp(&mut event, &span);
        assert_eq!(
            event.traceparent.as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
    }
}
