//! Logging set-up shared by every binary. Filter from the `log` setting (`GRIZZLY_LOG`), unless
//! `RUST_LOG` is set; format `text` or `json`. Logs go to stderr so stdout stays for command output.

use tracing_subscriber::EnvFilter;

pub fn init(format: &str, filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // try_init: tests and dev mode may call this more than once.
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
