//! `grizzly bench workflows`: workflows of [`STEPS`] sequential no-op steps against the same
//! no-op handler called by plain events, on one broker in one run. A step goes coordinator →
//! task → worker → outcome → coordinator, with a checkpoint (compare-and-set) and the step's
//! events in between; a plain event goes listener → task → worker → outcome. The ratios say
//! what the coordinator adds per step.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::message::PublishMessage;
use futures::StreamExt;
use grizzly_coordinator::instance::instance_id_for_trigger;
use grizzly_shared::Settings;
use serde_json::{Value, json};

use super::{Bench, Measured, NOOP_HANDLER, publish_all, write};

/// Steps per workflow instance.
const STEPS: usize = 3;
const WORKFLOW: &str = "bench_chain";
const COMPLETED: &str = "events.workflow.*.completed";

pub(super) struct WorkflowFigures {
    instances: usize,
    /// One at a time: event handed to the client → its outcome stored.
    plain_alone: Measured,
    /// One at a time: trigger handed to the client → `completed` stored.
    flow_alone: Measured,
    /// `STEPS` × `instances` plain events published at once.
    plain_burst: Measured,
    /// `instances` triggers published at once.
    flow_burst: Measured,
}

impl WorkflowFigures {
    /// Workflow steps per second over plain events per second.
    fn steps_over_plain(&self) -> f64 {
        self.flow_burst.events_per_s * STEPS as f64 / self.plain_burst.events_per_s.max(1e-9)
    }

    /// One instance's latency over `STEPS` plain events one after another.
    fn alone_over_plain(&self) -> f64 {
        self.flow_alone.p50_ms / (STEPS as f64 * self.plain_alone.p50_ms).max(1e-9)
    }

    /// The figures `bench all` records (no targets: what the coordinator adds per step).
    pub(super) fn figures(&self) -> [(&'static str, f64); 4] {
        [
            ("workflow_instances_per_s", self.flow_burst.events_per_s),
            ("workflow_steps_over_plain_events", self.steps_over_plain()),
            ("workflow_alone_p50_ms", self.flow_alone.p50_ms),
            (
                "workflow_alone_over_steps_plain_alone",
                self.alone_over_plain(),
            ),
        ]
    }

    /// One line for `bench all`'s summary.
    pub(super) fn summary(&self) -> String {
        format!(
            "workflows of {STEPS} no-op steps, fsync default: a burst of {} instances {:.0}/s ({:.0} steps/s, ×{:.2} plain events/s); one alone p50 {:.1} ms (×{:.2} {STEPS} plain events one at a time); no target, see ARCHITECTURE.md (*Workflows*, Throughput)",
            self.instances,
            self.flow_burst.events_per_s,
            self.flow_burst.events_per_s * STEPS as f64,
            self.steps_over_plain(),
            self.flow_alone.p50_ms,
            self.alone_over_plain()
        )
    }

    pub(super) fn json(&self) -> Value {
        json!({
            "bench": "workflows",
            "instances": self.instances,
            "steps": STEPS,
            "partitions": Settings::default().partitions,
            "plain_alone": self.plain_alone,
            "workflow_alone": self.flow_alone,
            "plain_burst": self.plain_burst,
            "workflow_burst": self.flow_burst,
            "workflow_steps_per_s_over_plain_events_per_s": self.steps_over_plain(),
            "workflow_alone_over_steps_plain_alone": self.alone_over_plain(),
        })
    }
}

pub(super) async fn workflows(instances: usize) -> anyhow::Result<WorkflowFigures> {
    anyhow::ensure!(instances > 0, "--instances must be at least 1");
    let dir = tempfile::tempdir()?;
    let (handlers_dir, workflows_dir) = (dir.path().join("handlers"), dir.path().join("workflows"));
    std::fs::create_dir_all(&handlers_dir)?;
    std::fs::create_dir_all(&workflows_dir)?;
    write(&handlers_dir.join("noop.yaml"), NOOP_HANDLER)?;
    let steps: String = (1..=STEPS)
        .map(|i| format!("  - id: s{i}\n    call: noop\n"))
        .collect();
    write(
        &workflows_dir.join("chain.yaml"),
        &format!("name: {WORKFLOW}\nversion: 1\non: [\"events.benchwf.*.start\"]\ndo:\n{steps}"),
    )?;
    // The broker's default fsync, as `bench throughput`'s headline figures, and the default
    // partitions: each applies its instances' events one at a time (ARCHITECTURE.md,
    // *Workflows*), so their count is part of what is measured.
    let bench = Bench::start_with(
        &dir.path().join("store"),
        false,
        &handlers_dir,
        Some(&workflows_dir),
        |s| s.worker.max_concurrency = 256,
    )
    .await?;
    let deadline = Duration::from_secs(600);
    let alone = (instances / 10).clamp(20, 200);
    // Warm-up: pools, consumers, the workflow's pinned version.
    bench
        .run_batch(
            "noop",
            200,
            200,
            |i| format!("events.bench.w{i}.noop"),
            deadline,
        )
        .await?;
    run_flows(&bench, 20, false, deadline).await?;
    let plain_alone = bench
        .run_batch(
            "noop",
            alone * STEPS,
            1,
            |i| format!("events.bench.l{}.noop", i % 100),
            deadline,
        )
        .await?;
    let flow_alone = run_flows(&bench, alone, false, deadline).await?;
    let plain_burst = bench
        .run_batch(
            "noop",
            instances * STEPS,
            instances * STEPS,
            |i| format!("events.bench.a{}.noop", i % 1000),
            deadline,
        )
        .await?;
    let flow_burst = run_flows(&bench, instances, true, deadline).await?;
    bench.shutdown().await;
    let figures = WorkflowFigures {
        instances,
        plain_alone,
        flow_alone,
        plain_burst,
        flow_burst,
    };
    figures.print();
    Ok(figures)
}

impl WorkflowFigures {
    fn print(&self) {
        println!(
            "\nworkflows of {STEPS} no-op steps vs plain events to the same handler (fsync default, {} partitions)",
            Settings::default().partitions
        );
        println!(
            "{:<44} {:>10} {:>10} {:>10}",
            "", "per s", "p50 ms", "p99 ms"
        );
        for (name, m) in [
            ("plain events, one at a time", &self.plain_alone),
            ("workflow instances, one at a time", &self.flow_alone),
            ("plain events, burst", &self.plain_burst),
            ("workflow instances, burst", &self.flow_burst),
        ] {
            println!("{}", m.row(name, 44));
        }
        println!(
            "  workflow steps/s ÷ plain events/s = {:.2}; one instance ÷ {STEPS} plain events one at a time = {:.2}",
            self.steps_over_plain(),
            self.alone_over_plain()
        );
    }
}

/// Starts `n` workflow instances — all at once (`burst`) or each once the previous completed —
/// and measures trigger handed to the client → `completed` stored.
async fn run_flows(
    bench: &Bench,
    n: usize,
    burst: bool,
    deadline: Duration,
) -> anyhow::Result<Measured> {
    let start_seq = bench.next_seq().await?;
    let trigger = |i: usize| {
        let id = format!("benchwf-{i}-{start_seq}");
        let instance = instance_id_for_trigger(WORKFLOW, &id);
        let publish = PublishMessage::build()
            .payload(json!({"i": i}).to_string().into())
            .message_id(id);
        (instance, (format!("events.benchwf.w{i}.start"), publish))
    };
    let mut sent = HashMap::with_capacity(n);
    let started = time::OffsetDateTime::now_utc();
    let mut last = started;
    let mut latencies = Vec::with_capacity(n);
    // The instance a `completed` event reports on, and when the log stored it.
    let completion = |msg: &async_nats::jetstream::Message| -> anyhow::Result<_> {
        let at = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?.published;
        let instance = msg
            .subject
            .split('.')
            .nth(2)
            .unwrap_or_default()
            .to_string();
        Ok((instance, at))
    };
    if burst {
        let wave: Vec<_> = (0..n)
            .map(|i| {
                let (instance, publish) = trigger(i);
                sent.insert(instance, time::OffsetDateTime::now_utc());
                publish
            })
            .collect();
        publish_all(&bench.nats.js, wave.into_iter()).await?;
        // Counted by the broker while it runs; read back once all are in (see `run_batch`).
        bench
            .wait_count(start_seq, &[COMPLETED], n, deadline)
            .await
            .context("workflow instances")?;
    }
    let mut completed = bench.read_log_from(start_seq, &[COMPLETED]).await?;
    let until = tokio::time::Instant::now() + deadline;
    for i in 0..n {
        if !burst {
            let (instance, publish) = trigger(i);
            sent.insert(instance, time::OffsetDateTime::now_utc());
            publish_all(&bench.nats.js, std::iter::once(publish)).await?;
        }
        // Burst: any next completion; one at a time: this instance's.
        loop {
            let msg = tokio::time::timeout_at(until, completed.next())
                .await
                .with_context(|| {
                    format!("only {} of {n} workflow instances completed within {deadline:?} (a failed one never completes)", latencies.len())
                })?
                .context("log ended")??;
            let (instance, at) = completion(&msg)?;
            if let Some(sent_at) = sent.remove(&instance) {
                latencies.push((at - sent_at).as_seconds_f64() * 1000.0);
                last = last.max(at);
                break;
            }
        }
    }
    Ok(Measured::new(latencies, (last - started).as_seconds_f64()))
}
