//! Fault injection (issue 8, "Prove the promises"): a steady stream of events over 30
//! aggregates runs through real `grizzly-listener` (two replicas sharing the log's partitions) /
//! `grizzly-worker` / `grizzly-coordinator` child processes and a real `nats-server`; two `process` handlers (`ledger`, `audit`) take
//! every `op` event, an always-failing one takes `doom` events, and a `claude` handler (the real
//! Claude Code CLI against the fake Messages API) takes one turn in 50, emitting an event through
//! MCP. One event in 20 starts a workflow instance (`order`: `reserve` and `charge`, both with a
//! saga compensation, then `ship`, which fails for one instance in four so the saga undoes
//! `charge` then `reserve`); its steps run on the `process` handler `step`, which logs every
//! invocation (instance, step, the worker that ran it) as its side effect. Every run mixes in
//! handler failures (2% fail their first attempt, 0.4% hang past the 2 s timeout) and poison
//! (1% each: malformed JSON, oversized, always-failing). One fault per scenario, a fresh broker
//! each, injected a third into the stream:
//!
//! | fault | recovery time: from the fault to ... |
//! |---|---|
//! | SIGKILL one of the two listeners (a new one is started) | the first outcome of an event appended after it in a partition the victim routed |
//! | SIGKILL a worker (a new one is started) | the first outcome in its partitions by another worker |
//! | SIGKILL the coordinator (a new one is started) | the first workflow transition caused by an event appended after it |
//! | SIGKILL both listeners + both workers + coordinator (all restarted) | the later of: the first outcome of a newer event by a new worker, the first transition caused by a newer event |
//! | SIGKILL `nats-server`, restart on the same store | the first outcome stored after the restart |
//! | SIGSTOP a worker past `ack_wait` (other worker takes over), SIGCONT | as for SIGKILL worker |
//! | SIGSTOP the only worker until its leases expire and past `ack_wait`, SIGCONT | its first outcome after SIGCONT |
//! | SIGSTOP one of the two listeners past its lease, SIGCONT | as for SIGKILL listener |
//! | SIGSTOP one of two coordinators until the other holds its workflow partitions, SIGCONT | the first transition in one of its partitions caused by an event appended after it |
//! | handlers failing 5% / hanging 1% | the longest failed attempt start → success |
//! | poison at 4% each kind | the longest append → dead letter |
//! | `EVENTS` full (`max_bytes` lowered, then restored) | from restoring: the first outcome |
//! | `TASKS` nearly full (4 KiB while workers drain it) | from restoring: the first outcome |
//!
//! Afterwards the whole log is read back (components stopped) and checked:
//! - every acknowledged event is in the log as published and has exactly one `handler_succeeded`
//!   per handler it routes to, or is in the DLQ with its reason; ≥ 99.9% of the good ones succeed;
//! - nothing happened twice: `handler_succeeded` per (event, handler), emitted events, dead
//!   letters and the published events are counted as *messages in the log* (the duplicate window
//!   drops re-sends, so any extra message is a real duplicate);
//! - every started workflow instance ended exactly once, as its definition says (`completed`, or
//!   `failed` with `charge` then `reserve` compensated); each of its steps started once and
//!   succeeded once (`step_started`, `handler_succeeded` per (instance, step)); and the step
//!   handler's own log shows each step ran once — a second run counts as a duplicate unless the
//!   worker running the first was killed or stopped mid-step, or the broker died (at-least-once
//!   delivery of a task whose outcome was never written; the note counts these re-runs);
//! - per aggregate, each handler's outcomes follow the log order of their causes, and an outcome
//!   comes after the events it reports as emitted;
//! - the workflow read model (`grizzly_wf_view`) caught up by itself and every instance's entry
//!   equals the log's workflow events applied in log order;
//! - the log replays to what the coordinators wrote: `grizzly workflow restore`, with their KV
//!   state deleted, finds every effect it produces in the log, no task to write again and no
//!   instance left running (the interpreter decides on its inputs in log order alone, also
//!   across the fault);
//! - the system finished every event and instance by itself, within a deadline.
//!
//! Network partitions are not simulated.
//!
//! `cargo test -p grizzly-tests --test faults -- --nocapture` prints the table (also written to
//! `$FAULTS_TABLE` if set; `FAULTS_ONLY=KillBroker` runs one scenario). The default is the CI size
//! (500 events per fault); `GRIZZLY_SOAK=1` runs 3,000 per fault. Needs
//! `cargo build --workspace --bins` first: the components run as real processes.

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail, ensure};
use async_nats::HeaderMap;
use async_nats::jetstream;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use bytes::Bytes;
use futures::StreamExt;
/// The `source` of the events the coordinator writes.
use grizzly_coordinator::instance::SOURCE as COORDINATOR;
use grizzly_devkit::{FakeApiConfig, FakeApiHandle, FakeMessagesApi};
use grizzly_shared::dlq::DeadLetter;
use grizzly_shared::envelope::StoredMessage;
use grizzly_shared::ids::stable_hash;
use grizzly_shared::nats::{DLQ_STREAM, EVENTS_STREAM, TASKS_STREAM};
use grizzly_shared::task::partition_for;
use grizzly_shared::{EventEnvelope, EventSubject};
use grizzly_tests::{ChildProcess, LoggedEvent, TestEnv};
use serde_json::{Value, json};
use tokio::sync::watch;

const AGGREGATES: usize = 30;
/// One event in `WORKFLOW_EVERY` starts an `order` instance (at position 12, clear of the
/// claude turns and the poison); one instance in `FAIL_EVERY` fails its last step.
const WORKFLOW_EVERY: usize = 20;
const FAIL_EVERY: usize = 4;
const ORDER_WORKFLOW: &str = r#"
name: order
do:
  - id: reserve
    call: step
    with: { n: "${ input.n }", fail_step: "${ input.fail_step }" }
    compensate: { call: step, with: { n: "${ output.n }" } }
  - id: charge
    call: step
    with: { n: "${ input.n }", fail_step: "${ input.fail_step }" }
    compensate: { call: step, with: { n: "${ output.n }" } }
  - id: ship
    call: step
    with: { n: "${ input.n }", fail_step: "${ input.fail_step }" }
    retry: { max_attempts: 1 }
output: { n: "${ input.n }", shipped: "${ steps.ship.output.step }" }
"#;
/// Steps a completed `order` ran, and those a failed one ran (compensations last).
const ORDER_STEPS: [&str; 3] = ["reserve", "charge", "ship"];
const ORDER_COMPENSATED: [&str; 2] = ["charge.compensate", "reserve.compensate"];
/// Bodies above this are dead-lettered by the listener (`oversized`).
const MAX_EVENT_BYTES: usize = 16 * 1024;

/// How big a run is: CI (default) or soak (`GRIZZLY_SOAK=1`).
#[derive(Debug, Clone, Copy)]
struct Profile {
    events: usize,
    /// Events per tick; the stream is `burst / tick` events per second.
    burst: usize,
    tick: Duration,
    /// Deadline for the system to finish all work once the stream ended.
    settle: Duration,
}

fn profile() -> Profile {
    if std::env::var("GRIZZLY_SOAK").is_ok_and(|v| !v.is_empty() && v != "0") {
        Profile {
            events: 3000,
            burst: 20,
            tick: Duration::from_millis(100),
            settle: Duration::from_secs(240),
        }
    } else {
        Profile {
            events: 500,
            burst: 10,
            tick: Duration::from_millis(100),
            settle: Duration::from_secs(120),
        }
    }
}

/// What is mixed into the stream (per mille of events, or one in `every`).
#[derive(Debug, Clone, Copy)]
struct Mix {
    /// `audit` fails the first attempt (then succeeds on retry).
    fail_per_mille: u64,
    /// `audit` hangs past its timeout on the first attempt.
    hang_per_mille: u64,
    /// One malformed, one oversized and one always-failing event in every `poison_every`.
    poison_every: usize,
    /// One `claude` turn in every `claude_every`.
    claude_every: usize,
}

const BASELINE: Mix = Mix {
    fail_per_mille: 20,
    hang_per_mille: 4,
    poison_every: 100,
    claude_every: 50,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillListener,
    KillWorker,
    KillCoordinator,
    KillAll,
    KillBroker,
    StopWorker,
    StopOnlyWorker,
    StopListener,
    StopCoordinator,
    HandlerFaults,
    Poison,
    StorageFull,
    TasksFull,
}

impl Fault {
    fn label(self) -> &'static str {
        match self {
            Fault::KillListener => "SIGKILL 1 of 2 listeners",
            Fault::KillWorker => "SIGKILL worker",
            Fault::KillCoordinator => "SIGKILL coordinator",
            Fault::KillAll => "SIGKILL everything but the broker",
            Fault::KillBroker => "SIGKILL+restart nats-server",
            Fault::StopWorker => "SIGSTOP worker > ack_wait",
            Fault::StopOnlyWorker => "SIGSTOP the only worker > ack_wait",
            Fault::StopListener => "SIGSTOP 1 of 2 listeners > lease",
            Fault::StopCoordinator => "SIGSTOP 1 of 2 coordinators > lease",
            Fault::HandlerFaults => "handlers fail 5%/hang 1%",
            Fault::Poison => "poison (bad JSON/oversized/doomed)",
            Fault::StorageFull => "EVENTS storage full",
            Fault::TasksFull => "TASKS storage full",
        }
    }

    fn mix(self) -> Mix {
        match self {
            Fault::HandlerFaults => Mix {
                fail_per_mille: 50,
                hang_per_mille: 10,
                ..BASELINE
            },
            Fault::Poison => Mix {
                poison_every: 25,
                ..BASELINE
            },
            _ => BASELINE,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Handlers

/// One persistent JSON-lines process, four roles:
/// - `ledger`: always succeeds; emits `ledger_noted` for every 4th `n`;
/// - `audit`: fails (`fail_first`) or hangs (`hang_first`) on an event's first attempt only —
///   decided by the event's data, remembered across processes with marker files;
/// - `doomed`: always fails;
/// - `step`: a workflow step; appends (instance, step, event id, its parent: the worker) to
///   `<marks>/steps.log` — its side effect — and fails when the step is the input's `fail_step`.
///
/// A hang waits on stdin, so the process exits as soon as the worker closes its pipe (timeout
/// or worker crash) instead of lingering.
const HANDLER_PY: &str = r#"
import json, os, select, sys
role, marks = sys.argv[1], sys.argv[2]

def first_time(event_id, kind):
    try:
        os.close(os.open(os.path.join(marks, event_id + "." + kind), os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False

def reply(obj):
    print(json.dumps(obj), flush=True)

def handle(event):
    data = event.get("data") or {}
    n = data.get("n")
    if role == "doomed":
        return reply({"done": True, "error": "doomed: this handler always fails"})
    if role == "step":
        step = (data.get("_step") or {}).get("step")
        with open(os.path.join(marks, "steps.log"), "a") as log:
            log.write(json.dumps({"instance": event["aggregateid"], "step": step,
                                  "event_id": event["id"], "worker": os.getppid()}) + "\n")
        if step == data.get("fail_step"):
            return reply({"done": True, "error": "injected step failure: " + step})
        return reply({"done": True, "output": {"n": n, "step": step}})
    if role == "audit":
        if data.get("hang_first") and first_time(event["id"], "hang"):
            select.select([sys.stdin], [], [], 300)
            sys.exit(0)
        if data.get("fail_first") and first_time(event["id"], "fail"):
            return reply({"done": True, "error": "injected failure for n=%s" % n})
    if role == "ledger" and isinstance(n, int) and n % 4 == 0:
        reply({"type": "ledger_noted", "data": {"n": n}})
    reply({"done": True, "output": {"n": n, "pid": os.getpid()}})

try:
    for line in sys.stdin:
        handle(json.loads(line))
except BrokenPipeError:
    sys.exit(0)  # the worker went away (a crash test)
"#;

fn write_handlers(env: &TestEnv, fake: &FakeApiHandle) -> anyhow::Result<()> {
    let script = env.write_script("handler.py", HANDLER_PY);
    let marks = env.path().join("marks");
    std::fs::create_dir_all(&marks)?;
    let process = |name: &str, on: &str, extra: &str| {
        let on = if on.is_empty() {
            String::new()
        } else {
            format!("on: [\"{on}\"]\n")
        };
        env.write_handler(
            name,
            &format!(
                "name: {name}\n{on}kind: process\ncommand: [\"python3\", \"{}\", \"{name}\", \"{}\"]\n{extra}\n",
                script.display(),
                marks.display()
            ),
        );
    };
    let retry = "retry: { max_attempts: 4, initial_backoff: 50ms, max_backoff: 500ms }";
    process(
        "ledger",
        "events.acct.*.op",
        &format!("concurrency: 4\n{retry}"),
    );
    process(
        "audit",
        "events.acct.*.op",
        &format!("concurrency: 4\ntimeout: 2s\n{retry}"),
    );
    process(
        "doomed",
        "events.acct.*.doom",
        "concurrency: 2\nretry: { max_attempts: 2, initial_backoff: 20ms, max_backoff: 50ms }\nbreaker: { failure_threshold: 1000000 }",
    );
    let mut agent = String::from(
        "name: agent\non: [\"events.agent.*.task_requested\"]\nkind: claude\ntemplate: \"{{ data.text }}\"\n\
         concurrency: 1\npool: { min: 1, max: 1 }\ntimeout: 60s\n\
         retry: { max_attempts: 5, initial_backoff: 200ms, max_backoff: 2s }\nenv:\n",
    );
    for (k, v) in fake.claude_env() {
        agent.push_str(&format!("  {k}: \"{v}\"\n"));
    }
    env.write_handler("agent", &agent);
    // Workflow steps: no `on` patterns, the coordinator writes their tasks.
    process(
        "step",
        "",
        &format!(
            "concurrency: 4\ntimeout: 10s\n{retry}\nbreaker: {{ failure_threshold: 1000000 }}"
        ),
    );
    std::fs::write(
        env.settings.workflows_dir.join("order.yaml"),
        ORDER_WORKFLOW,
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The stream

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Op {
        fail_first: bool,
        hang_first: bool,
    },
    Claude,
    /// Starts instance `wf<n>` of `order`; `fail`: its `ship` step fails (the saga undoes).
    Workflow {
        fail: bool,
    },
    Doomed,
    Malformed,
    Oversized,
}

impl Kind {
    fn is_poison(self) -> bool {
        matches!(self, Kind::Doomed | Kind::Malformed | Kind::Oversized)
    }
}

/// One event of the stream, decided by its index alone (reruns publish the same stream).
#[derive(Debug, Clone)]
struct Planned {
    n: usize,
    kind: Kind,
    subject: String,
    /// The envelope id, or the `Nats-Msg-Id` of a raw body.
    id: String,
    headers: HeaderMap,
    body: Bytes,
}

fn per_mille(n: usize, salt: &str) -> u64 {
    stable_hash(&format!("{salt}:{n}")) % 1000
}

fn plan(n: usize, mix: Mix) -> Planned {
    let agg = format!("a{}", n % AGGREGATES);
    // Poison at three spread positions within every `poison_every` events.
    let poison =
        |k: usize| mix.poison_every > 0 && n % mix.poison_every == mix.poison_every * k / 8 + 1;
    let kind = if n % mix.claude_every == 7 {
        Kind::Claude
    } else if n % WORKFLOW_EVERY == 12 {
        Kind::Workflow {
            fail: (n / WORKFLOW_EVERY) % FAIL_EVERY == 1,
        }
    } else if poison(1) {
        Kind::Malformed
    } else if poison(3) {
        Kind::Oversized
    } else if poison(5) {
        Kind::Doomed
    } else {
        let hang_first = per_mille(n, "hang") < mix.hang_per_mille;
        Kind::Op {
            fail_first: !hang_first && per_mille(n, "fail") < mix.fail_per_mille,
            hang_first,
        }
    };
    let envelope = |subject: EventSubject, data: Value| {
        let event = EventEnvelope::new(&subject, "faults", data);
        Planned {
            n,
            kind,
            subject: subject.to_string(),
            id: event.id.clone(),
            headers: event.headers(),
            body: event.to_json_bytes(),
        }
    };
    let raw = |body: Bytes| {
        let id = format!("raw-{n}");
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        Planned {
            n,
            kind,
            subject: format!("events.acct.{agg}.op"),
            id,
            headers,
            body,
        }
    };
    match kind {
        Kind::Op {
            fail_first,
            hang_first,
        } => envelope(
            EventSubject::new("acct", &agg, "op").expect("valid"),
            json!({"n": n, "fail_first": fail_first, "hang_first": hang_first}),
        ),
        Kind::Doomed => envelope(
            EventSubject::new("acct", &agg, "doom").expect("valid"),
            json!({"n": n}),
        ),
        Kind::Claude => envelope(
            EventSubject::new("agent", format!("c{}", n % 3), "task_requested").expect("valid"),
            json!({"n": n, "text": format!(
                "note {n} [[tool:emit_event {{\"type\":\"summary_ready\",\"data\":{{\"n\":{n}}}}}]]"
            )}),
        ),
        Kind::Workflow { fail } => envelope(
            EventSubject::new("workflow", format!("wf{n}"), "start_requested").expect("valid"),
            json!({"workflow": "order", "input": {"n": n, "fail_step": if fail { "ship" } else { "" }}}),
        ),
        Kind::Malformed => raw(Bytes::from(format!("{{\"n\": {n}, this is not json"))),
        Kind::Oversized => raw(Bytes::from(
            json!({"n": n, "pad": "x".repeat(MAX_EVENT_BYTES + 1024)}).to_string(),
        )),
    }
}

#[derive(Debug, Clone)]
struct Sent {
    planned: Planned,
    seq: u64,
}

#[derive(Debug, Default)]
struct Published {
    acked: Vec<Sent>,
    /// Publishes the broker refused with an error (a full log): (event, error). The publisher
    /// backs off and re-sends; the event counts as sent once a re-send is confirmed.
    refused: Vec<(usize, String)>,
}

/// Publishes the stream at a steady rate. A refused publish (full log) is recorded, and like a
/// transient failure (broker down) re-sent with the same `Nats-Msg-Id` until the broker confirms.
struct Publisher {
    handle: tokio::task::JoinHandle<anyhow::Result<Published>>,
    progress: watch::Receiver<usize>,
    refusals: watch::Receiver<usize>,
}

fn is_refusal(error: &str) -> bool {
    let e = error.to_ascii_lowercase();
    e.contains("maximum bytes") || e.contains("insufficient") || e.contains("resources")
}

impl Publisher {
    fn start(env: &TestEnv, profile: Profile, mix: Mix) -> Self {
        // Its own context with a short timeout, so a dead broker is noticed quickly.
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(2))
            .build(env.nats.client.clone());
        let (progress_tx, progress) = watch::channel(0usize);
        let (refusals_tx, refusals) = watch::channel(0usize);
        let handle = tokio::spawn(async move {
            let mut out = Published::default();
            let mut tick = tokio::time::interval(profile.tick);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let plans: Vec<Planned> = (0..profile.events).map(|n| plan(n, mix)).collect();
            for chunk in plans.chunks(profile.burst) {
                tick.tick().await;
                for p in chunk {
                    let give_up = Instant::now() + Duration::from_secs(90);
                    loop {
                        let attempt = async {
                            js.publish_with_headers(
                                p.subject.clone(),
                                p.headers.clone(),
                                p.body.clone(),
                            )
                            .await?
                            .await
                            .map_err(anyhow::Error::from)
                        };
                        match attempt.await {
                            Ok(ack) => {
                                out.acked.push(Sent {
                                    planned: p.clone(),
                                    seq: ack.sequence,
                                });
                                break;
                            }
                            Err(e) => {
                                if is_refusal(&format!("{e:#}")) {
                                    out.refused.push((p.n, format!("{e:#}")));
                                    refusals_tx.send_modify(|r| *r += 1);
                                }
                                ensure!(
                                    Instant::now() < give_up,
                                    "publishing event {} kept failing: {e:#}",
                                    p.n
                                );
                                // Back-off before re-sending (log full, broker down or restarting).
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                    progress_tx.send_modify(|n| *n += 1);
                }
            }
            Ok(out)
        });
        Self {
            handle,
            progress,
            refusals,
        }
    }

    async fn wait_progress(&mut self, at_least: usize, deadline: Duration) -> anyhow::Result<()> {
        tokio::time::timeout(deadline, self.progress.wait_for(|n| *n >= at_least))
            .await
            .context("the publisher stalled")??;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Components as real processes

struct Cluster {
    /// Two listener replicas sharing the log's partitions, as deployed.
    listeners: Vec<(String, ChildProcess)>,
    next_listener: usize,
    /// One coordinator; two for the scenario that stops one.
    coordinators: Vec<ChildProcess>,
    workers: Vec<(String, ChildProcess)>,
    /// Every worker process started, killed ones included.
    worker_pids: Vec<u32>,
    next_worker: usize,
}

fn component_env(worker_id: Option<&str>) -> Vec<(&'static str, String)> {
    let mut env = vec![
        (
            "GRIZZLY_LOG",
            std::env::var("GRIZZLY_LOG").unwrap_or_else(|_| "error".into()),
        ),
        ("GRIZZLY_MAX_EVENT_BYTES", MAX_EVENT_BYTES.to_string()),
    ];
    if let Some(id) = worker_id {
        env.push(("GRIZZLY_WORKER__ID", id.to_string()));
    }
    env
}

impl Cluster {
    /// Two listeners and the coordinator; workers are started one by one.
    fn start(env: &TestEnv) -> anyhow::Result<Self> {
        let mut c = Self {
            listeners: Vec::new(),
            next_listener: 1,
            coordinators: Vec::new(),
            workers: Vec::new(),
            worker_pids: Vec::new(),
            next_worker: 1,
        };
        c.start_listener(env)?;
        c.start_listener(env)?;
        c.start_coordinator(env)?;
        Ok(c)
    }

    fn start_coordinator(&mut self, env: &TestEnv) -> anyhow::Result<()> {
        self.coordinators.push(ChildProcess::start(
            "grizzly-coordinator",
            &env.settings,
            &component_env(None),
        )?);
        Ok(())
    }

    fn start_listener(&mut self, env: &TestEnv) -> anyhow::Result<String> {
        let id = format!("l{}", self.next_listener);
        self.next_listener += 1;
        let mut vars = component_env(None);
        vars.push(("GRIZZLY_LISTENER__ID", id.clone()));
        let child = ChildProcess::start("grizzly-listener", &env.settings, &vars)?;
        self.listeners.push((id.clone(), child));
        Ok(id)
    }

    /// Removes the first listener from the cluster: (its id, its process).
    fn take_listener(&mut self) -> (String, ChildProcess) {
        self.listeners.remove(0)
    }

    fn start_worker(&mut self, env: &TestEnv) -> anyhow::Result<String> {
        let id = format!("w{}", self.next_worker);
        self.next_worker += 1;
        let child =
            ChildProcess::start("grizzly-worker", &env.settings, &component_env(Some(&id)))?;
        self.worker_pids.push(child.pid());
        self.workers.push((id.clone(), child));
        Ok(id)
    }

    fn worker_pid(&self, id: &str) -> u32 {
        self.workers
            .iter()
            .find(|(w, _)| w == id)
            .map(|(_, c)| c.pid())
            .expect("known worker")
    }

    fn kill_worker(&mut self, id: &str) {
        if let Some(pos) = self.workers.iter().position(|(w, _)| w == id) {
            self.workers.remove(pos).1.kill();
        }
    }

    /// SIGTERM everything and wait for the processes to drain and exit (SIGKILL after 20 s).
    async fn stop(mut self) {
        let mut children: Vec<ChildProcess> = self.workers.drain(..).map(|(_, c)| c).collect();
        children.extend(self.listeners.drain(..).map(|(_, c)| c));
        children.append(&mut self.coordinators);
        for c in &children {
            signal(c.pid(), "TERM");
        }
        let until = Instant::now() + Duration::from_secs(20);
        for c in &mut children {
            while Instant::now() < until && matches!(c.child.try_wait(), Ok(None)) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // Dropping SIGKILLs whatever is left.
    }
}

/// Until every coordinator of the cluster holds workflow partitions.
async fn wait_coordinators_spread(
    env: &TestEnv,
    cluster: &Cluster,
    deadline: Duration,
) -> anyhow::Result<()> {
    let until = Instant::now() + deadline;
    loop {
        let owners = env.leases("wf.partition.").await?;
        let spread = cluster.coordinators.iter().all(|c| {
            let is = coordinator_id_of(c.pid());
            owners.values().any(|o| is(o))
        });
        if spread {
            return Ok(());
        }
        ensure!(
            Instant::now() < until,
            "the coordinators did not share the workflow partitions: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
}

/// The workflow-partition lease (`wf.partition.<p>`) of an instance.
fn workflow_lease_of(instance: &str, partitions: u16) -> String {
    grizzly_coordinator::partition_lease(grizzly_shared::task::partition_for(instance, partitions))
}

/// Whether a lease owner is the coordinator with this pid (ids are `<host>-<pid>-<uuid>`).
fn coordinator_id_of(pid: u32) -> impl Fn(&str) -> bool {
    let infix = format!("-{pid}-");
    move |owner: &str| owner.contains(&infix)
}

/// Partition owners from the lease bucket: `task.<handler>.<partition>` → worker id.
async fn leases(env: &TestEnv) -> anyhow::Result<HashMap<String, String>> {
    env.leases("task.").await
}

/// The listener partitions `id` routes now (`route.<p>` leases).
async fn routed_by(env: &TestEnv, id: &str) -> anyhow::Result<HashSet<String>> {
    let out: HashSet<String> = env
        .leases("route.")
        .await?
        .into_iter()
        .filter_map(|(key, owner)| (owner == id).then_some(key))
        .collect();
    ensure!(!out.is_empty(), "listener {id} routes no partition");
    Ok(out)
}

/// Waits until every worker in `ids` owns at least one partition of `ledger`.
async fn wait_balanced(env: &TestEnv, ids: &[&str], deadline: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + deadline;
    loop {
        let owners = leases(env).await.unwrap_or_default();
        let balanced = ids.iter().all(|id| {
            owners
                .iter()
                .any(|(k, v)| k.starts_with("task.ledger.") && v == id)
        });
        if balanced {
            return Ok(());
        }
        ensure!(
            Instant::now() < until,
            "workers {ids:?} never shared the partitions: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The partition an event's aggregate belongs to (tasks and listener routing alike).
fn partition_of(subject: &str, partitions: u16) -> u16 {
    let mut tokens = subject.split('.').skip(1);
    let (t, i) = (tokens.next().unwrap_or(""), tokens.next().unwrap_or(""));
    partition_for(&format!("{t}/{i}"), partitions)
}

/// The listener lease of the partition an event belongs to.
fn route_lease_of(subject: &str, partitions: u16) -> String {
    format!("route.{}", partition_of(subject, partitions))
}

/// The lease key of the partition an outcome belongs to.
fn lease_of(handler: &str, subject: &str, partitions: u16) -> String {
    format!("task.{handler}.{}", partition_of(subject, partitions))
}

fn event_time(e: &LoggedEvent) -> Option<SystemTime> {
    humantime::parse_rfc3339(&e.event.as_ref()?.time).ok()
}

// ---------------------------------------------------------------------------------------------
// Reading the logs back

#[derive(Debug, Clone)]
struct Rec {
    seq: u64,
    subject: String,
    payload: Bytes,
    /// When the broker stored it.
    stored_at: SystemTime,
    event: Option<EventEnvelope>,
}

impl Rec {
    fn event_type(&self) -> &str {
        self.subject.rsplit('.').next().unwrap_or("")
    }
    fn data(&self) -> Value {
        self.event
            .as_ref()
            .map(|e| e.data.clone())
            .unwrap_or_default()
    }
    fn str_field(&self, key: &str) -> String {
        self.data()[key].as_str().unwrap_or_default().to_string()
    }
}

/// Every message of `stream` up to its last sequence right now.
async fn read_all(js: &jetstream::Context, name: &str) -> anyhow::Result<Vec<Rec>> {
    let mut s = js.get_stream(name).await?;
    let last = s.info().await?.state.last_sequence;
    let mut out: Vec<Rec> = Vec::new();
    if last == 0 {
        return Ok(out);
    }
    let consumer = s
        .create_consumer(pull::OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    while out.last().is_none_or(|r| r.seq < last) {
        let msg = tokio::time::timeout_at(until, messages.next())
            .await
            .with_context(|| format!("reading {name} back: {} of {last}", out.len()))?
            .context("stream ended")?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let stored = StoredMessage::from_jetstream(&msg).map_err(anyhow::Error::msg)?;
        out.push(Rec {
            seq: stored.stream_sequence,
            subject: msg.subject.to_string(),
            event: EventEnvelope::from_stored(&stored, usize::MAX).ok(),
            stored_at: SystemTime::from(stored.published),
            payload: msg.payload.clone(),
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Verdict

#[derive(Debug, Default)]
struct Row {
    fault: &'static str,
    sent: usize,
    handled: usize,
    /// Workflow instances that ended as designed / started.
    workflows: String,
    in_dlq: usize,
    lost: usize,
    duplicated: usize,
    recovery: Option<Duration>,
    note: String,
    problems: Vec<String>,
}

struct Logs {
    events: Vec<Rec>,
    dlq: Vec<(Rec, DeadLetter)>,
    /// The workflow step handler's own log of its runs.
    step_runs: Vec<StepRun>,
}

/// Counts and checks everything the promises say about one run. `rerun_excused(pid)`: whether
/// a workflow step first run under worker `pid` may run again (that worker was killed or
/// stopped mid-step, or the broker died).
fn analyse(row: &mut Row, published: &Published, logs: &Logs, rerun_excused: &dyn Fn(u32) -> bool) {
    let sent = &published.acked;
    row.sent = sent.len();
    let by_seq: HashMap<u64, &Rec> = logs.events.iter().map(|r| (r.seq, r)).collect();
    let cause_seq: HashMap<&str, u64> = sent
        .iter()
        .map(|s| (s.planned.id.as_str(), s.seq))
        .collect();

    // Copies of each published event in the log (a re-send must have been de-duplicated).
    let mut copies: HashMap<&str, usize> = HashMap::new();
    let raw_bodies: HashMap<&[u8], &str> = sent
        .iter()
        .filter(|s| matches!(s.planned.kind, Kind::Malformed | Kind::Oversized))
        .map(|s| (s.planned.body.as_ref(), s.planned.id.as_str()))
        .collect();
    let mut successes: HashMap<(String, String), usize> = HashMap::new();
    let mut emitted: HashMap<(String, u64), usize> = HashMap::new();
    let mut order_last: HashMap<(String, String), u64> = HashMap::new();
    let mut order_violations = Vec::new();
    // Where each event id is first stored: an outcome must come after the events it reports.
    let mut first_seq: HashMap<&str, u64> = HashMap::new();
    for r in &logs.events {
        if let Some(e) = &r.event {
            first_seq.entry(e.id.as_str()).or_insert(r.seq);
        }
    }
    for r in &logs.events {
        if let Some(id) = raw_bodies.get(r.payload.as_ref()) {
            *copies.entry(id).or_default() += 1;
            continue;
        }
        let Some(event) = &r.event else { continue };
        if event.source == "faults" {
            *copies.entry(event.id.as_str()).or_default() += 1;
            continue;
        }
        match r.event_type() {
            "handler_succeeded" => {
                let (cause, handler) = (r.str_field("event_id"), r.str_field("handler"));
                let count = successes
                    .entry((cause.clone(), handler.clone()))
                    .or_default();
                *count += 1;
                if *count > 1 {
                    continue;
                }
                for id in r.data()["emitted"].as_array().into_iter().flatten() {
                    let id = id.as_str().unwrap_or_default();
                    if first_seq.get(id).is_none_or(|s| *s > r.seq) {
                        order_violations.push(format!(
                            "{handler}'s outcome for {cause} (seq {}) is stored before its emitted event {id} ({:?})",
                            r.seq,
                            first_seq.get(id)
                        ));
                    }
                }
                let Some(seq) = cause_seq.get(cause.as_str()) else {
                    continue;
                };
                let aggregate = r.subject.split('.').take(3).collect::<Vec<_>>().join(".");
                let last = order_last
                    .entry((handler.clone(), aggregate.clone()))
                    .or_default();
                if *seq < *last {
                    let waited = by_seq
                        .get(seq)
                        .and_then(|c| r.stored_at.duration_since(c.stored_at).ok())
                        .unwrap_or_default();
                    order_violations.push(format!(
                        "{handler} on {aggregate}: cause seq {seq} handled (by {}, {:.1}s after its append) after cause seq {last}",
                        r.str_field("worker"),
                        waited.as_secs_f64()
                    ));
                }
                *last = (*last).max(*seq);
            }
            "ledger_noted" | "summary_ready" => {
                let n = r.data()["n"].as_u64().unwrap_or(u64::MAX);
                *emitted.entry((r.event_type().to_string(), n)).or_default() += 1;
            }
            _ => {}
        }
    }
    let mut dead: HashMap<String, usize> = HashMap::new();
    let mut dead_kind: HashMap<String, String> = HashMap::new();
    for (_, d) in &logs.dlq {
        let key = match (&d.handler, &d.event) {
            (Some(h), Some(e)) => format!("{}/{h}", e.id),
            _ => format!("seq/{}", d.event_seq.unwrap_or(0)),
        };
        *dead.entry(key.clone()).or_default() += 1;
        dead_kind.insert(key, d.kind.clone());
    }

    let succeeded = |id: &str, h: &str| {
        successes
            .get(&(id.to_string(), h.to_string()))
            .copied()
            .unwrap_or(0)
    };
    let (mut good, mut good_handled) = (0usize, 0usize);
    for s in sent {
        let p = &s.planned;
        let present = by_seq.get(&s.seq).is_some_and(|r| r.payload == p.body);
        if !present {
            row.problems.push(format!(
                "acknowledged event n={} (seq {}) is not in the log as published",
                p.n, s.seq
            ));
        }
        let copies = copies.get(p.id.as_str()).copied().unwrap_or(0);
        row.duplicated += copies.saturating_sub(1);
        if matches!(p.kind, Kind::Workflow { .. }) {
            continue; // checked by `analyse_workflows` below
        }
        let (handlers, dlq_keys): (Vec<&str>, Vec<String>) = match p.kind {
            Kind::Op { .. } => (
                vec!["ledger", "audit"],
                vec![format!("{}/ledger", p.id), format!("{}/audit", p.id)],
            ),
            Kind::Claude => (vec!["agent"], vec![format!("{}/agent", p.id)]),
            Kind::Doomed => (vec![], vec![format!("{}/doomed", p.id)]),
            Kind::Malformed | Kind::Oversized => (vec![], vec![format!("seq/{}", s.seq)]),
            Kind::Workflow { .. } => unreachable!("skipped above"),
        };
        let counts: Vec<usize> = handlers.iter().map(|h| succeeded(&p.id, h)).collect();
        row.duplicated += counts.iter().map(|c| c.saturating_sub(1)).sum::<usize>();
        let dead_counts: Vec<usize> = dlq_keys
            .iter()
            .map(|k| dead.get(k).copied().unwrap_or(0))
            .collect();
        row.duplicated += dead_counts
            .iter()
            .map(|c| c.saturating_sub(1))
            .sum::<usize>();
        let handled = !handlers.is_empty() && counts.iter().all(|c| *c >= 1);
        let in_dlq = dead_counts.iter().any(|c| *c >= 1);
        if !p.kind.is_poison() {
            good += 1;
            good_handled += usize::from(handled);
        }
        if handled {
            row.handled += 1;
        }
        if in_dlq {
            row.in_dlq += 1;
            let expected_kind = match p.kind {
                Kind::Malformed => "not_json",
                Kind::Oversized => "oversized",
                Kind::Doomed => "failed",
                _ => "",
            };
            let kinds: Vec<&String> = dlq_keys.iter().filter_map(|k| dead_kind.get(k)).collect();
            if !kinds.iter().any(|k| k.as_str() == expected_kind) {
                row.problems.push(format!(
                    "event n={} ({:?}) dead-lettered as {kinds:?}",
                    p.n, p.kind
                ));
            }
        }
        if !handled && !in_dlq {
            row.lost += 1;
            if row.lost <= 5 {
                row.problems.push(format!(
                    "event n={} ({:?}, seq {}) has neither its outcomes ({handlers:?} → {counts:?}) nor a dead letter",
                    p.n, p.kind, s.seq
                ));
            }
        }
        // Emitted events: exactly one per handled cause that emits.
        let emits = match p.kind {
            Kind::Op { .. } if p.n % 4 == 0 && succeeded(&p.id, "ledger") > 0 => {
                Some("ledger_noted")
            }
            Kind::Claude if succeeded(&p.id, "agent") > 0 => Some("summary_ready"),
            _ => None,
        };
        if let Some(t) = emits {
            let c = emitted
                .get(&(t.to_string(), p.n as u64))
                .copied()
                .unwrap_or(0);
            row.duplicated += c.saturating_sub(1);
            if c == 0 {
                row.problems
                    .push(format!("event n={}: its {t} event is missing", p.n));
            }
        }
    }
    let wf = analyse_workflows(published, logs, rerun_excused);
    good += wf.started;
    good_handled += wf.as_designed;
    row.handled += wf.as_designed;
    row.lost += wf.lost;
    row.duplicated += wf.duplicated;
    row.problems.extend(wf.problems);
    row.workflows = format!("{}/{}", wf.as_designed, wf.started);
    if wf.reruns > 0 {
        row.note.push_str(&format!(
            "{} step re-runs after their worker died or stopped mid-step",
            wf.reruns
        ));
    }
    if good > 0 && (good_handled as f64) < 0.999 * good as f64 {
        row.problems
            .push(format!("success rate {good_handled}/{good} is below 99.9%"));
    }
    if row.duplicated > 0 {
        row.problems
            .push(format!("{} duplicate effects in the log", row.duplicated));
    }
    if row.lost > 5 {
        row.problems
            .push(format!("{} events lost in all", row.lost));
    }
    if !order_violations.is_empty() {
        row.problems.push(format!(
            "{} per-aggregate order violations, e.g. {:?}",
            order_violations.len(),
            &order_violations[..order_violations.len().min(3)]
        ));
    }
}

/// One invocation of the workflow step handler, from its own log.
#[derive(Debug)]
struct StepRun {
    instance: String,
    step: String,
    /// The parent process when it ran: the worker, or a reaper once the worker was killed.
    worker: u32,
}

fn read_step_runs(path: &std::path::Path) -> anyhow::Result<Vec<StepRun>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e.into()),
    };
    text.lines()
        .map(|line| {
            let v: Value =
                serde_json::from_str(line).with_context(|| format!("step log line {line:?}"))?;
            Ok(StepRun {
                instance: v["instance"].as_str().unwrap_or_default().to_string(),
                step: v["step"].as_str().unwrap_or_default().to_string(),
                worker: v["worker"].as_u64().unwrap_or_default() as u32,
            })
        })
        .collect()
}

#[derive(Debug, Default)]
struct WorkflowVerdict {
    started: usize,
    /// Ended exactly as the definition says.
    as_designed: usize,
    lost: usize,
    duplicated: usize,
    /// Second runs of a step whose first run's worker died or stopped (excused).
    reruns: usize,
    problems: Vec<String>,
}

/// Every started `order` instance ended once, as designed; each step started, succeeded and
/// ran (by the handler's own log) once.
fn analyse_workflows(
    published: &Published,
    logs: &Logs,
    rerun_excused: &dyn Fn(u32) -> bool,
) -> WorkflowVerdict {
    let mut v = WorkflowVerdict::default();
    let instance_of = |r: &Rec| r.subject.split('.').nth(2).unwrap_or_default().to_string();
    let mut ends: HashMap<String, Vec<&Rec>> = HashMap::new();
    let mut started: HashMap<(String, String), usize> = HashMap::new();
    let mut step_of: HashMap<String, (String, String)> = HashMap::new();
    for r in logs
        .events
        .iter()
        .filter(|r| r.subject.starts_with("events.workflow."))
    {
        let Some(event) = &r.event else { continue };
        match r.event_type() {
            "completed" | "failed" | "cancelled" if event.source == COORDINATOR => {
                ends.entry(instance_of(r)).or_default().push(r);
            }
            "step_started" => {
                let key = (
                    instance_of(r),
                    r.data()["_step"]["step"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                );
                *started.entry(key.clone()).or_default() += 1;
                step_of.insert(event.id.clone(), key);
            }
            _ => {}
        }
    }
    let mut succeeded: HashMap<&(String, String), usize> = HashMap::new();
    for r in logs.events.iter().filter(|r| {
        r.subject.starts_with("events.workflow.") && r.event_type() == "handler_succeeded"
    }) {
        if let Some(key) = step_of.get(&r.str_field("event_id")) {
            *succeeded.entry(key).or_default() += 1;
        }
    }
    let mut runs: HashMap<(&str, &str), Vec<u32>> = HashMap::new();
    for run in &logs.step_runs {
        runs.entry((&run.instance, &run.step))
            .or_default()
            .push(run.worker);
    }
    let problem = |v: &mut WorkflowVerdict, p: String| {
        if v.problems.len() < 8 {
            v.problems.push(p);
        }
    };
    for s in &published.acked {
        let Kind::Workflow { fail } = s.planned.kind else {
            continue;
        };
        v.started += 1;
        let n = s.planned.n;
        let instance = format!("wf{n}");
        let mut expected: Vec<&str> = ORDER_STEPS.to_vec();
        if fail {
            expected.extend(ORDER_COMPENSATED);
        }
        let end = ends.get(&instance).map(Vec::as_slice).unwrap_or_default();
        v.duplicated += end.len().saturating_sub(1);
        let Some(end) = end.first() else {
            v.lost += 1;
            problem(&mut v, format!("workflow {instance} never ended"));
            continue;
        };
        let data = end.data();
        let as_designed = if fail {
            end.event_type() == "failed" && data["compensated"] == json!(ORDER_COMPENSATED)
        } else {
            end.event_type() == "completed"
                && (data["output"]["n"] == json!(n) || data["output"]["n"] == json!(n.to_string()))
        };
        if as_designed {
            v.as_designed += 1;
        } else {
            problem(
                &mut v,
                format!(
                    "workflow {instance} (fail: {fail}) ended {}: {data}",
                    end.event_type()
                ),
            );
        }
        for (key, count) in started.iter().filter(|((i, _), _)| *i == instance) {
            if !expected.contains(&key.1.as_str()) {
                problem(
                    &mut v,
                    format!(
                        "workflow {instance} started an unexpected step {} ({count}×)",
                        key.1
                    ),
                );
            }
        }
        for step in &expected {
            let key = (instance.clone(), step.to_string());
            let starts = started.get(&key).copied().unwrap_or(0);
            let successes = succeeded.get(&key).copied().unwrap_or(0);
            let should_succeed = !(fail && *step == "ship");
            v.duplicated += starts.saturating_sub(1) + successes.saturating_sub(1);
            if starts == 0
                || (should_succeed && successes == 0)
                || (!should_succeed && successes > 0)
            {
                problem(
                    &mut v,
                    format!(
                        "workflow {instance} step {step}: started {starts}×, succeeded {successes}×"
                    ),
                );
            }
            let ran = runs
                .get(&(instance.as_str(), *step))
                .map(Vec::as_slice)
                .unwrap_or_default();
            if ran.is_empty() {
                problem(
                    &mut v,
                    format!("workflow {instance} step {step}: the handler never ran it"),
                );
            }
            // A later run is excused only when the worker of the run before it went away.
            for pair in ran.windows(2) {
                if rerun_excused(pair[0]) {
                    v.reruns += 1;
                } else {
                    v.duplicated += 1;
                    problem(
                        &mut v,
                        format!("workflow {instance} step {step} ran again (workers {ran:?})"),
                    );
                }
            }
        }
    }
    if v.duplicated > 0 {
        let duplicated = v.duplicated;
        problem(&mut v, format!("{duplicated} duplicate workflow effects"));
    }
    v
}

/// Time from `from` to the first outcome stored after it that `pick` accepts.
fn first_outcome_after(
    logs: &Logs,
    from: SystemTime,
    mut pick: impl FnMut(&Rec) -> bool,
) -> Option<Duration> {
    logs.events
        .iter()
        .filter(|r| r.event_type() == "handler_succeeded" && r.stored_at > from && pick(r))
        .map(|r| r.stored_at.duration_since(from).unwrap_or_default())
        .min()
}

/// The longest time from an event to a coordinator's answer to it.
fn slowest_transition(logs: &Logs) -> Option<Duration> {
    let stored: HashMap<&str, SystemTime> = logs
        .events
        .iter()
        .filter_map(|r| Some((r.event.as_ref()?.id.as_str(), r.stored_at)))
        .collect();
    logs.events
        .iter()
        .filter_map(|r| {
            let e = r.event.as_ref()?;
            let cause = stored.get(e.causationid.as_deref()?)?;
            (e.source == COORDINATOR).then(|| r.stored_at.duration_since(*cause).ok())?
        })
        .max()
}

/// Time from `at` to the first event a coordinator wrote, about an instance `pick` accepts, in
/// answer to an event stored after `at` (a dead or stopped coordinator cannot have written it).
fn first_transition_after(
    logs: &Logs,
    at: SystemTime,
    stored: &HashMap<&str, SystemTime>,
    pick: impl Fn(&str) -> bool,
) -> Option<Duration> {
    logs.events
        .iter()
        .filter(|r| r.stored_at > at)
        .filter(|r| {
            r.event.as_ref().is_some_and(|e| {
                e.source == COORDINATOR
                    && pick(&e.aggregateid)
                    && e.causationid
                        .as_deref()
                        .and_then(|c| stored.get(c))
                        .is_some_and(|t| *t > at)
            })
        })
        .map(|r| r.stored_at.duration_since(at).unwrap_or_default())
        .min()
}

// ---------------------------------------------------------------------------------------------
// One scenario

/// What the fault left for the recovery measurement.
#[derive(Default)]
struct Injected {
    at: Option<SystemTime>,
    /// Lease keys of the partitions the victim worker owned.
    victim_partitions: HashSet<String>,
    /// Workers killed or stopped: outcomes they wrote are not recovery.
    victims: HashSet<String>,
    /// Their pids: a step they were running may run again elsewhere (at-least-once).
    victim_pids: HashSet<u32>,
    /// When a stopped worker was resumed.
    resumed: Option<SystemTime>,
    note: String,
}

async fn run(fault: Fault, profile: Profile) -> Row {
    let mut row = Row {
        fault: fault.label(),
        ..Row::default()
    };
    let started = Instant::now();
    if let Err(e) = scenario(fault, profile, &mut row).await {
        row.problems.push(format!("{e:#}"));
    }
    eprintln!(
        "[faults] {:<34} {:>6.1}s  problems: {}",
        row.fault,
        started.elapsed().as_secs_f64(),
        row.problems.len()
    );
    row
}

async fn scenario(fault: Fault, profile: Profile, row: &mut Row) -> anyhow::Result<()> {
    let mut env = TestEnv::start().await?;
    env.settings.max_event_bytes = MAX_EVENT_BYTES;
    let fake = FakeMessagesApi::start(FakeApiConfig::default()).await?;
    write_handlers(&env, &fake)?;
    let mut cluster = Cluster::start(&env)?;
    env.listeners_spread(2, Duration::from_secs(30)).await?;
    if fault == Fault::StopCoordinator {
        cluster.start_coordinator(&env)?;
        wait_coordinators_spread(&env, &cluster, Duration::from_secs(30)).await?;
    }
    let first = cluster.start_worker(&env)?;
    wait_balanced(&env, &[&first], Duration::from_secs(30)).await?;
    if fault != Fault::StopOnlyWorker {
        let second = cluster.start_worker(&env)?;
        wait_balanced(&env, &[&first, &second], Duration::from_secs(30)).await?;
    }

    let mix = fault.mix();
    let mut publisher = Publisher::start(&env, profile, mix);
    // The fault hits a running system: a third of the stream is in and outcomes are flowing.
    publisher
        .wait_progress(profile.events / 3, Duration::from_secs(60))
        .await?;
    {
        let mut watch = env.watch().await?;
        watch
            .wait_for_type("handler_succeeded", 20, Duration::from_secs(60))
            .await
            .context("no outcomes before the fault")?;
    }
    let injected = inject(fault, &mut env, &mut cluster, &mut publisher, &first).await?;
    let published = publisher
        .handle
        .await
        .context("publisher panicked")?
        .context("publisher")?;

    // Wait (with a deadline) until every acknowledged event reached its end.
    let settled = settle(&env, &published, profile.settle).await;
    if let Err(e) = &settled {
        row.problems.push(format!("did not settle: {e:#}"));
    }
    // The read model catches up by itself too (checked against the log below).
    if let Err(e) = env.workflow_view_caught_up(Duration::from_secs(30)).await {
        row.problems.push(format!("{e:#}"));
    }
    let healthy: HashSet<u32> = cluster
        .worker_pids
        .iter()
        .filter(|pid| !injected.victim_pids.contains(pid))
        .copied()
        .collect();
    cluster.stop().await;
    let events = read_all(&env.nats.js, EVENTS_STREAM).await?;
    let dlq = read_all(&env.nats.js, DLQ_STREAM)
        .await?
        .into_iter()
        .map(|r| {
            let d: DeadLetter = serde_json::from_slice(&r.payload)?;
            Ok((r, d))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let logs = Logs {
        events,
        dlq,
        step_runs: read_step_runs(&env.path().join("marks").join("steps.log"))?,
    };
    // A step whose outcome was never written may run again (at-least-once delivery): when its
    // worker died or stopped mid-step, or the broker died before the outcome was stored. A run
    // under a healthy worker (never killed or stopped) must be the only one. (A step process
    // orphaned by a killed worker reports its new parent, never a worker's pid.)
    let rerun_excused = |worker: u32| fault == Fault::KillBroker || !healthy.contains(&worker);
    analyse(row, &published, &logs, &rerun_excused);
    check_view(row, &env, &logs).await?;
    if settled.is_ok() {
        check_restore(row, &env).await?;
    }
    row.recovery = recovery(fault, &injected, &published, &logs, env.settings.partitions);
    if row.recovery.is_none() {
        row.problems
            .push("no recovery observed after the fault".into());
    }
    if !row.note.is_empty() && !injected.note.is_empty() {
        row.note.push_str("; ");
    }
    row.note.push_str(&injected.note);
    if fault == Fault::StopCoordinator
        && let Some(late) = slowest_transition(&logs)
    {
        // A resumed coordinator that still applied events of partitions its successor held
        // would show as a transition at least this late (with per-partition consumers, a pull
        // left open took the successor's events, which came back after the 30 s ack wait).
        row.note
            .push_str(&format!("; slowest transition {:.1}s", late.as_secs_f64()));
        if late >= Duration::from_secs(30) {
            row.problems.push(format!(
                "a workflow transition came {:.1}s after its cause: a stale coordinator took the event",
                late.as_secs_f64()
            ));
        }
    }
    if let Some((_, error)) = published.refused.first() {
        // e.g. "publish failed: maximum bytes exceeded (code 503, error code 10077): ..."
        let reason = error.split(" (code").next().unwrap_or(error);
        let events: HashSet<usize> = published.refused.iter().map(|(n, _)| *n).collect();
        row.note.push_str(&format!(
            "; {} publishes of {} events refused ({reason:?}), re-sent later",
            published.refused.len(),
            events.len()
        ));
    }
    if fault != Fault::StorageFull && !published.refused.is_empty() {
        row.problems.push(format!(
            "{} publishes refused without a full log",
            published.refused.len()
        ));
    }
    drop(fake);
    Ok(())
}

/// The log the fault left replays to what the coordinators wrote (`grizzly workflow restore`
/// from it, their KV state deleted): every effect found in the log, no task to write again, no
/// instance left running. A coordinator that acted on anything but its inputs in log order
/// (a stale owner's late write, a timer fired twice differently) would show here.
async fn check_restore(row: &mut Row, env: &TestEnv) -> anyhow::Result<()> {
    // A coordinator killed by the fault (or after the stop's deadline) leaves its leases
    // until they expire; the restore refuses while any is held.
    let until = Instant::now() + env.settings.worker.lease_ttl * 5;
    while !env.leases("wf.").await?.is_empty() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, said) = env.restore_workflows().await?;
    if !ok
        || !said.contains(" checkpoints written (0 unfinished)")
        || !said.contains("published 0 workflow event(s) the log lacked; wrote 0 task(s)")
    {
        row.problems.push(format!(
            "the log does not replay to what the coordinators wrote: {}",
            said.lines().take(4).collect::<Vec<_>>().join(" / ")
        ));
    }
    Ok(())
}

/// Every instance's entry in the read model equals the log's workflow events applied in order:
/// an entry that skipped or reordered an event differs.
async fn check_view(row: &mut Row, env: &TestEnv, logs: &Logs) -> anyhow::Result<()> {
    use grizzly_coordinator::projection::{self, InstanceView, VIEW_AGGREGATE_ID};
    let mut expected: HashMap<&str, InstanceView> = HashMap::new();
    for r in &logs.events {
        if let Some(e) = &r.event
            && e.aggregatetype == grizzly_coordinator::instance::AGGREGATE
            && e.aggregateid != VIEW_AGGREGATE_ID
        {
            expected
                .entry(e.aggregateid.as_str())
                .or_default()
                .apply(e, r.seq);
        }
    }
    let view = projection::ensure_bucket(&env.nats.js, 1).await?;
    let mut wrong = Vec::new();
    for (id, want) in &expected {
        let got = projection::get(&view, id).await?;
        if got.as_ref() != Some(want) {
            wrong.push(format!(
                "{id}: view has {} events up to seq {}, status {:?}; the log {} up to {}, {:?}",
                got.as_ref().map_or(0, |g| g.events),
                got.as_ref().map_or(0, |g| g.last_seq),
                got.as_ref().map(|g| g.status.as_str()),
                want.events,
                want.last_seq,
                want.status
            ));
        }
    }
    if !wrong.is_empty() {
        wrong.sort();
        row.problems.push(format!(
            "{} of {} instances differ in the read model from the log, e.g. {}",
            wrong.len(),
            expected.len(),
            wrong[..wrong.len().min(3)].join("; ")
        ));
    }
    Ok(())
}

/// Waits until every acknowledged event has its outcomes (or dead letter).
async fn settle(env: &TestEnv, published: &Published, deadline: Duration) -> anyhow::Result<()> {
    let mut remaining: HashSet<(String, &'static str)> = HashSet::new();
    let mut ingest: HashSet<u64> = HashSet::new();
    for s in &published.acked {
        let id = s.planned.id.clone();
        match s.planned.kind {
            Kind::Op { .. } => {
                remaining.insert((id.clone(), "ledger"));
                remaining.insert((id, "audit"));
            }
            Kind::Claude => {
                remaining.insert((id, "agent"));
            }
            Kind::Doomed => {
                remaining.insert((id, "doomed"));
            }
            Kind::Malformed | Kind::Oversized => {
                ingest.insert(s.seq);
            }
            // The instance's end (`events.workflow.wf<n>.completed|failed`).
            Kind::Workflow { .. } => {
                remaining.insert((format!("wf{}", s.planned.n), "workflow"));
            }
        }
    }
    let until = Instant::now() + deadline;
    let mut watch = env.watch().await?;
    let mut read = 0;
    let left = |r: &HashSet<(String, &'static str)>| r.iter().take(5).cloned().collect::<Vec<_>>();
    let waited = watch
        .wait_until(deadline, |seen| {
            for e in &seen[read..] {
                if e.subject.starts_with("events.workflow.")
                    && matches!(e.event_type(), "completed" | "failed" | "cancelled")
                {
                    let instance = e.subject.split('.').nth(2).unwrap_or_default();
                    remaining.retain(|(id, h)| !(id == instance && *h == "workflow"));
                    continue;
                }
                let terminal = match e.event_type() {
                    "handler_succeeded" => true,
                    "handler_failed" => e.data()["dead_lettered"] == true,
                    _ => false,
                };
                if terminal {
                    let d = e.data();
                    let key = (
                        d["event_id"].as_str().unwrap_or_default().to_string(),
                        d["handler"].as_str().unwrap_or_default(),
                    );
                    remaining.retain(|(id, h)| !(id == &key.0 && *h == key.1));
                }
            }
            read = seen.len();
            remaining.is_empty()
        })
        .await;
    if waited.is_err() {
        bail!(
            "{} outcomes missing after {deadline:?}, e.g. {:?}",
            remaining.len(),
            left(&remaining)
        );
    }
    let mut dlq = env.watch_dlq().await?;
    let mut read = 0;
    dlq.wait_until(until.saturating_duration_since(Instant::now()), |seen| {
        for d in &seen[read..] {
            if let Ok(record) = serde_json::from_slice::<DeadLetter>(&d.payload)
                && record.handler.is_none()
                && let Some(seq) = record.event_seq
            {
                ingest.remove(&seq);
            }
        }
        read = seen.len();
        ingest.is_empty()
    })
    .await
    .context("dead letters of poison events missing")?;
    Ok(())
}

async fn inject(
    fault: Fault,
    env: &mut TestEnv,
    cluster: &mut Cluster,
    publisher: &mut Publisher,
    victim: &str,
) -> anyhow::Result<Injected> {
    let mut injected = Injected::default();
    let victim_partitions = |owners: HashMap<String, String>| -> HashSet<String> {
        owners
            .into_iter()
            .filter(|(_, v)| v == victim)
            .map(|(k, _)| k)
            .collect()
    };
    match fault {
        Fault::KillListener => {
            let (id, mut victim) = cluster.take_listener();
            injected.victim_partitions = routed_by(env, &id).await?;
            victim.kill();
            // After the kill: an event stored just before it may have been routed by the victim.
            injected.at = Some(SystemTime::now());
            // A supervisor restarts it at once; the dead one's partitions move when its leases
            // lapse, to the other replica or to the new one.
            cluster.start_listener(env)?;
        }
        Fault::KillWorker => {
            injected.victim_partitions = victim_partitions(leases(env).await?);
            injected.victims.insert(victim.to_string());
            injected.victim_pids.insert(cluster.worker_pid(victim));
            injected.at = Some(SystemTime::now());
            cluster.kill_worker(victim);
            cluster.start_worker(env)?;
        }
        Fault::KillCoordinator => {
            injected.at = Some(SystemTime::now());
            for mut c in cluster.coordinators.drain(..) {
                c.kill();
            }
            // Restarted at once; it takes the partitions over when the dead one's leases lapse.
            cluster.start_coordinator(env)?;
        }
        Fault::KillAll => {
            injected.at = Some(SystemTime::now());
            for (_, mut l) in cluster.listeners.drain(..) {
                l.kill();
            }
            for mut c in cluster.coordinators.drain(..) {
                c.kill();
            }
            let ids: Vec<String> = cluster.workers.iter().map(|(w, _)| w.clone()).collect();
            for id in &ids {
                injected.victim_pids.insert(cluster.worker_pid(id));
                cluster.kill_worker(id);
            }
            injected.victims.extend(ids);
            cluster.start_listener(env)?;
            cluster.start_listener(env)?;
            cluster.start_coordinator(env)?;
            cluster.start_worker(env)?;
            cluster.start_worker(env)?;
        }
        Fault::KillBroker => {
            injected.at = Some(SystemTime::now());
            env.server.kill();
            // The outage itself: components notice a dead broker, then it comes back.
            tokio::time::sleep(Duration::from_secs(1)).await;
            env.server.restart().await?;
            injected.resumed = Some(SystemTime::now());
            injected.note = "store kept, same port".into();
        }
        Fault::StopWorker => {
            injected.victim_partitions = victim_partitions(leases(env).await?);
            injected.victims.insert(victim.to_string());
            let pid = cluster.worker_pid(victim);
            injected.victim_pids.insert(pid);
            let at = SystemTime::now();
            injected.at = Some(at);
            signal(pid, "STOP");
            let stopped = Instant::now();
            // Stopped until the other worker has taken over its partitions (observable)...
            let mut watch = env.watch().await?;
            let mut read = 0;
            let partitions = env.settings.partitions;
            let keys = injected.victim_partitions.clone();
            let taken = watch
                .wait_until(Duration::from_secs(60), |seen| {
                    let hit = seen[read..].iter().any(|e| {
                        e.event_type() == "handler_succeeded"
                            && e.data()["worker"] != victim
                            && event_time(e).is_some_and(|t| t > at)
                            && keys.contains(&lease_of(
                                e.data()["handler"].as_str().unwrap_or_default(),
                                &e.subject,
                                partitions,
                            ))
                    });
                    read = seen.len();
                    hit
                })
                .await;
            // ...and past the ack wait (the fault's definition), then it runs on.
            let past = env.settings.worker.ack_wait + Duration::from_secs(1);
            tokio::time::sleep(past.saturating_sub(stopped.elapsed())).await;
            signal(pid, "CONT");
            taken.context("nobody took over the stopped worker's partitions")?;
            injected.note = format!("stopped {:.1}s", stopped.elapsed().as_secs_f64());
        }
        Fault::StopOnlyWorker => {
            let pid = cluster.worker_pid(victim);
            injected.victim_pids.insert(pid);
            injected.at = Some(SystemTime::now());
            signal(pid, "STOP");
            let stopped = Instant::now();
            // Stopped until its leases have expired (nobody renews them), and past the ack wait.
            let until = Instant::now() + Duration::from_secs(60);
            while leases(env).await?.values().any(|owner| owner == victim) {
                ensure!(
                    Instant::now() < until,
                    "the stopped worker's leases never expired"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let past = env.settings.worker.ack_wait + Duration::from_secs(1);
            tokio::time::sleep(past.saturating_sub(stopped.elapsed())).await;
            injected.resumed = Some(SystemTime::now());
            signal(pid, "CONT");
            injected.note = format!("stopped {:.1}s", stopped.elapsed().as_secs_f64());
        }
        Fault::StopListener => {
            let (id, victim) = &cluster.listeners[0];
            let pid = victim.pid();
            injected.victim_partitions = routed_by(env, id).await?;
            signal(pid, "STOP");
            injected.at = Some(SystemTime::now());
            // The fault's duration: past the lease, so the other replica routes its partitions
            // meanwhile, and it resumes as a replica whose leases are gone.
            let past = env.settings.worker.lease_ttl * 2 + Duration::from_secs(1);
            tokio::time::sleep(past).await;
            injected.resumed = Some(SystemTime::now());
            signal(pid, "CONT");
            injected.note = format!("stopped {:.1}s", past.as_secs_f64());
        }
        Fault::StopCoordinator => {
            let pid = cluster.coordinators[0].pid();
            let victim = coordinator_id_of(pid);
            injected.victim_partitions = env
                .leases("wf.partition.")
                .await?
                .into_iter()
                .filter(|(_, owner)| victim(owner))
                .map(|(key, _)| key)
                .collect();
            ensure!(
                !injected.victim_partitions.is_empty(),
                "the coordinator to stop holds no workflow partition"
            );
            signal(pid, "STOP");
            let at = SystemTime::now();
            injected.at = Some(at);
            let stopped = Instant::now();
            // Stopped until the other coordinator holds its partitions...
            let until = Instant::now() + Duration::from_secs(60);
            loop {
                let owners = env.leases("wf.partition.").await?;
                if injected
                    .victim_partitions
                    .iter()
                    .all(|k| owners.get(k).is_some_and(|o| !victim(o)))
                {
                    break;
                }
                ensure!(
                    Instant::now() < until,
                    "nobody took over the stopped coordinator's partitions"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // ...and moves their instances on (its consumers are recreated by now), so the
            // stopped one resumes as a stale owner next to a live successor.
            let mut watch = env.watch().await?;
            let partitions = env.settings.partitions;
            let keys = injected.victim_partitions.clone();
            let mut read = 0;
            let moved = watch
                .wait_until(Duration::from_secs(60), |seen| {
                    let hit = seen[read..].iter().any(|e| {
                        e.event.as_ref().is_some_and(|ev| {
                            ev.source == COORDINATOR
                                && keys.contains(&workflow_lease_of(&ev.aggregateid, partitions))
                        }) && event_time(e).is_some_and(|t| t > at)
                    });
                    read = seen.len();
                    hit
                })
                .await;
            injected.resumed = Some(SystemTime::now());
            signal(pid, "CONT");
            moved.context("the stopped coordinator's instances did not move on")?;
            injected.note = format!("stopped {:.1}s", stopped.elapsed().as_secs_f64());
        }
        Fault::HandlerFaults | Fault::Poison => {
            injected.at = Some(SystemTime::now());
        }
        Fault::StorageFull => {
            let mut events = env.nats.js.get_stream(EVENTS_STREAM).await?;
            let info = events.info().await?.clone();
            let mut config = info.config.clone();
            let original = config.max_bytes;
            // Leave room for a few more events only.
            config.max_bytes = i64::try_from(info.state.bytes)? + 48 * 1024;
            env.nats.js.update_stream(&config).await?;
            let filled = SystemTime::now();
            tokio::time::timeout(
                Duration::from_secs(60),
                publisher.refusals.wait_for(|r| *r >= 3),
            )
            .await
            .context("a full log never refused a publish")??;
            // The fault lasts a while (long enough for writers' back-off to grow).
            tokio::time::sleep(Duration::from_secs(2)).await;
            let full_state = events.info().await?.state.clone();
            ensure!(
                full_state.bytes <= u64::try_from(config.max_bytes)?,
                "the log grew past its limit: {} > {}",
                full_state.bytes,
                config.max_bytes
            );
            // Space frees (an operator grows the volume): writes resume.
            config.max_bytes = original;
            let freed = SystemTime::now();
            env.nats.js.update_stream(&config).await?;
            injected.at = Some(freed);
            injected.note = format!(
                "full for {:.1}s at {} B",
                freed
                    .duration_since(filled)
                    .unwrap_or_default()
                    .as_secs_f64(),
                full_state.bytes
            );
        }
        Fault::TasksFull => {
            // Room for a few dozen tasks: workers free space as they ack, so the listener's
            // writes are refused and accepted by turns while the stream goes on.
            let mut tasks = env.nats.js.get_stream(TASKS_STREAM).await?;
            let mut config = tasks.info().await?.config.clone();
            let original = config.max_bytes;
            config.max_bytes = 4 * 1024;
            env.nats.js.update_stream(&config).await?;
            let filled = SystemTime::now();
            // A backlog already above the new limit stays (a lower limit evicts nothing with
            // `discard: new`); from here TASKS may only shrink to the limit, then stay under it.
            let ceiling = tasks
                .info()
                .await?
                .state
                .bytes
                .max(u64::try_from(config.max_bytes)?);
            // The fault's duration.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let state = tasks.info().await?.state.clone();
            ensure!(
                state.bytes <= ceiling,
                "TASKS grew past its limit: {} B > {ceiling} B",
                state.bytes
            );
            config.max_bytes = original;
            let freed = SystemTime::now();
            env.nats.js.update_stream(&config).await?;
            injected.at = Some(freed);
            injected.note = format!(
                "4 KiB limit for {:.1}s",
                freed
                    .duration_since(filled)
                    .unwrap_or_default()
                    .as_secs_f64()
            );
        }
    }
    Ok(injected)
}

fn recovery(
    fault: Fault,
    injected: &Injected,
    published: &Published,
    logs: &Logs,
    partitions: u16,
) -> Option<Duration> {
    let at = injected.at?;
    let stored: HashMap<&str, SystemTime> = logs
        .events
        .iter()
        .filter_map(|r| Some((r.event.as_ref()?.id.as_str(), r.stored_at)))
        .collect();
    match fault {
        // The first outcome of an event appended after the fault in a partition the victim
        // routed: routing of its partitions is back. (Workflow steps are not routed by the
        // listener: the coordinator writes their tasks.)
        Fault::KillListener | Fault::StopListener => first_outcome_after(logs, at, |r| {
            r.str_field("handler") != "step"
                && stored
                    .get(r.str_field("event_id").as_str())
                    .is_some_and(|t| *t > at)
                && injected
                    .victim_partitions
                    .contains(&route_lease_of(&r.subject, partitions))
        }),
        // The first outcome in a partition the victim owned, written by someone else.
        // The first outcome after the broker (or the only worker) is back, counted from the
        // fault: writes in flight at the kill that landed before it are not recovery.
        Fault::KillBroker | Fault::StopOnlyWorker => {
            let resumed = injected.resumed?;
            first_outcome_after(logs, resumed, |_| true)
                .map(|d| d + resumed.duration_since(at).unwrap_or_default())
        }
        Fault::KillWorker | Fault::StopWorker => first_outcome_after(logs, at, |r| {
            !injected.victims.contains(&r.str_field("worker"))
                && injected.victim_partitions.contains(&lease_of(
                    &r.str_field("handler"),
                    &r.subject,
                    partitions,
                ))
        }),
        Fault::KillCoordinator => first_transition_after(logs, at, &stored, |_| true),
        Fault::StopCoordinator => first_transition_after(logs, at, &stored, |instance| {
            injected
                .victim_partitions
                .contains(&workflow_lease_of(instance, partitions))
        }),
        // The first outcome of an event appended after the kill, by a restarted worker, and the
        // first transition caused by such an event: the whole pipeline is back.
        Fault::KillAll => {
            let outcome = first_outcome_after(logs, at, |r| {
                !injected.victims.contains(&r.str_field("worker"))
                    && stored
                        .get(r.str_field("event_id").as_str())
                        .is_some_and(|t| *t > at)
            })?;
            Some(outcome.max(first_transition_after(logs, at, &stored, |_| true)?))
        }
        Fault::StorageFull | Fault::TasksFull => first_outcome_after(logs, at, |_| true),
        // Longest time from the start of a failed (or hung) first attempt to the event's success.
        Fault::HandlerFaults => {
            let mut first_failure: HashMap<String, SystemTime> = HashMap::new();
            for r in &logs.events {
                if r.event_type() == "handler_failed" && r.str_field("handler") == "audit" {
                    let took = Duration::from_millis(r.data()["duration_ms"].as_u64().unwrap_or(0));
                    let started = r.stored_at.checked_sub(took).unwrap_or(r.stored_at);
                    let first = first_failure
                        .entry(r.str_field("event_id"))
                        .or_insert(started);
                    *first = (*first).min(started);
                }
            }
            logs.events
                .iter()
                .filter(|r| {
                    r.event_type() == "handler_succeeded" && r.str_field("handler") == "audit"
                })
                .filter_map(|r| {
                    let failed = first_failure.get(&r.str_field("event_id"))?;
                    r.stored_at.duration_since(*failed).ok()
                })
                .max()
        }
        // Longest time from a poison event's append to its dead letter.
        Fault::Poison => {
            let appended: HashMap<u64, SystemTime> =
                logs.events.iter().map(|r| (r.seq, r.stored_at)).collect();
            let by_id: HashMap<&str, u64> = published
                .acked
                .iter()
                .map(|s| (s.planned.id.as_str(), s.seq))
                .collect();
            logs.dlq
                .iter()
                .filter_map(|(r, d)| {
                    let seq = match (&d.event, d.event_seq) {
                        (Some(e), _) => *by_id.get(e.id.as_str())?,
                        (None, seq) => seq?,
                    };
                    r.stored_at.duration_since(*appended.get(&seq)?).ok()
                })
                .max()
        }
    }
}

fn print_table(rows: &[Row], profile: Profile) {
    let mut out = format!(
        "\nfault injection: {} events per fault, {} aggregates, {}/s\n",
        profile.events,
        AGGREGATES,
        profile.burst as f64 / profile.tick.as_secs_f64()
    );
    out.push_str(&format!(
        "| {:<34} | {:>5} | {:>7} | {:>9} | {:>6} | {:>4} | {:>10} | {:>8} | {} |\n",
        "fault", "sent", "handled", "workflows", "in DLQ", "lost", "duplicated", "recovery", "note"
    ));
    out.push_str(&format!(
        "|{:-<36}|{:->7}|{:->9}|{:->11}|{:->8}|{:->6}|{:->12}|{:->10}|------|\n",
        "", "", "", "", "", "", "", ""
    ));
    for r in rows {
        let recovery = r
            .recovery
            .map(|d| format!("{:.2}s", d.as_secs_f64()))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "| {:<34} | {:>5} | {:>7} | {:>9} | {:>6} | {:>4} | {:>10} | {:>8} | {} |\n",
            r.fault,
            r.sent,
            r.handled,
            r.workflows,
            r.in_dlq,
            r.lost,
            r.duplicated,
            recovery,
            r.note
        ));
    }
    eprintln!("{out}");
    if let Ok(path) = std::env::var("FAULTS_TABLE") {
        let _ = std::fs::write(path, &out);
    }
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_promise_holds_under_every_fault() -> anyhow::Result<()> {
    let profile = profile();
    for bin in ["grizzly-listener", "grizzly-worker", "grizzly-coordinator"] {
        ensure!(
            grizzly_tests::bin_path(bin).is_file(),
            "{bin} is missing: run `cargo build --workspace --bins` first"
        );
    }
    let only = std::env::var("FAULTS_ONLY").ok();
    let faults = [
        Fault::KillListener,
        Fault::KillWorker,
        Fault::KillCoordinator,
        Fault::KillAll,
        Fault::KillBroker,
        Fault::StopWorker,
        Fault::StopOnlyWorker,
        Fault::StopListener,
        Fault::StopCoordinator,
        Fault::HandlerFaults,
        Fault::Poison,
        Fault::StorageFull,
        Fault::TasksFull,
    ];
    let mut rows = Vec::new();
    for fault in faults {
        if only
            .as_deref()
            .is_some_and(|o| !format!("{fault:?}").eq_ignore_ascii_case(o))
        {
            continue;
        }
        rows.push(run(fault, profile).await);
    }
    print_table(&rows, profile);
    let problems: Vec<String> = rows
        .iter()
        .flat_map(|r| r.problems.iter().map(move |p| format!("{}: {p}", r.fault)))
        .collect();
    assert!(
        problems.is_empty(),
        "promises broken:\n{}",
        problems.join("\n")
    );
    Ok(())
}
