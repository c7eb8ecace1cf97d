//! Logging and tracing set-up shared by every binary.
//!
//! - **Logs**: filter from the `log` setting (`GRIZZLY_LOG`), unless `RUST_LOG` is set; format
//!   `text` or `json`; to stderr so stdout stays for command output.
//! - **Traces** (OpenTelemetry): off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; then Grizzly's spans (`emit`, `route`,
//!   `handle`, `attempt`, `claude_turn`, `mcp_emit_event`...) are exported over OTLP/HTTP
//!   (protobuf) in batches, with the standard variables: `OTEL_SERVICE_NAME` (default: the
//!   binary's name), `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER[_ARG]`,
//!   `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_BSP_SCHEDULE_DELAY`... `OTEL_SDK_DISABLED=true` or
//!   `OTEL_TRACES_EXPORTER=none` turn it off again. Context crosses processes in events (see
//!   [`crate::trace`]). Without an endpoint no exporter exists and spans cost what a disabled
//!   `tracing` span costs.
//! - **tokio-console** (cargo feature `tokio-console`, off by default): build with
//!   `RUSTFLAGS="--cfg tokio_unstable" cargo build --features grizzly-shared/tokio-console`,
//!   run, then `tokio-console` (listens on 127.0.0.1:6669; `TOKIO_CONSOLE_BIND` changes it).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer, Registry};

/// Keeps the trace exporter running; dropping it flushes the spans not yet sent and stops it.
/// Hold it in `main` until the process ends.
#[derive(Default)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Whether spans are exported (an OTLP endpoint is configured).
    pub fn tracing_enabled(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("warning: flushing traces at exit failed: {e}");
        }
    }
}

/// Sets up logs (and traces, when configured) for this process, named after the binary.
pub fn init(format: &str, filter: &str) -> TelemetryGuard {
    let service = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "grizzly".into());
    init_as(&service, format, filter)
}

/// [`init`] with an explicit default service name (`OTEL_SERVICE_NAME` still wins).
pub fn init_as(service: &str, format: &str, filter: &str) -> TelemetryGuard {
    let env_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(filter));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if format == "json" {
        fmt.json().with_filter(env_filter).boxed()
    } else {
        fmt.with_filter(env_filter).boxed()
    };
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![fmt];
    let provider = otlp_enabled().then(|| tracer_provider(service)).flatten();
    if let Some(provider) = &provider {
        let tracer = provider.tracer("grizzly");
        // Grizzly's own spans only, whatever the log filter: the log level must not decide what
        // is traced, and the exporter's HTTP client must not trace itself. The journey spans are
        // DEBUG so that, with tracing off and logs at INFO, they are disabled at the call site.
        let ours = filter_fn(|m| {
            let max = if m.is_span() {
                Level::DEBUG
            } else {
                Level::INFO
            };
            m.target().starts_with("grizzly") && *m.level() <= max
        });
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(ours)
                .boxed(),
        );
    }
    #[cfg(feature = "tokio-console")]
    layers.push(console_subscriber::spawn().boxed());
    // try_init: tests and dev mode may call this more than once; the first set-up stays.
    match tracing_subscriber::registry().with(layers).try_init() {
        Ok(()) => TelemetryGuard { provider },
        Err(_) => {
            if let Some(p) = provider {
                let _ = p.shutdown();
            }
            TelemetryGuard::default()
        }
    }
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

fn otlp_enabled() -> bool {
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled
        && (env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

fn tracer_provider(service: &str) -> Option<SdkTracerProvider> {
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("warning: tracing disabled: cannot build the OTLP exporter: {e}");
            return None;
        }
    };
    let mut resource = Resource::builder();
    if !env_set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(service.to_string());
    }
    Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build(),
    )
}
