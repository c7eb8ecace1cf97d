//! The JSON-lines output contract shared by `exec` and `process` handlers.
//!
//! Each stdout line that is a JSON object with a string `type` is an event to emit:
//! `{"type": "...", "data": ..., "aggregate_type"?: "...", "aggregate_id"?: "..."}`.
//! A `process` handler ends each reply with a terminator line `{"done": true, "output": ...}`
//! (success) or `{"done": true, "error": "..."}` (failure). Any other line is plain output text.

use serde_json::Value;

use super::EmittedEvent;

#[derive(Debug, PartialEq)]
pub enum OutputLine {
    Event(EmittedEvent),
    Done(Result<Value, String>),
    Text(String),
}

pub fn parse_line(line: &str) -> OutputLine {
    let trimmed = line.trim();
    let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(trimmed) else {
        return OutputLine::Text(line.to_string());
    };
    if obj.get("done").and_then(Value::as_bool) == Some(true) {
        return match obj.get("error") {
            Some(err) if !err.is_null() => OutputLine::Done(Err(match err {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })),
            _ => OutputLine::Done(Ok(obj.get("output").cloned().unwrap_or(Value::Null))),
        };
    }
    match obj.get("type").and_then(Value::as_str) {
        Some(event_type) => OutputLine::Event(EmittedEvent {
            event_type: event_type.to_string(),
            data: obj.get("data").cloned().unwrap_or(Value::Null),
            aggregate_type: obj
                .get("aggregate_type")
                .and_then(Value::as_str)
                .map(str::to_string),
            aggregate_id: obj
                .get("aggregate_id")
                .and_then(Value::as_str)
                .map(str::to_string),
        }),
        None => OutputLine::Text(line.to_string()),
    }
}

/// Plain output text, capped so one chatty handler cannot bloat the outcome event.
#[derive(Debug, Default)]
pub struct TextOutput {
    text: String,
    truncated: bool,
}

const MAX_OUTPUT_TEXT: usize = 64 * 1024;

impl TextOutput {
    pub fn push(&mut self, line: &str) {
        if self.text.len() + line.len() + 1 > MAX_OUTPUT_TEXT {
            self.truncated = true;
            return;
        }
        if !self.text.is_empty() {
            self.text.push('\n');
        }
        self.text.push_str(line);
    }

    pub fn into_value(self) -> Value {
        let mut text = self.text;
        if self.truncated {
            text.push_str("\n[output truncated]");
        }
        Value::String(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn classifies_lines() {
        assert!(
            matches!(parse_line(r#"{"type":"pong","data":{"n":1}}"#), OutputLine::Event(e) if e.event_type == "pong" && e.data == json!({"n":1}))
        );
        assert_eq!(
            parse_line(r#"{"done":true,"output":"x"}"#),
            OutputLine::Done(Ok(json!("x")))
        );
        assert_eq!(
            parse_line(r#"{"done":true,"error":"bad"}"#),
            OutputLine::Done(Err("bad".into()))
        );
        assert_eq!(parse_line("hello"), OutputLine::Text("hello".into()));
        assert_eq!(
            parse_line(r#"{"no_type":1}"#),
            OutputLine::Text(r#"{"no_type":1}"#.into())
        );
    }
}
