//! The operations endpoint every binary serves on `metrics_addr` (default `0.0.0.0:9090`,
//! `GRIZZLY_METRICS_ADDR`):
//!
//! | path | answers |
//! |---|---|
//! | `GET /metrics` | the process's [`crate::metrics`] registry (OpenMetrics text) |
//! | `GET /healthz` | 200 while the process is alive (liveness) |
//! | `GET /readyz` | 200 once every tracked component is connected to NATS and has its streams ensured, 503 otherwise (readiness) |
//! | `GET /debug/pprof/profile?seconds=N` | a CPU profile of the next N seconds (default 30, at most 300) in pprof protobuf format — `go tool pprof`, or `pprof -http` (cargo feature `pprof`, on by default) |
//!
//! Tests bind `127.0.0.1:0` and read the chosen port from [`ObservabilityServer::local_addr`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::metrics::{self, metrics};
use crate::nats::{self, Nats};

/// Readiness of the components in this process (one in a component binary, three in dev mode).
#[derive(Clone, Default)]
pub struct Health {
    checks: Arc<Mutex<Vec<Check>>>,
    next: Arc<AtomicU64>,
}

struct Check {
    id: u64,
    component: String,
    client: async_nats::Client,
    streams_ensured: Arc<AtomicBool>,
}

impl Health {
    /// Tracks `component`'s broker connection until `shutdown`: it is ready once its streams
    /// are ensured (retried until they are) and for as long as its connection is up. Also keeps
    /// the broker-side gauges (DLQ depth, consumer lag) fresh, once per process.
    pub fn track(
        &self,
        component: &str,
        nats: &Nats,
        settings: &Settings,
        shutdown: CancellationToken,
    ) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let streams_ensured = Arc::new(AtomicBool::new(false));
        self.checks.lock().expect("health lock").push(Check {
            id,
            component: component.to_string(),
            client: nats.client.clone(),
            streams_ensured: streams_ensured.clone(),
        });
        let (checks, js, streams) = (
            self.checks.clone(),
            nats.js.clone(),
            settings.streams.clone(),
        );
        let poll_gauges = id == 0;
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            let ensured = loop {
                match nats::ensure_streams(&js, &streams).await {
                    Ok(()) => break true,
                    Err(e) => {
                        tracing::warn!(error = %e, "not ready: cannot ensure the streams yet")
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break false,
                    _ = tokio::time::sleep(delay) => delay = (delay * 2).min(Duration::from_secs(5)),
                }
            };
            streams_ensured.store(ensured, Ordering::SeqCst);
            if ensured && poll_gauges {
                metrics::poll_broker(js, shutdown.clone()).await;
            }
            shutdown.cancelled().await;
            checks.lock().expect("health lock").retain(|c| c.id != id);
        });
    }

    /// Whether every tracked component is ready, with one line per component.
    pub fn readiness(&self) -> (bool, String) {
        let checks = self.checks.lock().expect("health lock");
        if checks.is_empty() {
            return (false, "starting: no component connected yet\n".into());
        }
        let mut ready = true;
        let mut report = String::new();
        for c in checks.iter() {
            let connected = matches!(
                c.client.connection_state(),
                async_nats::connection::State::Connected
            );
            let streams = c.streams_ensured.load(Ordering::SeqCst);
            ready &= connected && streams;
            report.push_str(&format!(
                "{}: nats {}, streams {}\n",
                c.component,
                if connected {
                    "connected"
                } else {
                    "disconnected"
                },
                if streams { "ensured" } else { "not ensured" },
            ));
        }
        (ready, report)
    }
}

/// The running endpoint; stops when dropped.
pub struct ObservabilityServer {
    local_addr: SocketAddr,
    health: Health,
    stop: CancellationToken,
}

impl ObservabilityServer {
    /// Binds `addr` (`host:port`; port 0 picks a free one) and serves in the background.
    pub async fn start(addr: &str) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot serve metrics on {addr}: {e}"))
        })?;
        let local_addr = listener.local_addr()?;
        let health = Health::default();
        let stop = CancellationToken::new();
        let app = router(health.clone());
        let until = stop.clone();
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(until.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        });
        tracing::info!(%local_addr, "serving /metrics, /healthz, /readyz");
        Ok(Self {
            local_addr,
            health,
            stop,
        })
    }

    /// [`start`](Self::start) for binaries: a port already taken is logged, not fatal (the
    /// component still works; its probes will say why it is not ready).
    pub async fn start_or_warn(addr: &str) -> Option<Self> {
        match Self::start(addr).await {
            Ok(server) => Some(server),
            Err(e) => {
                tracing::error!(error = %e, "running without the metrics and health endpoint");
                None
            }
        }
    }

    /// The address actually bound (the chosen port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://<local_addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Shorthand for [`Health::track`].
    pub fn track(
        &self,
        component: &str,
        nats: &Nats,
        settings: &Settings,
        shutdown: CancellationToken,
    ) {
        self.health.track(component, nats, settings, shutdown)
    }
}

impl Drop for ObservabilityServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn router(health: Health) -> Router {
    let router = Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready));
    #[cfg(feature = "pprof")]
    let router = router.route("/debug/pprof/profile", get(profile::cpu));
    router.with_state(health)
}

async fn serve_metrics() -> Response {
    // Scrape hooks may take short locks; keep them off the async workers.
    match tokio::task::spawn_blocking(|| metrics().encode()).await {
        Ok(body) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn ready(State(health): State<Health>) -> Response {
    let (ready, report) = health.readiness();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, report).into_response()
}

#[cfg(feature = "pprof")]
mod profile {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use axum::extract::Query;
    use axum::http::{StatusCode, header};
    use axum::response::{IntoResponse, Response};
    use pprof::protos::Message as _;

    const MAX_SECONDS: u64 = 300;
    /// The profiler is process-wide (SIGPROF): one profile at a time.
    static RUNNING: AtomicBool = AtomicBool::new(false);

    #[derive(serde::Deserialize)]
    pub struct ProfileQuery {
        seconds: Option<u64>,
    }

    /// `GET /debug/pprof/profile?seconds=N`: samples every thread at 99 Hz for N seconds.
    pub async fn cpu(Query(q): Query<ProfileQuery>) -> Response {
        let seconds = q.seconds.unwrap_or(30).clamp(1, MAX_SECONDS);
        if RUNNING.swap(true, Ordering::SeqCst) {
            return (
                StatusCode::CONFLICT,
                "a CPU profile is already being taken\n",
            )
                .into_response();
        }
        let taken = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
            let guard = pprof::ProfilerGuardBuilder::default()
                .frequency(99)
                .blocklist(&["libc", "libgcc", "pthread", "vdso"])
                .build()
                .map_err(|e| e.to_string())?;
            std::thread::sleep(Duration::from_secs(seconds));
            let profile = guard
                .report()
                .build()
                .and_then(|r| r.pprof())
                .map_err(|e| e.to_string())?;
            Ok(profile.encode_to_vec())
        })
        .await;
        RUNNING.store(false, Ordering::SeqCst);
        match taken {
            Ok(Ok(body)) => (
                [
                    (header::CONTENT_TYPE, "application/octet-stream"),
                    (
                        header::CONTENT_DISPOSITION,
                        "attachment; filename=\"profile.pb\"",
                    ),
                ],
                body,
            )
                .into_response(),
            Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        }
    }
}
