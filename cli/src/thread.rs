//! Running the listener or the worker in this process the way its own binary runs it: on a
//! thread of its own with a single-threaded runtime (ARCHITECTURE.md, *Runtimes*), so `grizzly
//! dev` behaves and `grizzly bench` measures as the shipped binaries do.

use anyhow::Context as _;
use futures::future::LocalBoxFuture;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Starts the component `build` makes on a new thread named `name`, and returns once it is
/// built (with its error if it could not be); the handle yields what its run returned.
///
/// `build` runs on that thread and must connect to NATS itself: a client's connection task
/// runs on the runtime it was made on, and a connection made here would put every message
/// through a cross-thread hand-off, the cost the single-threaded runtime avoids.
pub async fn spawn_component<B, F>(
    name: &'static str,
    build: B,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>>
where
    B: FnOnce() -> F + Send + 'static,
    F: Future<Output = anyhow::Result<LocalBoxFuture<'static, anyhow::Result<()>>>>,
{
    let (built_tx, built) = oneshot::channel::<anyhow::Result<()>>();
    let (done_tx, done) = oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = built_tx.send(Err(e.into()));
                    return;
                }
            };
            let result = runtime.block_on(async move {
                let run = match build().await {
                    Ok(run) => run,
                    Err(e) => {
                        let _ = built_tx.send(Err(e));
                        return None;
                    }
                };
                let _ = built_tx.send(Ok(()));
                Some(run.await)
            });
            if let Some(result) = result {
                let _ = done_tx.send(result);
            }
        })
        .with_context(|| format!("starting the {name} thread"))?;
    built
        .await
        .with_context(|| format!("the {name} thread ended while starting"))?
        .with_context(|| format!("starting the {name}"))?;
    Ok(tokio::spawn(async move {
        done.await
            .with_context(|| format!("the {name} thread ended without a result"))?
    }))
}
