//! Dead letters (stream `DLQ`, subjects `dlq.<handler>` and `dlq._ingest`): the original message,
//! its headers, the error and the attempt history, enough to inspect and redrive it.

use std::collections::BTreeMap;

use async_nats::HeaderMap;
use serde::{Deserialize, Serialize};

use crate::envelope::EventEnvelope;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptError {
    pub attempt: u32,
    pub error: String,
    pub at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// `None` for `dlq._ingest` (the event never became an event).
    pub handler: Option<String>,
    pub handler_version: Option<u32>,
    /// Short machine-readable kind, e.g. `not_json`, `handler_failed`, `timeout`.
    pub kind: String,
    /// The last error, human readable.
    pub error: String,
    pub attempts: u32,
    #[serde(default)]
    pub history: Vec<AttemptError>,
    pub original_subject: String,
    #[serde(default)]
    pub original_headers: BTreeMap<String, Vec<String>>,
    /// The original body: text when it is UTF-8, else base64 in `original_payload_base64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_payload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_payload_base64: Option<String>,
    /// Sequence of the original message in `EVENTS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<EventEnvelope>,
    pub dead_lettered_at: String,
}

impl DeadLetter {
    pub fn set_original_payload(&mut self, payload: &[u8]) {
        match std::str::from_utf8(payload) {
            Ok(text) => self.original_payload = Some(text.to_string()),
            Err(_) => {
                use base64::Engine;
                self.original_payload_base64 =
                    Some(base64::engine::general_purpose::STANDARD.encode(payload));
            }
        }
    }

    pub fn original_payload_bytes(&self) -> Vec<u8> {
        use base64::Engine;
        match (&self.original_payload, &self.original_payload_base64) {
            (Some(text), _) => text.as_bytes().to_vec(),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap_or_default(),
            (None, None) => Vec::new(),
        }
    }

    pub fn to_json_bytes(&self) -> bytes::Bytes {
        serde_json::to_vec(self)
            .expect("a dead letter always serializes")
            .into()
    }
}

/// Headers as a plain map (for storing them inside a dead letter).
pub fn headers_to_map(headers: Option<&HeaderMap>) -> BTreeMap<String, Vec<String>> {
    let mut map = BTreeMap::new();
    if let Some(headers) = headers {
        for (name, values) in headers.iter() {
            map.insert(
                name.to_string(),
                values.iter().map(|v| v.as_str().to_string()).collect(),
            );
        }
    }
    map
}

pub fn map_to_headers(map: &BTreeMap<String, Vec<String>>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, values) in map {
        for v in values {
            headers.append(name.as_str(), v.as_str());
        }
    }
    headers
}
