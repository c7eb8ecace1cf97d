//! Running the listener or the worker in this process the way its own binary runs it: on a
//! thread of its own with a single-threaded runtime (ARCHITECTURE.md, *Runtimes*), so `grizzly
//! dev` behaves and `grizzly bench` measures as the shipped binaries do.

use anyhow::Context as _;
use futures::FutureExt as _;
use futures::future::{BoxFuture, LocalBoxFuture};
use grizzly_shared::Settings;
use grizzly_shared::handler::LoadedHandler;
use grizzly_shared::nats::{self, Nats};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// A component that runs on a thread of its own.
#[derive(Clone, Copy, Debug)]
pub enum Component {
    Listener,
    Worker,
}

impl Component {
    pub fn name(self) -> &'static str {
        match self {
            Component::Listener => "listener",
            Component::Worker => "worker",
        }
    }

    /// Builds it on `nats`; the future runs it until `stop`.
    fn build(
        self,
        nats: Nats,
        settings: Settings,
        handlers: &[LoadedHandler],
        stop: CancellationToken,
    ) -> anyhow::Result<LocalBoxFuture<'static, anyhow::Result<()>>> {
        Ok(match self {
            Component::Listener => grizzly_listener::Listener::new(nats, settings, handlers)?
                .run(stop)
                .boxed_local(),
            Component::Worker => grizzly_worker::Worker::new(nats, settings, handlers)?
                .run(stop)
                .boxed_local(),
        })
    }
}

/// Starts `component` on a new thread, connected to NATS as `client`, and returns once it is
/// built (with its error if it could not be); the future yields what its run returned.
/// `connected` sees the connection first (`grizzly dev` has its health endpoint track it).
///
/// The connection is made on that thread: a client's connection task runs on the runtime it
/// was made on, and one made on the caller's would put every message through a cross-thread
/// hand-off, the cost the single-threaded runtime avoids.
pub async fn spawn_component(
    component: Component,
    client: &'static str,
    settings: Settings,
    handlers: Vec<LoadedHandler>,
    stop: CancellationToken,
    connected: impl FnOnce(&Nats, &Settings) + Send + 'static,
) -> anyhow::Result<BoxFuture<'static, anyhow::Result<()>>> {
    let name = component.name();
    let (built_tx, built) = oneshot::channel();
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
                let built = match nats::connect(&settings.nats_url, client, false).await {
                    Ok(nats) => {
                        connected(&nats, &settings);
                        component.build(nats, settings, &handlers, stop)
                    }
                    Err(e) => Err(e.into()),
                };
                match built {
                    Ok(run) => {
                        let _ = built_tx.send(Ok(()));
                        Some(run.await)
                    }
                    Err(e) => {
                        let _ = built_tx.send(Err(e));
                        None
                    }
                }
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
    Ok(async move {
        done.await
            .with_context(|| format!("the {name} thread ended without a result"))?
    }
    .boxed())
}
