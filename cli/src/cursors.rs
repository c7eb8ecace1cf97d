//! `grizzly cursors show|set`: where each partition of the listeners and of the coordinators
//! resumes reading the log.
//!
//! Both keep their progress as a cursor per partition in KV (`cursor.<p>` in `grizzly_listener`
//! and in `grizzly_wf_cursors`). A partition without one starts at the beginning of the log,
//! which is right for a new deployment and wrong for one that takes over a log whose routing
//! state is gone: a region promoted after a failover (KV buckets are not replicated, see
//! docs/multi-region.md) or a deployment whose buckets were lost. There every event ever written
//! would be routed again and every workflow ever triggered started again. `set` starts every
//! partition at one chosen point instead; only while no listener or coordinator runs, since a
//! running one would overwrite the cursors with its own.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::{self, kv};
use futures::StreamExt as _;
use grizzly_coordinator::reader as wf_reader;
use grizzly_listener::partitions as routing;
use grizzly_shared::Settings;
use grizzly_shared::nats::{self, CURSORS_BUCKET, EVENTS_STREAM};
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const NO_LOG: &str =
    "no EVENTS stream on this server (check --nats-url; a Grizzly component creates it at start)";

#[derive(clap::Subcommand)]
pub enum CursorsCommand {
    /// Each partition's listener and coordinator cursor, and who holds the partition now.
    Show {
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Start every partition at one point of the log (listeners and coordinators stopped).
    Set(SetArgs),
}

#[derive(clap::Args)]
pub struct SetArgs {
    /// The first log sequence to route and apply.
    #[arg(
        long,
        value_name = "SEQ",
        required_unless_present = "time",
        conflicts_with = "time"
    )]
    pub seq: Option<u64>,
    /// The first event stored at or after this time (RFC 3339, e.g. 2026-12-07T15:00:00Z).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub time: Option<OffsetDateTime>,
    /// Only the listeners' cursors, or only the coordinators' (default: both).
    #[arg(long, value_enum)]
    pub only: Option<Part>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Listener,
    Coordinator,
}

fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("not an RFC 3339 time (e.g. 2026-12-07T15:00:00Z): {e}"))
}

pub async fn run(settings: &Settings, cmd: CursorsCommand) -> anyhow::Result<ExitCode> {
    let nats = nats::connect(&settings.nats_url, "grizzly-cursors", false).await?;
    let js = &nats.js;
    match cmd {
        CursorsCommand::Show { json } => show(js, settings.partitions, json).await,
        CursorsCommand::Set(args) => set(js, settings, args).await,
    }
}

async fn show(js: &jetstream::Context, partitions: u16, as_json: bool) -> anyhow::Result<ExitCode> {
    let listener = nats::cursors_in(js, CURSORS_BUCKET)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let coordinator = nats::cursors_in(js, wf_reader::CURSORS_BUCKET)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let leases = holders(js, "").await?;
    let log = js
        .get_stream(EVENTS_STREAM)
        .await
        .context(NO_LOG)?
        .cached_info()
        .state
        .clone();
    let rows: Vec<_> = (0..partitions)
        .map(|p| {
            json!({
                "partition": p,
                "listener": {"cursor": listener.get(&p), "holder": leases.get(&routing::lease_key(p))},
                "coordinator": {"cursor": coordinator.get(&p), "holder": leases.get(&grizzly_coordinator::partition_lease(p))},
            })
        })
        .collect();
    if as_json {
        let out = json!({"log": {"first_seq": log.first_sequence, "last_seq": log.last_sequence}, "partitions": rows});
        println!("{out}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "log: sequences {}–{}",
        log.first_sequence, log.last_sequence
    );
    println!(
        "{:>9}  {:>15}  {:<24}  {:>18}  {:<24}",
        "partition", "listener cursor", "routed by", "coordinator cursor", "applied by"
    );
    let text = |v: Option<&String>| v.map_or("-".to_string(), Clone::clone);
    let seq = |v: Option<&u64>| v.map_or("-".to_string(), u64::to_string);
    for p in 0..partitions {
        println!(
            "{:>9}  {:>15}  {:<24}  {:>18}  {:<24}",
            p,
            seq(listener.get(&p)),
            text(leases.get(&routing::lease_key(p))),
            seq(coordinator.get(&p)),
            text(leases.get(&grizzly_coordinator::partition_lease(p))),
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn set(
    js: &jetstream::Context,
    settings: &Settings,
    args: SetArgs,
) -> anyhow::Result<ExitCode> {
    let events = js
        .get_stream(EVENTS_STREAM)
        .await
        .context("EVENTS stream")?;
    let state = events.cached_info().state.clone();
    let next = state.last_sequence + 1;
    let seq = match (args.seq, args.time) {
        (Some(0), _) => bail!("--seq 0: log sequences start at 1"),
        (Some(seq), _) if seq > next => bail!(
            "--seq {seq} lies beyond the end of the log: its last event is {}, the next one will be {next}",
            state.last_sequence
        ),
        (Some(seq), _) => seq,
        (None, Some(at)) => first_at_or_after(&events, &state, at).await?,
        (None, None) => unreachable!("clap requires --seq or --time"),
    };
    let parts: Vec<Part> = match args.only {
        Some(part) => vec![part],
        None => vec![Part::Listener, Part::Coordinator],
    };
    // A running component would overwrite the cursors with its own (and route meanwhile).
    for part in &parts {
        let (prefix, who) = match part {
            Part::Listener => ("route.", "listener"),
            Part::Coordinator => ("wf.partition.", "coordinator"),
        };
        if let Some((key, holder)) = holders(js, prefix).await?.pop_first() {
            bail!(
                "a {who} is running ({key} is held by {holder}): stop every {who} first, then set the cursors"
            );
        }
    }
    // Partitions the deployment has beyond `settings.partitions` would keep their old cursors.
    nats::check_partitions(
        js,
        &[CURSORS_BUCKET, wf_reader::CURSORS_BUCKET],
        settings.partitions,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let replicas = settings.streams.replicas;
    let value = bytes::Bytes::from(seq.to_string());
    for part in parts {
        let (bucket, name) = match part {
            Part::Listener => (nats::ensure_cursor_bucket(js, replicas).await?, "listener"),
            Part::Coordinator => (
                wf_reader::ensure_cursors_bucket(js, replicas).await?,
                "coordinator",
            ),
        };
        for p in 0..settings.partitions {
            bucket
                .put(nats::cursor_key(p), value.clone())
                .await
                .with_context(|| format!("writing {name} cursor.{p}"))?;
            if part == Part::Listener {
                // A bundled round announced at the old position would be formed again from
                // its start on the next claim: it belongs to the history being skipped.
                purge(&bucket, &routing::round_key(p)).await?;
            }
        }
        println!(
            "{name}: partitions 0–{} start at sequence {seq}",
            settings.partitions.saturating_sub(1)
        );
    }
    if seq < next {
        println!(
            "events {seq}–{} of the log will be routed and applied; those before are not",
            state.last_sequence
        );
    } else {
        println!("only events appended from now on will be routed and applied");
    }
    Ok(ExitCode::SUCCESS)
}

/// The sequence of the first event stored at or after `at`; the next sequence when none is.
async fn first_at_or_after(
    events: &jetstream::stream::Stream,
    state: &jetstream::stream::State,
    at: OffsetDateTime,
) -> anyhow::Result<u64> {
    if state.messages == 0 || state.last_timestamp < at {
        return Ok(state.last_sequence + 1);
    }
    // Some event is at or after `at`: an ordered reader starting there delivers it at once.
    let reader = events
        .create_consumer(pull::OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartTime { start_time: at },
            ..Default::default()
        })
        .await?;
    let mut messages = reader.messages().await?;
    let first = tokio::time::timeout(Duration::from_secs(10), messages.next())
        .await
        .context("no answer from the log within 10 s")?
        .context("the log ended")?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(first
        .info()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .stream_sequence)
}

/// [`nats::lease_holders`], its error as the command's.
async fn holders(
    js: &jetstream::Context,
    prefix: &str,
) -> anyhow::Result<BTreeMap<String, String>> {
    nats::lease_holders(js, prefix)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

async fn purge(bucket: &kv::Store, key: &str) -> anyhow::Result<()> {
    bucket
        .purge(key)
        .await
        .with_context(|| format!("removing {key}"))
}
