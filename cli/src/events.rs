//! `grizzly events tail|replay|trace`: read the log — follow it with filters, rebuild one
//! aggregate's state step by step ([`crate::fold`]), or show what one event caused
//! ([`crate::causation`]).
//!
//! Replay and trace each read `EVENTS` once, in order, up to what was its last message when the
//! command started (an ordered consumer; no index). Malformed arguments are usage errors (exit
//! code 2, like any argument clap refuses); an unknown aggregate or event id is an error (exit 1).

use std::fmt::Display;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use futures::StreamExt;
use grizzly_shared::Settings;
use grizzly_shared::envelope::{EventEnvelope, IngestError, StoredMessage};
use grizzly_shared::nats::{self, EVENTS_STREAM, Nats};
use grizzly_shared::subject::{self, pattern_matches};
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::causation::TraceBuilder;
use crate::fold::{Change, Fold};

/// How long a scan waits for the next message before calling the log unresponsive.
const SCAN_STALL: Duration = Duration::from_secs(30);

#[derive(clap::Subcommand)]
pub enum EventsCommand {
    /// Print events as they are appended (optionally from the start, or the last N), one line
    /// each: time, sequence, subject, data.
    Tail(TailArgs),
    /// Rebuild one aggregate's state from its events and show each step.
    Replay(ReplayArgs),
    /// Show what one event caused (handlers, workflows, their events), with timings.
    Trace(TraceArgs),
}

#[derive(clap::Args)]
pub struct TailArgs {
    /// Subject filter, e.g. `events.agent.a1.>` (default: every event).
    #[arg(default_value = "events.>", value_parser = parse_pattern)]
    pub filter: String,
    /// Only events of this type (the last subject token), e.g. `handler_failed`.
    #[arg(long = "type", value_name = "EVENT_TYPE", value_parser = parse_token)]
    pub event_type: Option<String>,
    /// Only this aggregate, `type/id` (`*` for either part), e.g. `agent/a1` or `workflow/*`.
    #[arg(long, value_name = "TYPE/ID", value_parser = parse_aggregate_pattern)]
    pub aggregate: Option<(String, String)>,
    /// Only events from this source (exact, or a prefix ending in `*`: `grizzly/handler/*`).
    #[arg(long)]
    pub source: Option<String>,
    /// Start from the beginning of the log.
    #[arg(long, conflicts_with = "last")]
    pub from_start: bool,
    /// Start this many events back.
    #[arg(long)]
    pub last: Option<u64>,
    /// One JSON object per line (seq, subject, event).
    #[arg(long)]
    pub json: bool,
    /// Stop after this many events.
    #[arg(long)]
    pub count: Option<usize>,
    /// Print what the log holds now and exit instead of waiting for new events.
    #[arg(long)]
    pub no_follow: bool,
}

#[derive(clap::Args)]
pub struct ReplayArgs {
    /// The aggregate, `type/id`, e.g. `agent/a1` or `workflow/<instance>`.
    #[arg(long, value_name = "TYPE/ID", value_parser = parse_aggregate)]
    pub aggregate: (String, String),
    /// Show steps from this log sequence on (earlier events are folded without printing).
    #[arg(long, value_name = "SEQ")]
    pub from: Option<u64>,
    /// Stop after this log sequence (the state shown is the state at that point).
    #[arg(long, value_name = "SEQ")]
    pub to: Option<u64>,
    /// One JSON document: the steps and the final state.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct TraceArgs {
    /// The id of the event to start from.
    pub id: String,
    /// The tree as one JSON document.
    #[arg(long)]
    pub json: bool,
}

fn parse_pattern(s: &str) -> Result<String, String> {
    subject::validate_pattern(s).map(|_| s.to_string())
}

fn parse_token(s: &str) -> Result<String, String> {
    if subject::is_valid_token(s) {
        Ok(s.to_string())
    } else {
        Err(format!("`{s}` must match [A-Za-z0-9_-]+"))
    }
}

fn parse_aggregate(s: &str) -> Result<(String, String), String> {
    subject::parse_aggregate_key(s, false)
}

fn parse_aggregate_pattern(s: &str) -> Result<(String, String), String> {
    subject::parse_aggregate_key(s, true)
}

/// A usage error found after parsing (e.g. `--from` after `--to`): same exit code as clap's.
fn usage(msg: impl Display) -> anyhow::Result<ExitCode> {
    eprintln!("error: {msg}");
    Ok(ExitCode::from(2))
}

pub async fn run(settings: &Settings, cmd: EventsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        EventsCommand::Tail(args) => tail(settings, args).await,
        EventsCommand::Replay(args) => replay(settings, args).await,
        EventsCommand::Trace(args) => trace(settings, args).await,
    }
}

/// `12:34:56.789Z` (UTC): the time column of `tail`.
fn clock(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// A value on one line, cut at `max` characters.
fn short(v: &Value, max: usize) -> String {
    let s = v.to_string();
    if s.chars().count() <= max {
        s
    } else {
        format!("{}…", s.chars().take(max).collect::<String>())
    }
}

fn source_matches(wanted: &str, source: &str) -> bool {
    match wanted.strip_suffix('*') {
        Some(prefix) => source.starts_with(prefix),
        None => source == wanted,
    }
}

async fn tail(settings: &Settings, args: TailArgs) -> anyhow::Result<ExitCode> {
    // The broker filters by the narrowest single subject; the positional pattern and the source
    // are checked here, so every filter combines with every other.
    let server_filter = if args.aggregate.is_some() || args.event_type.is_some() {
        let (t, i) = args
            .aggregate
            .as_ref()
            .map(|(t, i)| (Some(t.as_str()), Some(i.as_str())))
            .unwrap_or((None, None));
        subject::events_filter(t, i, args.event_type.as_deref())
    } else {
        args.filter.clone()
    };
    let nats = nats::connect(&settings.nats_url, "grizzly-tail", false).await?;
    let mut stream = nats.js.get_stream(EVENTS_STREAM).await?;
    let deliver_policy = match (args.from_start, args.last) {
        (true, _) => DeliverPolicy::All,
        (_, Some(n)) => {
            let last_seq = stream.info().await?.state.last_sequence;
            DeliverPolicy::ByStartSequence {
                start_sequence: last_seq.saturating_sub(n.saturating_sub(1)).max(1),
            }
        }
        _ => DeliverPolicy::New,
    };
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: server_filter,
            deliver_policy,
            ..Default::default()
        })
        .await?;
    // Nothing to show and nothing to wait for: the pending count rides on messages only.
    if args.no_follow && consumer.cached_info().num_pending == 0 {
        return Ok(ExitCode::SUCCESS);
    }
    let mut messages = consumer.messages().await?;
    let mut printed = 0;
    while let Some(msg) = messages.next().await {
        let msg = msg?;
        let caught_up = msg.info().is_ok_and(|i| i.pending == 0);
        if show(&args, &msg)? {
            printed += 1;
        }
        if args.count.is_some_and(|c| printed >= c) || (args.no_follow && caught_up) {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints `msg` if it passes the filters that the broker's subject filter cannot express;
/// returns whether it did.
fn show(args: &TailArgs, msg: &async_nats::jetstream::Message) -> anyhow::Result<bool> {
    if !pattern_matches(&args.filter, msg.subject.as_str()) {
        return Ok(false);
    }
    let stored = StoredMessage::from_jetstream(msg).map_err(anyhow::Error::msg)?;
    let event = EventEnvelope::from_stored(&stored, usize::MAX);
    if let Some(wanted) = &args.source
        && !event
            .as_ref()
            .is_ok_and(|e| source_matches(wanted, &e.source))
    {
        return Ok(false);
    }
    let seq = stored.stream_sequence;
    let subject = msg.subject.as_str();
    if args.json {
        let line = match &event {
            Ok(e) => json!({"seq": seq, "subject": subject, "event": e}),
            Err(err) => json!({"seq": seq, "subject": subject, "error": err.to_string()}),
        };
        println!("{line}");
    } else {
        let what = match &event {
            Ok(e) => short(&e.data, 100),
            Err(err) => format!("(invalid: {err})"),
        };
        println!(
            "{}  {seq:>8}  {subject:<44}  {what}",
            clock(stored.published)
        );
    }
    Ok(true)
}

/// One message of a scan.
struct LogEntry<'a> {
    seq: u64,
    logged: OffsetDateTime,
    subject: &'a str,
    event: Result<EventEnvelope, IngestError>,
}

/// Reads the messages of `EVENTS` matching `filter` once, in log order, from the start up to the
/// last message the stream held when the scan began; `visit` returns `false` to stop early.
/// Returns how many messages were read.
async fn scan_log(
    nats: &Nats,
    filter: &str,
    mut visit: impl FnMut(LogEntry<'_>) -> bool,
) -> anyhow::Result<u64> {
    let mut stream = nats.js.get_stream(EVENTS_STREAM).await?;
    let end = stream.info().await?.state.last_sequence;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter.to_string(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    if consumer.cached_info().num_pending == 0 {
        return Ok(0);
    }
    let mut messages = consumer.messages().await?;
    let mut read = 0;
    loop {
        let msg = tokio::time::timeout(SCAN_STALL, messages.next())
            .await
            .with_context(|| format!("the log sent nothing for {SCAN_STALL:?} while scanning"))?
            .context("the log's message stream ended during the scan")??;
        let stored = StoredMessage::from_jetstream(&msg).map_err(anyhow::Error::msg)?;
        let seq = stored.stream_sequence;
        if seq > end {
            break;
        }
        read += 1;
        let pending = msg.info().map(|i| i.pending).unwrap_or(0);
        let entry = LogEntry {
            seq,
            logged: stored.published,
            subject: stored.subject,
            event: EventEnvelope::from_stored(&stored, usize::MAX),
        };
        if !visit(entry) || pending == 0 || seq >= end {
            break;
        }
    }
    Ok(read)
}

/// One printed step of a replay.
#[derive(serde::Serialize)]
struct Step {
    seq: u64,
    #[serde(rename = "type")]
    event_type: String,
    id: String,
    time: String,
    changes: Vec<Change>,
}

fn describe(c: &Change) -> String {
    match (&c.from, &c.to) {
        (None, Some(to)) => format!("{} = {}", c.path, short(to, 60)),
        (Some(from), None) => format!("{} removed (was {})", c.path, short(from, 60)),
        (Some(from), Some(to)) => format!("{}: {} → {}", c.path, short(from, 60), short(to, 60)),
        (None, None) => c.path.clone(),
    }
}

async fn replay(settings: &Settings, args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let (aggregate_type, aggregate_id) = &args.aggregate;
    let key = format!("{aggregate_type}/{aggregate_id}");
    let from = args.from.unwrap_or(1);
    let to = args.to.unwrap_or(u64::MAX);
    if from > to {
        return usage(format!("--from {from} is after --to {to}"));
    }
    let filter = subject::aggregate_filter(aggregate_type, aggregate_id);
    let nats = nats::connect(&settings.nats_url, "grizzly-replay", false).await?;
    let mut fold = Fold::for_aggregate(aggregate_type, aggregate_id);
    let mut steps = Vec::new();
    let mut skipped = Vec::new();
    let (mut folded_before, mut first_seq, mut last_seq) = (0u64, None, 0u64);
    scan_log(&nats, &filter, |entry| {
        if entry.seq > to {
            return false;
        }
        first_seq.get_or_insert(entry.seq);
        last_seq = entry.seq;
        match entry.event {
            // Never an event (it was dead-lettered at ingest): nothing to fold, but say so.
            Err(e) if entry.seq >= from => {
                skipped.push(json!({"seq": entry.seq, "error": e.to_string()}))
            }
            Err(_) => {}
            Ok(event) => {
                let changes = fold.apply(&event, entry.seq);
                if entry.seq < from {
                    folded_before += 1;
                } else {
                    steps.push(Step {
                        seq: entry.seq,
                        event_type: event.event_type,
                        id: event.id,
                        time: event.time,
                        changes,
                    });
                }
            }
        }
        true
    })
    .await?;
    let Some(first_seq) = first_seq else {
        bail!("unknown aggregate `{key}`: no events on `{filter}` in the log");
    };
    if steps.is_empty() && skipped.is_empty() {
        bail!(
            "aggregate `{key}` has no events between seq {from} and {} (its events start at seq {first_seq})",
            args.to.map_or("the end".into(), |t| t.to_string())
        );
    }
    if args.json {
        let doc = json!({
            "aggregate": key,
            "fold": fold.kind(),
            "from": from,
            "to": last_seq,
            "folded_before": folded_before,
            "steps": steps,
            "skipped": skipped,
            "state": fold.state(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("replay of {key} ({} fold)", fold.kind());
    if folded_before > 0 {
        println!("  {folded_before} event(s) before seq {from} folded without printing");
    }
    // Steps and skipped messages, in log order.
    let mut lines: Vec<(u64, String)> = steps
        .iter()
        .map(|step| {
            let changes = if step.changes.is_empty() {
                "(no change)".to_string()
            } else {
                let all: Vec<String> = step.changes.iter().map(describe).collect();
                all.join(", ")
            };
            (step.seq, format!("{:<20}  {changes}", step.event_type))
        })
        .collect();
    for s in &skipped {
        let seq = s["seq"].as_u64().unwrap_or(0);
        let error = s["error"].as_str().unwrap_or("");
        lines.push((seq, format!("skipped: {error}")));
    }
    lines.sort_by_key(|(seq, _)| *seq);
    for (seq, line) in lines {
        println!("seq {seq:>7}  {line}");
    }
    println!("\nstate after seq {last_seq}:");
    match &fold {
        Fold::Workflow(view) => crate::workflow::print_view(view),
        Fold::Generic(state) => {
            println!("aggregate  {}", state.aggregate);
            if let Some(last) = &state.last_event {
                println!(
                    "events     {} (last: {} at seq {}, {})",
                    state.events, last.event_type, last.seq, last.time
                );
            }
            let counts: Vec<String> = state
                .counts
                .iter()
                .map(|(t, n)| format!("{t}={n}"))
                .collect();
            println!("counts     {}", counts.join(" "));
            for (name, h) in &state.handlers {
                let mut line = format!(
                    "handler    {name}: {} succeeded, {} failed",
                    h.succeeded, h.failed
                );
                if !h.last_output.is_null() {
                    line.push_str(&format!(", last output {}", short(&h.last_output, 60)));
                }
                if let Some(e) = &h.last_error {
                    line.push_str(&format!(", last error {}", short(&json!(e), 60)));
                }
                println!("{line}");
            }
            println!("data       {}", state.data);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn trace(settings: &Settings, args: TraceArgs) -> anyhow::Result<ExitCode> {
    if args.id.trim().is_empty() {
        return usage("the event id is empty");
    }
    let nats = nats::connect(&settings.nats_url, "grizzly-trace", false).await?;
    let mut builder = TraceBuilder::new(&args.id);
    let scanned = scan_log(&nats, subject::EVENTS_ALL, |entry| {
        if let Ok(event) = &entry.event {
            builder.offer(entry.seq, entry.logged, entry.subject, event);
        }
        true
    })
    .await?;
    let Some(tree) = builder.finish() else {
        bail!(
            "event `{}` is not in the log ({scanned} events searched)",
            args.id
        );
    };
    let span_ms = max_offset(&tree);
    if args.json {
        let doc = json!({
            "events": tree.event_count(),
            "span_ms": span_ms,
            "scanned": scanned,
            "tree": tree,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", tree.render());
        println!(
            "{} event(s) over {span_ms}ms; root stored at {}; {scanned} events scanned",
            tree.event_count(),
            tree.logged
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn max_offset(node: &crate::causation::TraceNode) -> i64 {
    node.children
        .iter()
        .map(max_offset)
        .fold(node.offset_ms, i64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_match_exactly_or_by_prefix() {
        assert!(source_matches("grizzly/cli", "grizzly/cli"));
        assert!(!source_matches("grizzly/cli", "grizzly/cli2"));
        assert!(source_matches("grizzly/handler/*", "grizzly/handler/echo"));
        assert!(!source_matches("grizzly/handler/*", "nats"));
    }

    #[test]
    fn times_and_values_are_short() {
        let t = OffsetDateTime::UNIX_EPOCH + time::Duration::milliseconds(3_723_045);
        assert_eq!(clock(t), "01:02:03.045Z");
        assert_eq!(short(&json!("abcdef"), 4), "\"abc…");
    }
}
