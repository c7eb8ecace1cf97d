//! One owned partition of one handler's tasks (`tasks.<handler>.<partition>`).
//!
//! Taking ownership recreates the partition's consumer from the oldest unacked task: `TASKS` is a
//! work queue, so acked tasks are gone and a fresh consumer sees exactly the unfinished ones, in
//! log order — including those the previous owner had in flight when it died. Within the
//! partition, tasks of one aggregate run one at a time in order; different aggregates run in
//! parallel (bounded by the handler's and the worker's limits).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use grizzly_shared::Task;
use grizzly_shared::nats::TASKS_STREAM;
use grizzly_shared::subject::task_subject;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::executor::{ExecutionEnv, HandlerContext, execute};

pub fn consumer_name(handler: &str, partition: u16) -> String {
    format!("worker-{handler}-{partition}")
}

pub struct PartitionRunner {
    pub ctx: Arc<HandlerContext>,
    pub env: ExecutionEnv,
    pub partition: u16,
    pub max_ack_pending: i64,
}

impl PartitionRunner {
    async fn fresh_consumer(&self) -> anyhow::Result<jetstream::consumer::Consumer<pull::Config>> {
        let stream = self.env.nats.js.get_stream(TASKS_STREAM).await?;
        let name = consumer_name(self.ctx.name(), self.partition);
        // Ignore "not found": the point is that no previous delivery state survives.
        let _ = stream.delete_consumer(&name).await;
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(name),
                description: Some(format!(
                    "tasks of handler {} partition {}",
                    self.ctx.name(),
                    self.partition
                )),
                filter_subject: task_subject(self.ctx.name(), self.partition),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::Explicit,
                ack_wait: self.env.ack_wait,
                max_ack_pending: self.max_ack_pending,
                ..Default::default()
            })
            .await?;
        Ok(consumer)
    }

    /// Consumes until `stop`, then lets running tasks finish (queued ones stay unacked for the
    /// next owner).
    pub async fn run(self, stop: CancellationToken) {
        let handler = self.ctx.name().to_string();
        let consumer = loop {
            match self.fresh_consumer().await {
                Ok(c) => break c,
                Err(e) => {
                    warn!(%handler, partition = self.partition, error = %e, "cannot create partition consumer; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        };
        info!(%handler, partition = self.partition, "partition acquired");
        let mut queues: HashMap<String, VecDeque<(jetstream::Message, Task)>> = HashMap::new();
        let mut running: FuturesUnordered<BoxFuture<'static, String>> = FuturesUnordered::new();
        let mut progress = tokio::time::interval(self.env.ack_wait / 3);
        progress.tick().await;
        'pull: while !stop.is_cancelled() {
            let mut messages = match consumer
                .stream()
                .max_messages_per_batch(256)
                .heartbeat(Duration::from_secs(3))
                .expires(Duration::from_secs(10))
                .messages()
                .await
            {
                Ok(m) => m,
                Err(e) => {
                    warn!(%handler, error = %e, "cannot pull tasks; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break 'pull,
                    Some(key) = running.next(), if !running.is_empty() => {
                        self.start_next(&key, &mut queues, &mut running);
                    }
                    _ = progress.tick() => {
                        // Tasks waiting behind an earlier one of their aggregate are still ours.
                        for (msg, _) in queues.values().flatten() {
                            let _ = msg.ack_with(AckKind::Progress).await;
                        }
                    }
                    next = messages.next() => match next {
                        Some(Ok(msg)) => self.accept(msg, &mut queues, &mut running).await,
                        Some(Err(e)) => {
                            warn!(%handler, error = %e, "task pull interrupted; resuming");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue 'pull;
                        }
                        None => continue 'pull,
                    },
                }
            }
        }
        // Drain: finish what is running; queued tasks go back to the broker with the partition.
        while let Some(key) = running.next().await {
            queues.remove(&key);
        }
        info!(%handler, partition = self.partition, "partition released");
    }

    async fn accept(
        &self,
        msg: jetstream::Message,
        queues: &mut HashMap<String, VecDeque<(jetstream::Message, Task)>>,
        running: &mut FuturesUnordered<BoxFuture<'static, String>>,
    ) {
        let task: Task = match serde_json::from_slice(&msg.payload) {
            Ok(t) => t,
            Err(e) => {
                // Only the listener writes tasks; a corrupt one cannot succeed by retrying.
                warn!(subject = %msg.subject, error = %e, "malformed task terminated");
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
        };
        let key = task.ordering_key();
        let queue = queues.entry(key.clone()).or_default();
        queue.push_back((msg, task));
        if queue.len() == 1 {
            self.start_next_inner(&key, queues, running, false);
        }
    }

    /// Called when the running task of `key` finished: start its next one.
    fn start_next(
        &self,
        key: &str,
        queues: &mut HashMap<String, VecDeque<(jetstream::Message, Task)>>,
        running: &mut FuturesUnordered<BoxFuture<'static, String>>,
    ) {
        self.start_next_inner(key, queues, running, true);
    }

    fn start_next_inner(
        &self,
        key: &str,
        queues: &mut HashMap<String, VecDeque<(jetstream::Message, Task)>>,
        running: &mut FuturesUnordered<BoxFuture<'static, String>>,
        finished_one: bool,
    ) {
        let Some(queue) = queues.get_mut(key) else {
            return;
        };
        if finished_one {
            queue.pop_front();
        }
        let Some((msg, task)) = queue.front().cloned() else {
            queues.remove(key);
            return;
        };
        debug!(key, seq = task.event_seq, "starting task");
        let ctx = self.ctx.clone();
        let env = self.env.clone();
        let key = key.to_string();
        running.push(Box::pin(async move {
            execute(&ctx, &env, msg, task).await;
            key
        }));
    }
}
