//! `grizzly workflow ...`: validate, schema, start, status, list, suspend, resume, cancel, test,
//! docs. Reads go to the read model (`grizzly_wf_view`), writes are events the coordinator
//! consumes (`events.workflow.<id>.<start|suspend|resume|cancel>_requested`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use futures::StreamExt;
use grizzly_coordinator::dsl::{self, Catalog};
use grizzly_coordinator::machine::{self, Status, Transition};
use grizzly_coordinator::projection::{self, InstanceView, VIEW_AGGREGATE_ID};
use grizzly_coordinator::registry;
use grizzly_coordinator::simulate;
use grizzly_shared::envelope::{EventEnvelope, StoredMessage};
use grizzly_shared::handler::{LoadedHandler, load_handlers};
use grizzly_shared::nats::{self, EVENTS_STREAM, Nats, publish_confirmed};
use grizzly_shared::{EventSubject, Settings};
use serde_json::{Value, json};

#[derive(clap::Subcommand)]
pub enum WorkflowCommand {
    /// Check workflow files: syntax, unknown keys, handlers, expressions, jumps, step ids.
    /// Without files, every workflow in the workflows directory.
    Validate { paths: Vec<PathBuf> },
    /// Print the JSON Schema of the workflow language (for editors).
    Schema,
    /// Start an instance; prints its id.
    Start {
        name: String,
        /// The instance input, as JSON.
        #[arg(long, default_value = "{}")]
        input: String,
        /// Instance id (default: a new UUIDv7); starting the same id twice starts it once.
        #[arg(long)]
        id: Option<String>,
        /// Version to run (default: the newest).
        #[arg(long)]
        version: Option<u32>,
        /// Wait until the instance ends and print its status.
        #[arg(long)]
        wait: bool,
        /// How long `--wait` waits.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Where one instance stands (from the read model).
    Status {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Instances (from the read model).
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        workflow: Option<String>,
        #[arg(long)]
        json: bool,
        /// Rebuild the read model by replaying the log (asks the coordinator, then lists).
        #[arg(long)]
        rebuild: bool,
    },
    /// Pause an instance: no new step starts until it is resumed.
    Suspend(ControlArgs),
    /// Resume a suspended instance.
    Resume(ControlArgs),
    /// Cancel an instance.
    Cancel(ControlArgs),
    /// Rebuild the instances' checkpoints by replaying the log, where they are lost (a region
    /// promoted after a failover): publishes what the log lacks, writes the tasks of steps in
    /// flight again, and starts the coordinators after the log's last event. Coordinators
    /// stopped. Exits 1 having done nothing when it refuses, 3 when it restored all but the
    /// instances it names as not restored.
    Restore,
    /// Run workflow test files (scripted handler outputs, no broker).
    Test { paths: Vec<PathBuf> },
    /// Render a workflow as Markdown with a Mermaid diagram.
    Docs {
        path: PathBuf,
        /// Write to this file instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
pub struct ControlArgs {
    pub id: String,
    #[arg(long)]
    pub reason: Option<String>,
    /// How long to wait for the coordinator to confirm.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

pub async fn run(settings: &Settings, cmd: WorkflowCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        WorkflowCommand::Validate { paths } => validate(settings, paths),
        WorkflowCommand::Schema => {
            println!("{}", serde_json::to_string_pretty(&dsl::json_schema())?);
            Ok(ExitCode::SUCCESS)
        }
        WorkflowCommand::Test { paths } => test(settings, paths),
        WorkflowCommand::Docs { path, output } => docs(settings, &path, output),
        WorkflowCommand::Start {
            name,
            input,
            id,
            version,
            wait,
            timeout,
        } => start(settings, name, input, id, version, wait, timeout).await,
        WorkflowCommand::Status { id, json } => status(settings, &id, json).await,
        WorkflowCommand::List {
            status,
            workflow,
            json,
            rebuild,
        } => list(settings, status, workflow, json, rebuild).await,
        WorkflowCommand::Suspend(a) => control(settings, Transition::Suspend, a).await,
        WorkflowCommand::Resume(a) => control(settings, Transition::Resume, a).await,
        WorkflowCommand::Cancel(a) => control(settings, Transition::Cancel, a).await,
        WorkflowCommand::Restore => restore(settings).await,
    }
}

fn handlers(settings: &Settings) -> anyhow::Result<Vec<LoadedHandler>> {
    load_handlers(&settings.handlers_dir).with_context(|| {
        format!(
            "the handlers in {} must load before workflows can be checked",
            settings.handlers_dir.display()
        )
    })
}

fn validate(settings: &Settings, mut paths: Vec<PathBuf>) -> anyhow::Result<ExitCode> {
    let handlers = handlers(settings)?;
    let dir_files = dsl::workflow_files(&settings.workflows_dir).unwrap_or_default();
    if paths.is_empty() {
        paths = dir_files.clone();
    }
    // Every workflow known (for `run` references): the directory plus the files given.
    let mut catalog = Catalog::from_handlers(&handlers);
    for p in dir_files.iter().chain(paths.iter()) {
        if let Ok(text) = std::fs::read_to_string(p)
            && let Ok(spec) = dsl::parse_workflow(p, &text)
        {
            catalog.add_workflow(spec.name(), spec.version);
        }
    }
    let mut errors = 0;
    for path in &paths {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{}: cannot read: {e}", path.display());
                errors += 1;
                continue;
            }
        };
        match dsl::load_workflow(path, &text, &catalog) {
            Ok(w) => println!("{}: ok ({} v{})", path.display(), w.name(), w.version()),
            Err(problems) => {
                for p in &problems {
                    eprintln!("{p}");
                }
                errors += problems.len();
            }
        }
    }
    if errors > 0 {
        eprintln!("{errors} problem(s)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn test(settings: &Settings, paths: Vec<PathBuf>) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(!paths.is_empty(), "give one or more test files");
    let handlers = handlers(settings)?;
    let (mut passed, mut failed) = (0, 0);
    for path in paths {
        for case in simulate::run_file(&path, &handlers)? {
            if case.problems.is_empty() {
                passed += 1;
                println!("ok   {} :: {}", path.display(), case.name);
            } else {
                failed += 1;
                println!("FAIL {} :: {}", path.display(), case.name);
                for p in &case.problems {
                    println!("       {p}");
                }
                if let Some(run) = &case.run {
                    println!("       events: {}", run.events.join(", "));
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn docs(settings: &Settings, path: &Path, output: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let spec = dsl::parse_workflow(path, &text)
        .map_err(|e| anyhow::anyhow!("{}", dsl::WorkflowErrors(e)))?;
    let _ = settings;
    let md = grizzly_coordinator::docs::markdown(&spec);
    match output {
        Some(out) => {
            std::fs::write(&out, md).with_context(|| format!("writing {}", out.display()))?
        }
        None => print!("{md}"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn connect(settings: &Settings) -> anyhow::Result<Nats> {
    Ok(nats::connect(&settings.nats_url, "grizzly-workflow", false).await?)
}

async fn append(nats: &Nats, subject: &EventSubject, data: Value) -> anyhow::Result<u64> {
    let event = EventEnvelope::new(subject, "grizzly/cli", data);
    let publish = async_nats::jetstream::message::PublishMessage::build()
        .payload(event.to_json_bytes())
        .headers(event.headers());
    let ack = tokio::time::timeout(
        Duration::from_secs(30),
        publish_confirmed(&nats.js, &subject.to_string(), publish, None),
    )
    .await
    .context("the broker did not confirm the event")?;
    Ok(ack.sequence)
}

/// Waits for the first event of `instance` after `after` whose type is in `types`.
async fn wait_for(
    nats: &Nats,
    instance: &str,
    after: u64,
    types: &[&str],
    timeout: Duration,
) -> anyhow::Result<Option<EventEnvelope>> {
    let stream = nats.js.get_stream(EVENTS_STREAM).await?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: format!("events.workflow.{instance}.>"),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: after + 1,
            },
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let until = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(until, messages.next()).await {
            Err(_) => return Ok(None),
            Ok(None) => return Ok(None),
            Ok(Some(Err(e))) => bail!("reading the log: {e}"),
            Ok(Some(Ok(msg))) => {
                let stored = StoredMessage::from_jetstream(&msg).map_err(anyhow::Error::msg)?;
                if let Ok(e) = EventEnvelope::from_stored(&stored, usize::MAX)
                    && types.contains(&e.event_type.as_str())
                {
                    return Ok(Some(e));
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn start(
    settings: &Settings,
    name: String,
    input: String,
    id: Option<String>,
    version: Option<u32>,
    wait: bool,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let input: Value = serde_json::from_str(&input).context("--input is not valid JSON")?;
    let nats = connect(settings).await?;
    // Known locally or pinned by a coordinator: otherwise refuse now, with the reason.
    let local = dsl::workflow_files(&settings.workflows_dir)
        .unwrap_or_default()
        .iter()
        .filter_map(|p| {
            let text = std::fs::read_to_string(p).ok()?;
            dsl::parse_workflow(p, &text).ok()
        })
        .any(|s| s.name() == name);
    if !local {
        let pinned = registry::ensure_bucket(&nats.js, settings.streams.replicas).await?;
        let mut keys = pinned.keys().await?;
        let mut found = false;
        while let Some(k) = keys.next().await {
            if k?.starts_with(&format!("{name}.v")) {
                found = true;
            }
        }
        if !found {
            bail!(
                "unknown workflow `{name}`: not in {} and never run",
                settings.workflows_dir.display()
            );
        }
    }
    let id = id.unwrap_or_else(grizzly_shared::ids::new_event_id);
    let subject = EventSubject::new("workflow", &id, "start_requested")
        .with_context(|| format!("instance id `{id}`"))?;
    let seq = append(
        &nats,
        &subject,
        json!({"workflow": name, "version": version, "input": input}),
    )
    .await?;
    println!("{id}");
    if !wait {
        return Ok(ExitCode::SUCCESS);
    }
    match wait_for(
        &nats,
        &id,
        seq,
        &["completed", "failed", "cancelled", "start_rejected"],
        timeout,
    )
    .await?
    {
        Some(e) => {
            println!("{}: {}", e.event_type, e.data);
            Ok(if e.event_type == "completed" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        None => bail!("instance {id} did not end within {timeout:?}"),
    }
}

async fn view(
    settings: &Settings,
    nats: &Nats,
) -> anyhow::Result<async_nats::jetstream::kv::Store> {
    projection::ensure_bucket(&nats.js, settings.streams.replicas).await
}

pub(crate) fn print_view(v: &InstanceView) {
    println!("instance  {}", v.id);
    println!("workflow  {} v{}", v.workflow, v.version);
    println!("status    {}", v.status);
    println!("created   {}", v.created);
    println!("updated   {} ({} events)", v.updated, v.events);
    if let Some(p) = &v.parent {
        println!("parent    {p}");
    }
    if let Some(e) = &v.error {
        println!("error     {e}");
    }
    if let Some(r) = &v.last_rejection {
        println!("rejected  {r}");
    }
    if !v.output.is_null() {
        println!("output    {}", v.output);
    }
    println!("steps:");
    for (id, s) in &v.steps {
        let mut line = format!("  {id:<24} {:<10}", s.status);
        if let Some(h) = &s.handler {
            line.push_str(&format!(" {h}"));
        }
        if s.attempts > 1 {
            line.push_str(&format!(" (attempt {})", s.attempts));
        }
        if let Some(e) = &s.error {
            line.push_str(&format!(" error: {e}"));
        }
        println!("{line}");
    }
}

async fn status(settings: &Settings, id: &str, as_json: bool) -> anyhow::Result<ExitCode> {
    let nats = connect(settings).await?;
    let store = view(settings, &nats).await?;
    let Some(v) = projection::get(&store, id).await? else {
        bail!(
            "unknown instance `{id}` (not in the read model; `grizzly workflow list` shows them)"
        );
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_view(&v);
    }
    Ok(ExitCode::SUCCESS)
}

async fn restore(settings: &Settings) -> anyhow::Result<ExitCode> {
    let nats = connect(settings).await?;
    let done = grizzly_coordinator::restore::restore(&nats, settings).await?;
    match done.replayed {
        Some((first, last)) => println!(
            "replayed events {first}–{last}: {} applied to workflow instances",
            done.applied
        ),
        None => println!("the log is empty: nothing to replay"),
    }
    println!(
        "{} checkpoints written ({} unfinished)",
        done.instances, done.unfinished
    );
    println!(
        "published {} workflow event(s) the log lacked; wrote {} task(s) of steps in flight",
        done.published, done.tasks
    );
    for skipped in &done.skipped {
        println!("not restored: {skipped}");
    }
    println!(
        "coordinator partitions 0–{} start at sequence {}; start the coordinators, then `grizzly workflow list --rebuild`",
        settings.partitions.saturating_sub(1),
        done.cursor
    );
    if done.skipped.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    // Everything else is restored; a failover script must still see that these are not.
    eprintln!(
        "{} instance(s) not restored (above): their workflow version is neither in the workflows directory nor pinned; their later events are ignored",
        done.skipped.len()
    );
    Ok(ExitCode::from(RESTORE_INCOMPLETE))
}

/// `grizzly workflow restore`'s exit status when it restored all but the instances it names.
const RESTORE_INCOMPLETE: u8 = 3;

async fn list(
    settings: &Settings,
    status: Option<String>,
    workflow: Option<String>,
    as_json: bool,
    rebuild: bool,
) -> anyhow::Result<ExitCode> {
    let nats = connect(settings).await?;
    let store = view(settings, &nats).await?;
    if rebuild {
        let subject = EventSubject::new("workflow", VIEW_AGGREGATE_ID, "rebuild_requested")?;
        append(&nats, &subject, json!({})).await?;
        eprintln!("rebuild requested; the coordinator replays the log into the read model");
    }
    let all = projection::list(&store).await?;
    let rows: Vec<&InstanceView> = all
        .iter()
        .filter(|v| status.as_deref().is_none_or(|s| v.status == s))
        .filter(|v| workflow.as_deref().is_none_or(|w| v.workflow == w))
        .collect();
    if as_json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<38} {:<20} {:>3} {:<13} UPDATED",
        "INSTANCE", "WORKFLOW", "V", "STATUS"
    );
    for v in rows {
        println!(
            "{:<38} {:<20} {:>3} {:<13} {}",
            v.id, v.workflow, v.version, v.status, v.updated
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn control(
    settings: &Settings,
    t: Transition,
    args: ControlArgs,
) -> anyhow::Result<ExitCode> {
    let nats = connect(settings).await?;
    let store = view(settings, &nats).await?;
    let Some(v) = projection::get(&store, &args.id).await? else {
        bail!("unknown instance `{}`", args.id);
    };
    let current = v
        .status()
        .with_context(|| format!("instance {} has status `{}`", args.id, v.status))?;
    // An ended instance stays ended: refuse at once. Otherwise the read model may lag behind
    // the instance, so the coordinator decides (and answers `transition_rejected` if illegal).
    if current.is_terminal()
        && let Err(e) = machine::next(current, t)
    {
        eprintln!("{}: {e}", args.id);
        return Ok(ExitCode::FAILURE);
    }
    let subject = EventSubject::new("workflow", &args.id, format!("{t}_requested"))?;
    let seq = append(&nats, &subject, json!({"reason": args.reason})).await?;
    let done = match t {
        Transition::Suspend => Status::Suspended,
        Transition::Resume => Status::Running,
        _ => Status::Cancelled,
    };
    let reply = wait_for(
        &nats,
        &args.id,
        seq,
        &[t.event_type(), "transition_rejected"],
        args.timeout,
    )
    .await?;
    match reply {
        Some(e) if e.event_type == "transition_rejected" => {
            eprintln!(
                "{}: {}",
                args.id,
                e.data["error"].as_str().unwrap_or("transition rejected")
            );
            Ok(ExitCode::FAILURE)
        }
        Some(_) => {
            println!("{} {done}", args.id);
            Ok(ExitCode::SUCCESS)
        }
        None => bail!(
            "{}: the coordinator did not confirm `{t}` within {:?} (is it running?)",
            args.id,
            args.timeout
        ),
    }
}
