//! `grizzly dlq list|show|redrive`: dead letters in stream `DLQ`.
//!
//! Redrive puts the work back where it failed: a handler's dead letter becomes a new task for
//! that handler (not a new event, so other handlers do not run again); an `_ingest` dead letter
//! (a body that never became an event) is re-published to its original subject. A redriven entry
//! is removed from the DLQ once the broker confirmed the new write.

use std::process::ExitCode;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::message::PublishMessage;
use futures::StreamExt;
use grizzly_shared::dlq::{DeadLetter, map_to_headers};
use grizzly_shared::nats::{self, DLQ_STREAM, Nats, publish_confirmed};
use grizzly_shared::{Settings, Task};

#[derive(clap::Subcommand)]
pub enum DlqCommand {
    /// One line per dead letter: sequence, subject, kind, attempts, error.
    List {
        /// Only this handler's dead letters (`_ingest` for unparseable events).
        #[arg(long)]
        handler: Option<String>,
    },
    /// The whole record of one dead letter.
    Show { seq: u64 },
    /// Re-run dead letters (by sequence, or `--all`, optionally of one handler).
    Redrive {
        seqs: Vec<u64>,
        #[arg(long)]
        all: bool,
        #[arg(long)]
        handler: Option<String>,
    },
}

pub async fn run(settings: &Settings, cmd: DlqCommand) -> anyhow::Result<ExitCode> {
    let nats = nats::connect(&settings.nats_url, "grizzly-dlq", false).await?;
    nats::ensure_streams(&nats.js, &settings.streams).await?;
    match cmd {
        DlqCommand::List { handler } => {
            let entries = list(&nats, handler.as_deref()).await?;
            for (seq, subject, d) in &entries {
                let error: String = d.error.chars().take(100).collect();
                println!(
                    "{seq:>8}  {subject:<24}  {:<18}  attempts={}  {error}",
                    d.kind, d.attempts
                );
            }
            eprintln!("{} dead letter(s)", entries.len());
        }
        DlqCommand::Show { seq } => {
            let (_, dead) = get(&nats, seq).await?;
            println!("{}", serde_json::to_string_pretty(&dead)?);
        }
        DlqCommand::Redrive { seqs, all, handler } => {
            anyhow::ensure!(
                all || !seqs.is_empty(),
                "name dead letters by sequence, or pass --all"
            );
            let targets: Vec<u64> = if all {
                list(&nats, handler.as_deref())
                    .await?
                    .into_iter()
                    .map(|(s, _, _)| s)
                    .collect()
            } else {
                seqs
            };
            for seq in targets {
                let (subject, dead) = get(&nats, seq).await?;
                redrive(&nats, settings, seq, &subject, &dead).await?;
                println!("redriven {seq} ({subject})");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Every dead letter (optionally of one handler), oldest first.
pub async fn list(
    nats: &Nats,
    handler: Option<&str>,
) -> anyhow::Result<Vec<(u64, String, DeadLetter)>> {
    let mut stream = nats.js.get_stream(DLQ_STREAM).await?;
    let last = stream.info().await?.state.last_sequence;
    let mut out = Vec::new();
    if stream.info().await?.state.messages == 0 {
        return Ok(out);
    }
    let filter = handler
        .map(grizzly_shared::subject::dlq_subject)
        .unwrap_or_else(|| "dlq.>".into());
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    loop {
        let next =
            tokio::time::timeout(std::time::Duration::from_millis(500), messages.next()).await;
        let Ok(Some(msg)) = next else { break };
        let msg = msg?;
        let seq = msg
            .info()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .stream_sequence;
        if let Ok(dead) = serde_json::from_slice::<DeadLetter>(&msg.payload) {
            out.push((seq, msg.subject.to_string(), dead));
        }
        if seq >= last {
            break;
        }
    }
    Ok(out)
}

async fn get(nats: &Nats, seq: u64) -> anyhow::Result<(String, DeadLetter)> {
    let stream = nats.js.get_stream(DLQ_STREAM).await?;
    let raw = stream
        .get_raw_message(seq)
        .await
        .with_context(|| format!("no dead letter at sequence {seq}"))?;
    let dead: DeadLetter = serde_json::from_slice(&raw.payload)
        .with_context(|| format!("dead letter {seq} is not a Grizzly dead-letter record"))?;
    Ok((raw.subject.to_string(), dead))
}

async fn redrive(
    nats: &Nats,
    settings: &Settings,
    seq: u64,
    subject: &str,
    dead: &DeadLetter,
) -> anyhow::Result<()> {
    let (target, publish) = match (&dead.handler, &dead.event) {
        (Some(handler), Some(event)) => {
            let mut task = Task::new(
                handler,
                dead.handler_version.unwrap_or(1),
                dead.event_seq.unwrap_or(0),
                settings.partitions,
                event.priority,
                event.clone(),
            );
            task.redrive = Some(seq);
            let publish = PublishMessage::build()
                .payload(task.to_json_bytes())
                .message_id(task.msg_id());
            (task.subject(), publish)
        }
        _ => {
            let mut headers = map_to_headers(&dead.original_headers);
            headers.insert(
                grizzly_shared::headers::MSG_ID,
                format!("redrive:{seq}").as_str(),
            );
            let publish = PublishMessage::build()
                .payload(dead.original_payload_bytes().into())
                .headers(headers);
            (dead.original_subject.clone(), publish)
        }
    };
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        publish_confirmed(&nats.js, &target, publish, None),
    )
    .await
    .with_context(|| format!("redrive of {seq} ({subject}) was not confirmed"))?;
    let stream = nats.js.get_stream(DLQ_STREAM).await?;
    stream
        .delete_message(seq)
        .await
        .with_context(|| format!("removing dead letter {seq}"))?;
    Ok(())
}
