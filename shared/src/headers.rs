//! NATS header names on Grizzly's messages.

/// JetStream de-duplication id; on events it equals the envelope `id`.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// Event priority for raw (non-CloudEvents) bodies: critical|high|normal|low.
pub const PRIORITY: &str = "Grizzly-Priority";
/// CloudEvents `source` for raw bodies.
pub const SOURCE: &str = "Grizzly-Source";
pub const CORRELATION_ID: &str = "Grizzly-Correlation-Id";
pub const CAUSATION_ID: &str = "Grizzly-Causation-Id";
/// W3C trace context, carried on every message so one trace spans the whole journey.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
/// On dead letters: why the message is there.
pub const DLQ_REASON: &str = "Grizzly-Dlq-Reason";
/// Ask for a handler by capability (raw bodies; CloudEvents use the `capability` attribute).
pub const CAPABILITY: &str = "Grizzly-Capability";
