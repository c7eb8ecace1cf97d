//! `grizzly events tail [filter]`: follow the log with pretty or JSON output.

use std::process::ExitCode;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use futures::StreamExt;
use grizzly_shared::Settings;
use grizzly_shared::envelope::{EventEnvelope, StoredMessage, format_time};
use grizzly_shared::nats::{self, EVENTS_STREAM};

#[derive(clap::Subcommand)]
pub enum EventsCommand {
    /// Print events as they are appended (optionally from the start, or the last N).
    Tail {
        /// Subject filter, e.g. `events.agent.a1.>` (default: every event).
        #[arg(default_value = "events.>")]
        filter: String,
        /// Start from the beginning of the log.
        #[arg(long, conflicts_with = "last")]
        from_start: bool,
        /// Start this many events back.
        #[arg(long)]
        last: Option<u64>,
        /// One JSON object per line (seq, subject, event).
        #[arg(long)]
        json: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
}

pub async fn run(settings: &Settings, cmd: EventsCommand) -> anyhow::Result<ExitCode> {
    let EventsCommand::Tail {
        filter,
        from_start,
        last,
        json,
        count,
    } = cmd;
    grizzly_shared::subject::validate_pattern(&filter).map_err(anyhow::Error::msg)?;
    let nats = nats::connect(&settings.nats_url, "grizzly-tail", false).await?;
    let mut stream = nats.js.get_stream(EVENTS_STREAM).await?;
    let deliver_policy = match (from_start, last) {
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
            filter_subject: filter,
            deliver_policy,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut printed = 0;
    while let Some(msg) = messages.next().await {
        let msg = msg?;
        let stored = StoredMessage::from_jetstream(&msg).map_err(anyhow::Error::msg)?;
        let event = EventEnvelope::from_stored(&stored, usize::MAX);
        if json {
            let line = match &event {
                Ok(e) => {
                    serde_json::json!({"seq": stored.stream_sequence, "subject": msg.subject.as_str(), "event": e})
                }
                Err(err) => {
                    serde_json::json!({"seq": stored.stream_sequence, "subject": msg.subject.as_str(), "error": err.to_string()})
                }
            };
            println!("{line}");
        } else {
            match &event {
                Ok(e) => println!(
                    "{:>8}  {}  {:<48}  {}  {}",
                    stored.stream_sequence,
                    format_time(stored.published),
                    msg.subject.as_str(),
                    &e.id,
                    e.data
                ),
                Err(err) => println!(
                    "{:>8}  {}  {:<48}  (invalid: {err})",
                    stored.stream_sequence,
                    format_time(stored.published),
                    msg.subject.as_str()
                ),
            }
        }
        printed += 1;
        if count.is_some_and(|c| printed >= c) {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}
