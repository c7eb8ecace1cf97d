//! Deciding what the fake "model" says, from the request alone.
//!
//! The fake is stateless across requests on purpose: Claude Code resends the
//! whole conversation each time, so the history in the request tells us
//! whether we are at a fresh prompt or in the middle of a tool loop. That keeps
//! the fake correct with many concurrent CLI processes and after `/clear`.
//!
//! Tool calls are requested in the prompt text with markers
//! `[[tool:NAME {json input}]]`. NAME matches a tool of the request's `tools`
//! list exactly or as a suffix (so `emit_event` finds `mcp__grizzly__emit_event`).
//! Several markers give several sequential calls, one per request; after the
//! last tool result the fake sums up: `fake reply: tool NAME done: RESULT`.

use serde_json::{Value, json};

use crate::config::ReplyMode;

/// Max chars of user text echoed back, and of each tool result in the summary.
const ECHO_CHARS: usize = 200;
const RESULT_CHARS: usize = 500;

/// One content block of the fake's answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Block {
    Text(String),
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
}

/// The whole answer to one `/v1/messages` request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Plan {
    pub blocks: Vec<Block>,
    pub stop_reason: &'static str,
}

impl Plan {
    fn text(text: String) -> Self {
        Self {
            blocks: vec![Block::Text(text)],
            stop_reason: "end_turn",
        }
    }

    /// Rough output token count (~4 chars per token) for `usage`.
    pub fn output_tokens(&self) -> u64 {
        let chars: usize = self
            .blocks
            .iter()
            .map(|b| match b {
                Block::Text(t) => t.len(),
                Block::ToolUse { name, input, .. } => name.len() + input.to_string().len(),
            })
            .sum();
        (chars as u64).div_ceil(4).max(1)
    }
}

/// What the request tells us, before deciding the answer.
pub(crate) struct Analysis {
    pub plan: Plan,
    /// The last user message carried tool results (for stats).
    pub saw_tool_result: bool,
}

/// Decides the answer. `tool_id` mints ids for new `tool_use` blocks.
pub(crate) fn plan(req: &Value, mode: &ReplyMode, tool_id: impl FnOnce() -> String) -> Analysis {
    let messages: &[Value] = req["messages"].as_array().map_or(&[], Vec::as_slice);
    // Only user/assistant turns matter: Claude Code 2.1 appends a trailing
    // `{"role":"system",...}` pseudo-message carrying per-turn settings.
    let turns: Vec<&Value> = messages
        .iter()
        .filter(|m| matches!(m["role"].as_str(), Some("user" | "assistant")))
        .collect();
    let last_user = turns.iter().rev().find(|m| m["role"] == "user");
    let saw_tool_result = last_user.is_some_and(|m| !tool_results(m).is_empty());

    // The prompt is the last user message that is not just tool results.
    let prompt_idx = turns
        .iter()
        .rposition(|m| m["role"] == "user" && tool_results(m).is_empty());
    let prompt_text = prompt_idx.map(|i| user_text(turns[i])).unwrap_or_default();
    let after_prompt = &turns[prompt_idx.map_or(0, |i| i + 1)..];

    let markers = parse_markers(&prompt_text);
    let calls_made: Vec<(String, String)> = after_prompt
        .iter()
        .filter(|m| m["role"] == "assistant")
        .flat_map(|m| blocks(m))
        .filter(|b| b["type"] == "tool_use")
        .map(|b| {
            let s = |k: &str| b[k].as_str().unwrap_or_default().to_string();
            (s("id"), s("name"))
        })
        .collect();

    let plan = if let Some((name, input)) = markers.get(calls_made.len()) {
        match find_tool(req, name) {
            Some(full) => Plan {
                blocks: vec![Block::ToolUse {
                    id: tool_id(),
                    name: full,
                    input: input.clone(),
                }],
                stop_reason: "tool_use",
            },
            None => Plan::text(format!(
                "fake reply: no tool matching {name} (available: {})",
                tool_names(req).join(", ")
            )),
        }
    } else if !calls_made.is_empty() {
        // All requested tools ran: summarise each with its result.
        let results: Vec<Value> = after_prompt
            .iter()
            .filter(|m| m["role"] == "user")
            .flat_map(|m| tool_results(m))
            .collect();
        let lines: Vec<String> = calls_made
            .iter()
            .map(|(id, name)| {
                let result = results.iter().find(|r| r["tool_use_id"] == id.as_str());
                let verb = if result.is_some_and(|r| r["is_error"] == true) {
                    "failed"
                } else {
                    "done"
                };
                let text = result
                    .map(|r| content_text(&r["content"]))
                    .unwrap_or_default();
                format!(
                    "fake reply: tool {name} {verb}: {}",
                    truncate(&text, RESULT_CHARS)
                )
            })
            .collect();
        Plan::text(lines.join("\n"))
    } else {
        match mode {
            ReplyMode::Echo => Plan::text(format!(
                "fake reply: {}",
                truncate(&prompt_text, ECHO_CHARS)
            )),
            ReplyMode::Fixed(text) => Plan::text(text.clone()),
        }
    };
    Analysis {
        plan,
        saw_tool_result,
    }
}

/// Content blocks of a message; a plain string content counts as one text block.
fn blocks(msg: &Value) -> Vec<Value> {
    match &msg["content"] {
        Value::String(s) => vec![json!({"type": "text", "text": s})],
        Value::Array(a) => a.clone(),
        _ => vec![],
    }
}

fn tool_results(msg: &Value) -> Vec<Value> {
    blocks(msg)
        .into_iter()
        .filter(|b| b["type"] == "tool_result")
        .collect()
}

/// Prefixes of text blocks Claude Code injects into user messages: system
/// reminders, and after `/clear` a record of the local command
/// (`<local-command-caveat>`, `<command-name>`, `<local-command-stdout>`).
const INJECTED: &[&str] = &["<system-reminder>", "<local-command-", "<command-"];

/// The user's own words: text blocks minus the ones Claude Code injects
/// (they would make echo replies unpredictable).
fn user_text(msg: &Value) -> String {
    blocks(msg)
        .iter()
        .filter(|b| b["type"] == "text")
        .filter_map(|b| b["text"].as_str())
        .filter(|t| !INJECTED.iter().any(|p| t.trim_start().starts_with(p)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Text of a `tool_result` content (string or array of text blocks).
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(a) => a
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn truncate(s: &str, max_chars: usize) -> &str {
    s.char_indices().nth(max_chars).map_or(s, |(i, _)| &s[..i])
}

fn tool_names(req: &Value) -> Vec<&str> {
    req["tools"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect()
}

/// Exact name first, then suffix match, so `emit_event` finds
/// `mcp__grizzly__emit_event` without the test knowing the server name.
fn find_tool(req: &Value, wanted: &str) -> Option<String> {
    let names = tool_names(req);
    names
        .iter()
        .find(|n| **n == wanted)
        .or_else(|| names.iter().find(|n| n.ends_with(wanted)))
        .map(|n| n.to_string())
}

/// Parses `[[tool:NAME {json}]]` markers; the JSON is optional (defaults to
/// `{}`). Malformed markers are ignored, so stray text cannot break a reply.
pub(crate) fn parse_markers(text: &str) -> Vec<(String, Value)> {
    const OPEN: &str = "[[tool:";
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        rest = &rest[start + OPEN.len()..];
        let name_end = rest
            .find(|c: char| c.is_whitespace() || c == ']' || c == '{')
            .unwrap_or(rest.len());
        let name = &rest[..name_end];
        let after = rest[name_end..].trim_start();
        // The JSON may itself contain "]]", so let serde find where it ends.
        let (input, after) = if after.starts_with('{') {
            let mut it = serde_json::Deserializer::from_str(after).into_iter::<Value>();
            match it.next() {
                Some(Ok(v)) => (v, after[it.byte_offset()..].trim_start()),
                _ => continue,
            }
        } else {
            (json!({}), after)
        };
        if let Some(tail) = after.strip_prefix("]]")
            && !name.is_empty()
        {
            out.push((name.to_string(), input));
            rest = tail;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_parse_with_nested_brackets_and_defaults() {
        let m = parse_markers(
            r#"a [[tool:emit_event {"x":[[1]],"s":"]]"}]] b [[tool:ping]] [[tool:bad {"#,
        );
        assert_eq!(
            m,
            vec![
                ("emit_event".into(), json!({"x":[[1]],"s":"]]"})),
                ("ping".into(), json!({}))
            ]
        );
    }

    #[test]
    fn echo_ignores_trailing_system_message_and_reminders() {
        let req = json!({"messages":[
            {"role":"user","content":[
                {"type":"text","text":"<system-reminder>x</system-reminder>"},
                {"type":"text","text":"<local-command-caveat>y</local-command-caveat>\n"},
                {"type":"text","text":"<command-name>/clear</command-name>\n"},
                {"type":"text","text":"hello"}]},
            {"role":"system","content":[]}]});
        let a = plan(&req, &ReplyMode::Echo, || unreachable!());
        assert_eq!(a.plan, Plan::text("fake reply: hello".into()));
    }

    #[test]
    fn sequential_tools_then_summary() {
        let tools = json!([{"name":"mcp__s__a"},{"name":"b"}]);
        let prompt = json!({"role":"user","content":"[[tool:a {\"n\":1}]] [[tool:b]]"});
        let req1 = json!({"tools":tools,"messages":[prompt]});
        let a1 = plan(&req1, &ReplyMode::Echo, || "t1".into());
        assert_eq!(a1.plan.stop_reason, "tool_use");
        assert!(matches!(&a1.plan.blocks[0], Block::ToolUse{name,..} if name == "mcp__s__a"));

        let call = |id: &str, name: &str| json!({"role":"assistant","content":[{"type":"tool_use","id":id,"name":name,"input":{}}]});
        let result = |id: &str, text: &str| json!({"role":"user","content":[{"type":"tool_result","tool_use_id":id,"content":[{"type":"text","text":text}]}]});
        let req2 =
            json!({"tools":tools,"messages":[prompt, call("t1","mcp__s__a"), result("t1","ok-a")]});
        let a2 = plan(&req2, &ReplyMode::Echo, || "t2".into());
        assert!(a2.saw_tool_result);
        assert!(matches!(&a2.plan.blocks[0], Block::ToolUse{name,..} if name == "b"));

        let req3 = json!({"tools":tools,"messages":[prompt, call("t1","mcp__s__a"), result("t1","ok-a"), call("t2","b"), result("t2","ok-b")]});
        let a3 = plan(&req3, &ReplyMode::Echo, || unreachable!());
        assert_eq!(
            a3.plan,
            Plan::text(
                "fake reply: tool mcp__s__a done: ok-a\nfake reply: tool b done: ok-b".into()
            )
        );
    }

    #[test]
    fn unknown_tool_is_reported_in_text() {
        let req =
            json!({"tools":[{"name":"x"}],"messages":[{"role":"user","content":"[[tool:nope]]"}]});
        let a = plan(&req, &ReplyMode::Echo, || unreachable!());
        assert_eq!(
            a.plan,
            Plan::text("fake reply: no tool matching nope (available: x)".into())
        );
    }
}
