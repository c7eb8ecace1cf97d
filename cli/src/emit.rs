//! `grizzly emit <subject> <json>`: append one event (CloudEvents envelope, UUIDv7 id).

use std::process::ExitCode;

use anyhow::Context as _;
use grizzly_shared::nats::{self, publish_confirmed};
use grizzly_shared::{EventEnvelope, EventSubject, Priority, Settings};

#[derive(clap::Args)]
pub struct EmitArgs {
    /// `events.<aggregate_type>.<aggregate_id>.<event_type>`
    pub subject: String,
    /// The event's data, as JSON (`-` reads it from stdin).
    pub data: String,
    #[arg(long, default_value = "normal")]
    pub priority: Priority,
    #[arg(long, default_value = "grizzly/cli")]
    pub source: String,
    /// Event id (default: a new UUIDv7); re-emitting the same id is de-duplicated.
    #[arg(long)]
    pub id: Option<String>,
    #[arg(long)]
    pub correlation_id: Option<String>,
    /// W3C trace context to continue (e.g. a handler script passing on its event's
    /// `traceparent`); without it the event starts a new trace when tracing is on.
    #[arg(long, env = "TRACEPARENT")]
    pub traceparent: Option<String>,
}

pub async fn run(settings: &Settings, args: EmitArgs) -> anyhow::Result<ExitCode> {
    let subject = EventSubject::parse(&args.subject)?;
    let text = if args.data == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the data from stdin")?
    } else {
        args.data
    };
    let data: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("the data for {} is not valid JSON", args.subject))?;
    let bytes = data.to_string().len();
    anyhow::ensure!(
        bytes <= settings.max_event_bytes,
        "the data for {} is {bytes} bytes, over max_event_bytes ({})",
        args.subject,
        settings.max_event_bytes
    );
    let mut event = EventEnvelope::new(&subject, &args.source, data);
    event.priority = args.priority;
    if let Some(id) = args.id {
        event.id = id;
    }
    event.correlationid = Some(args.correlation_id.unwrap_or_else(|| event.id.clone()));
    // The root of the event's trace (or a child of --traceparent) when tracing is on: everything
    // the event causes descends from this span.
    let span = tracing::debug_span!("emit", otel.kind = "producer", event.id = %event.id, subject = %subject);
    if let Some(tp) = &args.traceparent {
        anyhow::ensure!(
            grizzly_shared::trace::is_valid(tp),
            "--traceparent `{tp}` is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)"
        );
    }
    grizzly_shared::trace::follow_traceparent(&span, args.traceparent.as_deref());
    event.traceparent = args.traceparent;
    grizzly_shared::trace::stamp(&mut event, &span);
    let nats = nats::connect(&settings.nats_url, "grizzly-emit", false).await?;
    let publish = async_nats::jetstream::message::PublishMessage::build()
        .payload(event.to_json_bytes())
        .headers(event.headers());
    let ack = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        publish_confirmed(&nats.js, &subject.to_string(), publish, None),
    )
    .await
    .with_context(|| {
        format!(
            "the broker at {} did not confirm the event",
            settings.nats_url
        )
    })?;
    if ack.duplicate {
        println!(
            "{} already in the log (duplicate id), seq {}",
            event.id, ack.sequence
        );
    } else {
        println!("{} appended at seq {}", event.id, ack.sequence);
    }
    Ok(ExitCode::SUCCESS)
}
