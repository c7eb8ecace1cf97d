//! The event envelope: CloudEvents 1.0 (structured JSON mode) plus Grizzly's extensions
//! `aggregatetype`, `aggregateid`, `priority`, `correlationid`, `causationid`, `traceparent`.
//!
//! Two kinds of body arrive on `events.>`: a CloudEvent (it has `specversion`), or any other JSON
//! value (e.g. from `nats pub`), which becomes the event's `data` with the missing attributes
//! taken from the subject and headers. Anything else is an [`IngestError`] and goes to
//! `dlq._ingest` with the reason.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use async_nats::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::headers;
use crate::ids;
use crate::subject::{EventSubject, SubjectError};

pub const SPEC_VERSION: &str = "1.0";
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// Dispatch priority, highest first.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Critical,
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    pub const ALL: [Priority; 4] = [Self::Critical, Self::High, Self::Normal, Self::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Critical => "critical",
            Self::High => "high",
            Self::Normal => "normal",
            Self::Low => "low",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "critical" => Ok(Self::Critical),
            "high" => Ok(Self::High),
            "normal" => Ok(Self::Normal),
            "low" => Ok(Self::Low),
            other => Err(format!(
                "unknown priority `{other}` (expected critical|high|normal|low)"
            )),
        }
    }
}

/// One domain event as stored in `EVENTS` (CloudEvents 1.0 structured mode).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub time: String,
    #[serde(default = "default_content_type")]
    pub datacontenttype: String,
    #[serde(default)]
    pub data: Value,
    pub aggregatetype: String,
    pub aggregateid: String,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlationid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causationid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Extension: ask for a handler by capability instead of by subject pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
}

fn default_content_type() -> String {
    JSON_CONTENT_TYPE.to_string()
}

/// Why a message on `events.>` could not become an event.
#[derive(Debug, Error)]
pub enum IngestError {
    #[error(transparent)]
    Subject(#[from] SubjectError),
    #[error("payload on `{subject}` is {size} bytes, over the limit of {limit} bytes")]
    Oversized {
        subject: String,
        size: usize,
        limit: usize,
    },
    #[error("payload on `{subject}` is not valid JSON: {source}")]
    NotJson {
        subject: String,
        source: serde_json::Error,
    },
    #[error("CloudEvent on `{subject}` is invalid: {reason}")]
    InvalidCloudEvent { subject: String, reason: String },
    #[error("event on `{subject}` asks for capability `{capability}`, which no handler has")]
    UnknownCapability { subject: String, capability: String },
}

impl IngestError {
    /// Short machine-readable kind, recorded with the dead letter.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Subject(_) => "bad_subject",
            Self::Oversized { .. } => "oversized",
            Self::NotJson { .. } => "not_json",
            Self::InvalidCloudEvent { .. } => "invalid_cloudevent",
            Self::UnknownCapability { .. } => "unknown_capability",
        }
    }
}

/// What the log knows about a stored message besides its body.
pub struct StoredMessage<'a> {
    pub subject: &'a str,
    pub headers: Option<&'a HeaderMap>,
    pub payload: &'a [u8],
    /// Stream sequence: makes the content-hash id of a raw body unique per log entry.
    pub stream_sequence: u64,
    pub published: OffsetDateTime,
}

impl<'a> StoredMessage<'a> {
    /// A message delivered by a JetStream consumer, with its stream sequence and time.
    pub fn from_jetstream(msg: &'a async_nats::jetstream::Message) -> Result<Self, String> {
        let info = msg
            .info()
            .map_err(|e| format!("not a JetStream delivery: {e}"))?;
        Ok(Self {
            subject: msg.subject.as_str(),
            headers: msg.headers.as_ref(),
            payload: &msg.payload,
            stream_sequence: info.stream_sequence,
            published: info.published,
        })
    }
}

pub fn now_rfc3339() -> String {
    format_time(OffsetDateTime::now_utc())
}

pub fn format_time(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// One top-level attribute of an object body, as [`EventEnvelope::check_stored`] sees it.
enum Attr<'a> {
    Str(Cow<'a, str>),
    Null,
    /// Any other JSON value.
    Other,
}

impl Attr<'_> {
    /// What `from_value` into a `String` field accepts.
    fn is_str(&self) -> bool {
        matches!(self, Self::Str(_))
    }

    /// What `from_value` into an `Option<String>` field accepts.
    fn is_optional_str(&self) -> bool {
        !matches!(self, Self::Other)
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Attr<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(AnyJson(true))
            .map(|v| v.unwrap_or(Attr::Other))
    }
}

/// Visits any JSON value as strictly as parsing it into a [`Value`] does (numbers in range,
/// valid string escapes), keeping nothing but a top-level string. (`serde::de::IgnoredAny`
/// skips values without those checks.)
struct AnyJson(bool);

impl<'de> serde::de::Visitor<'de> for AnyJson {
    type Value = Option<Attr<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(self.0.then_some(Attr::Str(Cow::Borrowed(v))))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(self.0.then(|| Attr::Str(Cow::Owned(v.to_string()))))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(self.0.then_some(Attr::Null))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element_seed(AnyJson(false))?.is_some() {}
        Ok(None)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map
            .next_entry_seed(AnyJson(false), AnyJson(false))?
            .is_some()
        {}
        Ok(None)
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for AnyJson {
    type Value = Option<Attr<'de>>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

/// The attributes [`EventEnvelope::check_stored`] needs of an object body (the last of a
/// repeated key wins, as when parsing into a [`Value`]); every other member is only checked.
#[derive(Default)]
struct Attributes<'a> {
    /// Known attribute name → value.
    known: Vec<(&'static str, Attr<'a>)>,
}

/// Attributes `from_stored` reads from a CloudEvent body.
const ATTRIBUTES: [&str; 13] = [
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "datacontenttype",
    "aggregatetype",
    "aggregateid",
    "priority",
    "correlationid",
    "causationid",
    "traceparent",
    "capability",
];

impl<'a> Attributes<'a> {
    fn get(&self, name: &str) -> Option<&Attr<'a>> {
        self.known
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Attributes<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = Attributes<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut attrs = Attributes::default();
                // Keys are strings: borrowed from the body unless escaped.
                while let Some(key) = map.next_key_seed(AnyJson(true))? {
                    let key = key.as_ref().and_then(Attr::as_str).unwrap_or_default();
                    match ATTRIBUTES.iter().find(|a| **a == key) {
                        Some(name) => attrs.known.push((name, map.next_value()?)),
                        None => {
                            map.next_value_seed(AnyJson(false))?;
                        }
                    }
                }
                Ok(attrs)
            }
        }
        d.deserialize_map(Members)
    }
}

fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers
        .and_then(|h| h.get(name))
        .map(|v| v.as_str())
        .filter(|v| !v.is_empty())
}

impl EventEnvelope {
    /// A new event caused by nothing (e.g. `grizzly emit`): fresh UUIDv7 id, correlation = id.
    pub fn new(subject: &EventSubject, source: &str, data: Value) -> Self {
        let id = ids::new_event_id();
        Self {
            specversion: SPEC_VERSION.to_string(),
            correlationid: Some(id.clone()),
            id,
            source: source.to_string(),
            event_type: subject.event_type.clone(),
            time: now_rfc3339(),
            datacontenttype: default_content_type(),
            data,
            aggregatetype: subject.aggregate_type.clone(),
            aggregateid: subject.aggregate_id.clone(),
            priority: Priority::Normal,
            causationid: None,
            traceparent: None,
            capability: None,
        }
    }

    /// An event caused by `self`: deterministic id from the cause and `id_parts` (so a replay
    /// writes the same id), same correlation and trace, `causationid` = the cause.
    pub fn caused(
        &self,
        subject: &EventSubject,
        source: &str,
        data: Value,
        id_parts: &[&str],
    ) -> Self {
        let mut parts = vec![self.id.as_str()];
        parts.extend_from_slice(id_parts);
        Self {
            specversion: SPEC_VERSION.to_string(),
            id: ids::derived_id(&parts),
            source: source.to_string(),
            event_type: subject.event_type.clone(),
            time: now_rfc3339(),
            datacontenttype: default_content_type(),
            data,
            aggregatetype: subject.aggregate_type.clone(),
            aggregateid: subject.aggregate_id.clone(),
            priority: self.priority,
            correlationid: Some(self.correlation_id().to_string()),
            causationid: Some(self.id.clone()),
            traceparent: self.traceparent.clone(),
            capability: None,
        }
    }

    pub fn correlation_id(&self) -> &str {
        self.correlationid.as_deref().unwrap_or(&self.id)
    }

    pub fn subject(&self) -> Result<EventSubject, SubjectError> {
        EventSubject::new(&self.aggregatetype, &self.aggregateid, &self.event_type)
    }

    /// The aggregate key `type/id` (ordering and partitioning unit).
    pub fn aggregate_key(&self) -> String {
        format!("{}/{}", self.aggregatetype, self.aggregateid)
    }

    /// Headers to publish this envelope with: de-duplication id and trace context.
    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, self.id.as_str());
        if let Some(tp) = &self.traceparent {
            h.insert(headers::TRACEPARENT, tp.as_str());
        }
        h
    }

    pub fn to_json_bytes(&self) -> bytes::Bytes {
        serde_json::to_vec(self)
            .expect("an envelope always serializes")
            .into()
    }

    /// Turns a message stored on `events.>` into an envelope (see the module docs).
    pub fn from_stored(msg: &StoredMessage<'_>, max_bytes: usize) -> Result<Self, IngestError> {
        let subject = EventSubject::parse(msg.subject)?;
        if msg.payload.len() > max_bytes {
            return Err(IngestError::Oversized {
                subject: msg.subject.to_string(),
                size: msg.payload.len(),
                limit: max_bytes,
            });
        }
        let body: Value =
            serde_json::from_slice(msg.payload).map_err(|source| IngestError::NotJson {
                subject: msg.subject.to_string(),
                source,
            })?;
        let is_cloud_event = body
            .as_object()
            .is_some_and(|o| o.contains_key("specversion"));
        if is_cloud_event {
            Self::from_cloud_event(body, &subject, msg)
        } else {
            Ok(Self::from_raw(body, &subject, msg))
        }
    }

    /// Whether `msg` would become an event, and the capability it asks for, read without
    /// building it: `Some(capability)` only when [`Self::from_stored`] surely succeeds with that
    /// capability; `None` when it may fail (then `from_stored` decides and says why).
    ///
    /// The listener checks this way the events no handler's subject pattern matches — chiefly
    /// outcome events, half of what it reads under load — so they are still validated (a
    /// malformed one goes to the dead letters) without allocating their attributes and data.
    pub fn check_stored(msg: &StoredMessage<'_>, max_bytes: usize) -> Option<Option<String>> {
        let subject = EventSubject::parse(msg.subject).ok()?;
        if msg.payload.len() > max_bytes {
            return None;
        }
        let first = msg.payload.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            // Not an object: valid raw data or not JSON, decided by the full parse.
            return None;
        }
        let attrs: Attributes<'_> = serde_json::from_slice(msg.payload).ok()?;
        let Some(specversion) = attrs.get("specversion") else {
            // Any other object is the data of a raw event; its capability is a header.
            return Some(header(msg.headers, headers::CAPABILITY).map(str::to_string));
        };
        // The checks of `from_cloud_event`, then those of deserializing the envelope.
        let agrees = |name: &str, expected: &str| {
            attrs.get(name).is_none_or(|v| v.as_str() == Some(expected))
        };
        let string = |name: &str| attrs.get(name).is_none_or(Attr::is_str);
        let optional = |name: &str| attrs.get(name).is_none_or(Attr::is_optional_str);
        let valid = specversion.as_str() == Some(SPEC_VERSION)
            && agrees("type", &subject.event_type)
            && agrees("aggregatetype", &subject.aggregate_type)
            && agrees("aggregateid", &subject.aggregate_id)
            && attrs
                .get("id")
                .is_none_or(|id| id.as_str().is_some_and(|id| !id.is_empty()))
            && ["source", "time", "datacontenttype"]
                .into_iter()
                .all(string)
            && attrs
                .get("priority")
                .is_none_or(|p| p.as_str().is_some_and(|p| p.parse::<Priority>().is_ok()))
            && ["correlationid", "causationid", "traceparent", "capability"]
                .into_iter()
                .all(optional);
        valid.then(|| {
            attrs
                .get("capability")
                .and_then(Attr::as_str)
                .map(str::to_string)
        })
    }

    fn from_raw(data: Value, subject: &EventSubject, msg: &StoredMessage<'_>) -> Self {
        let id = header(msg.headers, headers::MSG_ID)
            .map(str::to_string)
            .unwrap_or_else(|| {
                // Content hash; the sequence keeps two identical raw bodies distinct events.
                let seq = msg.stream_sequence.to_string();
                let body = String::from_utf8_lossy(msg.payload);
                ids::derived_id(&["raw", msg.subject, &seq, &body])
            });
        let priority = header(msg.headers, headers::PRIORITY)
            .and_then(|p| p.parse().ok())
            .unwrap_or_default();
        Self {
            specversion: SPEC_VERSION.to_string(),
            correlationid: Some(
                header(msg.headers, headers::CORRELATION_ID)
                    .unwrap_or(&id)
                    .to_string(),
            ),
            causationid: header(msg.headers, headers::CAUSATION_ID).map(str::to_string),
            traceparent: header(msg.headers, headers::TRACEPARENT).map(str::to_string),
            capability: header(msg.headers, headers::CAPABILITY).map(str::to_string),
            id,
            source: header(msg.headers, headers::SOURCE)
                .unwrap_or("nats")
                .to_string(),
            event_type: subject.event_type.clone(),
            time: format_time(msg.published),
            datacontenttype: default_content_type(),
            data,
            aggregatetype: subject.aggregate_type.clone(),
            aggregateid: subject.aggregate_id.clone(),
            priority,
        }
    }

    fn from_cloud_event(
        mut body: Value,
        subject: &EventSubject,
        msg: &StoredMessage<'_>,
    ) -> Result<Self, IngestError> {
        let invalid = |reason: String| IngestError::InvalidCloudEvent {
            subject: msg.subject.to_string(),
            reason,
        };
        let obj = body.as_object_mut().expect("checked by caller");
        match obj.get("specversion").and_then(Value::as_str) {
            Some(SPEC_VERSION) => {}
            other => {
                return Err(invalid(format!(
                    "specversion is {other:?}, expected \"1.0\""
                )));
            }
        }
        // The subject is authoritative; a body that disagrees with it is refused, not guessed.
        for (attr, expected) in [
            ("type", &subject.event_type),
            ("aggregatetype", &subject.aggregate_type),
            ("aggregateid", &subject.aggregate_id),
        ] {
            match obj.get(attr) {
                None => {
                    obj.insert(attr.to_string(), Value::String(expected.clone()));
                }
                Some(Value::String(v)) if v == expected => {}
                Some(v) => {
                    return Err(invalid(format!(
                        "attribute `{attr}` is {v} but the subject says \"{expected}\""
                    )));
                }
            }
        }
        if !obj.contains_key("id") {
            let id = header(msg.headers, headers::MSG_ID)
                .map(str::to_string)
                .unwrap_or_else(|| {
                    let seq = msg.stream_sequence.to_string();
                    ids::derived_id(&["ce", msg.subject, &seq])
                });
            obj.insert("id".into(), Value::String(id));
        }
        if !obj.contains_key("source") {
            obj.insert("source".into(), Value::String("nats".into()));
        }
        if !obj.contains_key("time") {
            obj.insert("time".into(), Value::String(format_time(msg.published)));
        }
        if !obj.contains_key("traceparent")
            && let Some(tp) = header(msg.headers, headers::TRACEPARENT)
        {
            obj.insert("traceparent".into(), Value::String(tp.to_string()));
        }
        let mut envelope: Self =
            serde_json::from_value(body).map_err(|e| invalid(e.to_string()))?;
        if envelope.id.is_empty() {
            return Err(invalid("attribute `id` is empty".into()));
        }
        if envelope.correlationid.is_none() {
            envelope.correlationid = Some(envelope.id.clone());
        }
        Ok(envelope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stored<'a>(
        subject: &'a str,
        payload: &'a [u8],
        headers: Option<&'a HeaderMap>,
    ) -> StoredMessage<'a> {
        StoredMessage {
            subject,
            headers,
            payload,
            stream_sequence: 7,
            published: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn raw_json_becomes_data() {
        let e =
            EventEnvelope::from_stored(&stored("events.agent.a1.ping", br#"{"x":1}"#, None), 1024)
                .unwrap();
        assert_eq!(e.data, json!({"x": 1}));
        assert_eq!(e.event_type, "ping");
        assert_eq!(e.aggregatetype, "agent");
        assert_eq!(e.aggregateid, "a1");
        assert_eq!(e.source, "nats");
        assert_eq!(e.correlationid.as_deref(), Some(e.id.as_str()));
        // Same content at the same position: same id (replay); another position: another id.
        let again =
            EventEnvelope::from_stored(&stored("events.agent.a1.ping", br#"{"x":1}"#, None), 1024)
                .unwrap();
        assert_eq!(again.id, e.id);
    }

    #[test]
    fn raw_json_takes_id_and_priority_from_headers() {
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, "m-1");
        h.insert(headers::PRIORITY, "critical");
        let e =
            EventEnvelope::from_stored(&stored("events.agent.a1.ping", b"[1,2]", Some(&h)), 1024)
                .unwrap();
        assert_eq!(e.id, "m-1");
        assert_eq!(e.priority, Priority::Critical);
        assert_eq!(e.data, json!([1, 2]));
    }

    #[test]
    fn cloud_event_round_trips() {
        let subject = EventSubject::parse("events.workflow.w1.started").unwrap();
        let e = EventEnvelope::new(&subject, "test", json!({"k": "v"}));
        let bytes = e.to_json_bytes();
        let back =
            EventEnvelope::from_stored(&stored("events.workflow.w1.started", &bytes, None), 1024)
                .unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn bad_input_is_named() {
        let err =
            EventEnvelope::from_stored(&stored("events.agent.a1.ping", b"not json", None), 1024)
                .unwrap_err();
        assert_eq!(err.kind(), "not_json");
        assert!(err.to_string().contains("events.agent.a1.ping"));
        let err = EventEnvelope::from_stored(&stored("events.agent.ping", b"{}", None), 1024)
            .unwrap_err();
        assert_eq!(err.kind(), "bad_subject");
        let err =
            EventEnvelope::from_stored(&stored("events.agent.a1.ping", &[b' '; 2048], None), 1024)
                .unwrap_err();
        assert_eq!(err.kind(), "oversized");
        let err = EventEnvelope::from_stored(
            &stored(
                "events.agent.a1.ping",
                br#"{"specversion":"1.0","type":"pong"}"#,
                None,
            ),
            1024,
        )
        .unwrap_err();
        assert_eq!(err.kind(), "invalid_cloudevent");
        assert!(err.to_string().contains("`type`"), "{err}");
    }

    #[test]
    fn caused_events_have_deterministic_ids_and_causation() {
        let subject = EventSubject::parse("events.agent.a1.ping").unwrap();
        let cause = EventEnvelope::new(&subject, "test", json!({}));
        let out = subject.with_event_type("handler_succeeded").unwrap();
        let a = cause.caused(&out, "worker", json!({}), &["h", "ok"]);
        let b = cause.caused(&out, "worker", json!({"other": 1}), &["h", "ok"]);
        assert_eq!(a.id, b.id);
        assert_eq!(a.causationid.as_deref(), Some(cause.id.as_str()));
        assert_eq!(a.correlationid.as_deref(), Some(cause.id.as_str()));
    }

    /// `check_stored` agrees with `from_stored`: "valid" only when the event is built, with the
    /// same capability; an object body it doubts is one `from_stored` refuses.
    #[test]
    fn the_cheap_check_agrees_with_building_the_event() {
        let ce = |extra: &str| {
            format!(
                r#"{{"specversion":"1.0","id":"e1","source":"s","time":"t","data":{{"a":[1,2.5,"x"]}}{extra}}}"#
            )
        };
        let mut bodies: Vec<String> = [
            r#"{"x":1}"#,
            "{}",
            "  {\"x\": {\"y\": [null, true]}}  ",
            r#"{"x":1} trailing"#,
            r#"{"x":1e400}"#,
            r#"{"x":-1e400}"#,
            r#"{"x":1e-400}"#,
            r#"{"x":"\ud800"}"#,
            r#"{"x":"\u00e9\n"}"#,
            r#"{"x":1,"x":2}"#,
            r#"{"id":5,"type":7}"#,
            r#"{"x":"#,
            r#"{"capability":"c"}"#,
            "[1,2]",
            "\"text\"",
            "5",
            "null",
            "not json",
            "",
            r#"{"specversion":"1.0"}"#,
            r#"{"specversion":"0.3"}"#,
            r#"{"specversion":null}"#,
            r#"{"specversion":1}"#,
            r#"{"spec\u0076ersion":"0.3"}"#,
        ]
        .iter()
        .map(|b| b.to_string())
        .collect();
        for extra in [
            "",
            r#","type":"ping""#,
            r#","type":"pong""#,
            r#","type":null"#,
            r#","aggregatetype":"agent","aggregateid":"a1""#,
            r#","aggregateid":"a2""#,
            r#","aggregateid":1"#,
            r#","id":"""#,
            r#","id":null"#,
            r#","id":5"#,
            r#","source":null"#,
            r#","time":5"#,
            r#","datacontenttype":null"#,
            r#","datacontenttype":"text/plain""#,
            r#","priority":"high""#,
            r#","priority":"urgent""#,
            r#","priority":null"#,
            r#","priority":"HIGH""#,
            r#","correlationid":null"#,
            r#","correlationid":5"#,
            r#","causationid":"c""#,
            r#","traceparent":{}"#,
            r#","capability":"review""#,
            r#","capability":null"#,
            r#","capability":["review"]"#,
            r#","unknown":1e400"#,
            r#","unknown":"\udc00""#,
            r#","unknown":{"deep":[{"x":"\t"}]}"#,
            r#","data":1e400"#,
            r#","data":null"#,
            r#","type":"pong","type":"ping""#,
            r#","type":"ping","type":"pong""#,
            r#","capability":"a","capability":"b""#,
            r#","\u0074ype":"pong""#,
        ] {
            bodies.push(ce(extra));
        }
        let mut with_capability = HeaderMap::new();
        with_capability.insert(headers::CAPABILITY, "from-header");
        let (mut valid, mut doubted) = (0, 0);
        for subject in [
            "events.agent.a1.ping",
            "events.agent.a1",
            "events.agent.a 1.ping",
        ] {
            for headers in [None, Some(&with_capability)] {
                for body in &bodies {
                    for limit in [1024, 8] {
                        let msg = stored(subject, body.as_bytes(), headers);
                        let built = EventEnvelope::from_stored(&msg, limit);
                        match EventEnvelope::check_stored(&msg, limit) {
                            Some(capability) => {
                                let event = built.unwrap_or_else(|e| {
                                    panic!("{subject} {body}: checked valid, but {e}")
                                });
                                assert_eq!(event.capability, capability, "{subject} {body}");
                                valid += 1;
                            }
                            None if body.trim_start().starts_with('{') => {
                                assert!(built.is_err(), "{subject} {body}: doubted, but built");
                                doubted += 1;
                            }
                            None => {}
                        }
                    }
                }
            }
        }
        assert!(
            valid >= 30 && doubted >= 100,
            "valid {valid}, doubted {doubted}"
        );
    }
}
