//! The watchkeeper poll-loop worker: claims jobs from the watchkeeper daemon, runs the
//! allowlisted ones, reports every outcome, and behaves under systemd through the `watchkeeper`
//! library. It is also the reference for how a service uses that library:
//!
//! * one [`SystemdEnv`] read at start, `tracing` to the journal;
//! * one registered work loop, `poll`, that ticks once per cycle (also while a job runs and while
//!   the daemon is unreachable) and declares a bounded busy window around each request to the
//!   daemon, so the watchdog pings exactly while the loop makes progress;
//! * `READY=1` only once the daemon answered, `STATUS=` for what the worker does, a heartbeat
//!   file with its counters and health;
//! * `SIGTERM` → `STOPPING=1`, no more claims, a bounded wait for the running job, then the job
//!   is killed and released to another worker.
//!
//! The binary is a thin `main` around [`run`]; the [`config`] module reads the TOML file.
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

use std::path::PathBuf;
use std::time::Duration;

use watchkeeper::heartbeat::{Heartbeat, HeartbeatError, HeartbeatWriter};
use watchkeeper::logging::{self, LogConfig, LoggingError};
use watchkeeper::{Service, ServiceError, SystemdEnv};

pub mod config;
mod heartbeat;
mod job;
mod poll;
mod secrets;

pub use config::{Config, ConfigError};

/// The service's name: in logs (`SYSLOG_IDENTIFIER=`) and in the heartbeat's `service` field.
pub const SERVICE_NAME: &str = "watchkeeper-worker";

/// How much longer than the grace period the service's stop may take: the time to kill the job,
/// report its release and write the last heartbeat. Keep `TimeoutStopSec=` above
/// `grace_secs` + this.
pub const STOP_MARGIN: Duration = Duration::from_secs(5);

/// Exit code for an unusable configuration (`EX_CONFIG` from `sysexits.h`); a unit can list it
/// in `RestartPreventExitStatus=`.
pub const EXIT_CONFIG: u8 = 78;

/// Longest socket path a Unix socket address holds: `sun_path` is 108 bytes, the last one the
/// terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// Command-line options; each can also be given in a `WATCHKEEPER_*` environment variable.
#[derive(Debug, Clone, PartialEq, Eq, clap::Parser)]
#[command(
    name = "watchkeeper-worker",
    version,
    about = "Claims jobs from the watchkeeper daemon and runs the allowlisted ones, supervised by systemd"
)]
pub struct Options {
    /// The daemon's socket.
    #[arg(long, env = "WATCHKEEPER_SOCKET", value_name = "PATH")]
    pub socket: PathBuf,

    /// The worker's name, as the daemon sees it. Default: `worker-<pid>`.
    #[arg(long, env = "WATCHKEEPER_NAME", value_name = "NAME")]
    pub name: Option<String>,

    /// Configuration file (TOML: allowlist, poll_interval_ms, grace_secs, backoff_max_ms).
    /// Without one, every job is denied.
    #[arg(long, env = "WATCHKEEPER_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Write the heartbeat file here: the latest poll cycle's, at most once a second.
    #[arg(long, env = "WATCHKEEPER_HEARTBEAT", value_name = "PATH")]
    pub heartbeat: Option<PathBuf>,

    /// Overrides the configuration's `poll_interval_ms`.
    #[arg(
        long,
        env = "WATCHKEEPER_POLL_INTERVAL_MS",
        value_name = "MS",
        value_parser = clap::value_parser!(u64).range(1..=3_600_000)
    )]
    pub poll_interval_ms: Option<u64>,

    /// Drill: after N cycles the poll loop hangs (no more ticks, no more heartbeats), so the
    /// watchdog fires.
    #[arg(long, env = "WATCHKEEPER_DRILL_HANG_AFTER", value_name = "N")]
    pub drill_hang_after: Option<u64>,

    /// Drill: after N cycles the process aborts (SIGABRT), as a crash would.
    #[arg(long, env = "WATCHKEEPER_DRILL_CRASH_AFTER", value_name = "N")]
    pub drill_crash_after: Option<u64>,

    /// Drill: after N cycles the loop keeps running (and the watchdog pinged) but the heartbeat
    /// file is no longer written.
    #[arg(
        long,
        env = "WATCHKEEPER_DRILL_STALE_HEARTBEAT_AFTER",
        value_name = "N"
    )]
    pub drill_stale_heartbeat_after: Option<u64>,

    /// Drill: wait SECS before connecting, sending EXTEND_TIMEOUT_USEC= every second so that
    /// systemd keeps waiting.
    #[arg(
        long,
        env = "WATCHKEEPER_DRILL_SLOW_START",
        value_name = "SECS",
        value_parser = clap::value_parser!(u64).range(..=86_400)
    )]
    pub drill_slow_start: Option<u64>,
}

/// Why the worker could not start, or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The configuration file cannot be used.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The worker name is not usable.
    #[error("invalid worker name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The daemon's socket path does not fit in a Unix socket address: no retry can help.
    #[error(
        "socket path {} is {len} bytes long; a Unix socket path holds at most {MAX_SOCKET_PATH} bytes",
        path.display()
    )]
    SocketPathTooLong {
        /// The path given.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// The heartbeat file cannot be written.
    #[error(transparent)]
    Heartbeat(#[from] HeartbeatError),
    /// The heartbeat's directory does not take new files (read-only, no permission): found at
    /// start by creating and removing a probe file there.
    #[error("heartbeat directory {} is not writable", dir.display())]
    HeartbeatNotWritable {
        /// The directory.
        dir: PathBuf,
        /// Why the probe file could not be created or removed.
        #[source]
        source: std::io::Error,
    },
    /// `NOTIFY_SOCKET` names a transport this worker cannot use (`vsock:`): it could never send
    /// `READY=1`, and a `Type=notify` unit would only end in a start timeout.
    #[error(
        "NOTIFY_SOCKET={addr}: this address family is not supported; the service manager \
         would wait for READY=1 until its start timeout"
    )]
    NotifyUnsupported {
        /// The address.
        addr: watchkeeper::env::NotifyAddr,
    },
    /// The service manager at `NOTIFY_SOCKET` could not be told the worker's status.
    #[error("cannot notify the service manager")]
    Notify(#[source] watchkeeper::LifecycleError),
    /// Logging could not be set up (e.g. a bad `RUST_LOG`).
    #[error(transparent)]
    Logging(#[from] LoggingError),
    /// The service could not be set up (e.g. a malformed `WATCHDOG_USEC`) or did not stop
    /// within its bound.
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// The daemon refused the worker for good (its uid is not allowed, or the socket cannot be
    /// used): retrying, or restarting the worker, would not help.
    #[error("{message}")]
    Refused {
        /// What the daemon said, e.g. `refused by the daemon: uid 1001 is not allowed`.
        message: String,
    },
    /// The poll loop panicked.
    #[error("the poll loop failed: {0}")]
    PollLoop(String),
}

impl WorkerError {
    /// The process exit code for this error: [`EXIT_CONFIG`] for what an operator has to fix in
    /// the configuration or the unit (restarting will not help), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            WorkerError::Config(_)
            | WorkerError::InvalidName { .. }
            | WorkerError::SocketPathTooLong { .. }
            | WorkerError::Heartbeat(_)
            | WorkerError::HeartbeatNotWritable { .. }
            | WorkerError::NotifyUnsupported { .. }
            | WorkerError::Refused { .. }
            | WorkerError::Logging(LoggingError::InvalidFilter { .. })
            | WorkerError::Service(ServiceError::Env(_)) => EXIT_CONFIG,
            _ => 1,
        }
    }
}

/// Runs the worker until `SIGTERM`/`SIGINT`: connects to the daemon (`READY=1` once it
/// answers), claims and runs jobs, then stops gracefully.
///
/// Reads the environment once ([`SystemdEnv::from_env`]) and installs the global `tracing`
/// subscriber, unless one is already installed. Needs a tokio runtime with time, I/O and process
/// support enabled.
pub async fn run(opts: Options) -> Result<(), WorkerError> {
    let config = match &opts.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let mut settings = settings(&opts, config)?;

    let env = SystemdEnv::from_env();
    match logging::init(&LogConfig::from_rust_log(SERVICE_NAME), &env) {
        Ok(_) | Err(LoggingError::AlreadyInitialized { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let writer = opts
        .heartbeat
        .clone()
        .map(HeartbeatWriter::open)
        .transpose()?;
    if let Some(path) = &opts.heartbeat {
        probe_heartbeat_dir(path)?;
    }
    if let Ok(Some(addr @ watchkeeper::env::NotifyAddr::Vsock { .. })) = env.notify_socket() {
        return Err(WorkerError::NotifyUnsupported { addr });
    }

    let service = Service::builder(SERVICE_NAME)
        .env(env.clone())
        .stop_timeout(settings.config.grace() + STOP_MARGIN)
        .build()?;
    settings.max_sleep = service.watchdog().timeout().map(|t| t / 4);
    settings.credentials = watchkeeper::credentials::Credentials::from_env(&env);
    log_start(&settings, opts.heartbeat.as_deref());
    // The first message to the manager, at once: a NOTIFY_SOCKET nobody listens on is found now
    // (and ends the worker, as it ends the daemon), not after the daemon first answers.
    service
        .lifecycle()
        .status(&format!(
            "starting: connecting to the daemon at {}",
            settings.socket.display()
        ))
        .map_err(WorkerError::Notify)?;

    let supervision = poll::Supervision {
        lifecycle: service.lifecycle(),
        progress: service.register_loop("poll"),
        stop: service.shutdown_token().into(),
        heartbeat: heartbeat::WorkerHeartbeat::new(
            Heartbeat::new(SERVICE_NAME, &env),
            writer,
            opts.drill_stale_heartbeat_after,
        )?,
        controller: Some(service.controller()),
    };
    // Why the loop stopped the service itself, if it did.
    let (fatal_tx, mut fatal_rx) = tokio::sync::oneshot::channel();
    let poll_loop = service.spawn(async move {
        let fatal = poll::PollLoop::new(settings, supervision).run().await;
        let _ = fatal_tx.send(fatal);
    });
    service.run(watchkeeper::service::no_reload).await?;
    poll_loop
        .await
        .map_err(|e| WorkerError::PollLoop(e.to_string()))?;
    match fatal_rx.try_recv() {
        Ok(Some(message)) => Err(WorkerError::Refused { message }),
        _ => Ok(()),
    }
}

/// Creates and removes a probe file beside the heartbeat, so that a directory the worker cannot
/// write to stops it at start (exit 78) instead of failing every cycle.
fn probe_heartbeat_dir(heartbeat: &std::path::Path) -> Result<(), WorkerError> {
    let dir = match heartbeat.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let probe = dir.join(format!(".watchkeeper-worker-probe.{}", std::process::id()));
    let result = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe)
        .and_then(|_| std::fs::remove_file(&probe));
    result.map_err(|source| WorkerError::HeartbeatNotWritable { dir, source })
}

fn settings(opts: &Options, config: Config) -> Result<poll::Settings, WorkerError> {
    let len = opts.socket.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(WorkerError::SocketPathTooLong {
            path: opts.socket.clone(),
            len,
        });
    }
    let name = match &opts.name {
        Some(name) => {
            let invalid = |reason| WorkerError::InvalidName {
                name: name.clone(),
                reason,
            };
            if name.is_empty() {
                return Err(invalid("must not be empty"));
            }
            if name.len() > 128 {
                return Err(invalid("must be at most 128 bytes"));
            }
            if name.chars().any(char::is_control) {
                return Err(invalid("must not contain control characters"));
            }
            name.clone()
        }
        None => format!("worker-{}", std::process::id()),
    };
    let poll_interval = opts
        .poll_interval_ms
        .map_or_else(|| config.poll_interval(), Duration::from_millis);
    Ok(poll::Settings {
        socket: opts.socket.clone(),
        name,
        config,
        poll_interval,
        max_sleep: None,
        drills: poll::Drills {
            hang_after: opts.drill_hang_after,
            crash_after: opts.drill_crash_after,
            stale_heartbeat_after: opts.drill_stale_heartbeat_after,
            slow_start: opts.drill_slow_start.map(Duration::from_secs),
        },
        credentials: watchkeeper::credentials::Credentials::new(None),
    })
}

fn log_start(s: &poll::Settings, heartbeat: Option<&std::path::Path>) {
    tracing::info!(
        worker = %s.name,
        socket = %s.socket.display(),
        allowlist = ?s.config.allowlist,
        poll_interval = ?s.poll_interval,
        watchdog = ?s.max_sleep.map(|t| t * 4),
        grace = ?s.config.grace(),
        backoff_max = ?s.config.backoff_max(),
        credentials = ?s.config.credentials,
        heartbeat = ?heartbeat,
        "starting"
    );
    if s.config.allowlist.is_empty() {
        tracing::warn!("the allowlist is empty: every job will be denied");
    }
    let d = &s.drills;
    for (drill, value) in [
        ("hang-after", d.hang_after),
        ("crash-after", d.crash_after),
        ("stale-heartbeat-after", d.stale_heartbeat_after),
        ("slow-start", d.slow_start.map(|t| t.as_secs())),
    ] {
        if let Some(value) = value {
            tracing::warn!(drill, value, "fault drill enabled");
        }
    }
}

/// An error and its sources on one line, joined with `": "`, for log lines and the exit
/// message: a source whose text the message already ends with (many errors repeat their cause)
/// is said once, and line breaks inside messages become spaces.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !next.is_empty() && !text.ends_with(&next) && !text.contains(&format!("{next}: ")) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn parse(args: &[&str]) -> Result<Options, clap::Error> {
        Options::try_parse_from(std::iter::once("watchkeeper-worker").chain(args.iter().copied()))
    }

    #[test]
    fn options_parse_and_the_name_defaults_to_the_pid() {
        let opts = parse(&["--socket", "/run/wk.sock", "--poll-interval-ms", "20"]).unwrap();
        assert_eq!(opts.socket, PathBuf::from("/run/wk.sock"));
        assert_eq!(opts.drill_hang_after, None);
        let s = settings(&opts, Config::default()).unwrap();
        assert_eq!(s.name, format!("worker-{}", std::process::id()));
        assert_eq!(s.poll_interval, Duration::from_millis(20));
        assert_eq!(s.drills, poll::Drills::default());
        let s = settings(
            &parse(&["--socket", "s", "--name", "w1", "--drill-slow-start", "3"]).unwrap(),
            Config::default(),
        )
        .unwrap();
        assert_eq!(s.name, "w1");
        assert_eq!(s.poll_interval, Duration::from_millis(500));
        assert_eq!(s.drills.slow_start, Some(Duration::from_secs(3)));
    }

    #[test]
    fn bad_options_are_refused() {
        assert!(parse(&["--socket", "s", "--poll-interval-ms", "0"]).is_err());
        for (name, reason) in [
            ("", "empty"),
            ("a\nb", "control"),
            (&"x".repeat(129), "128"),
        ] {
            let e = settings(
                &parse(&["--socket", "s", "--name", name]).unwrap(),
                Config::default(),
            )
            .unwrap_err();
            assert!(e.to_string().contains(reason), "{e}");
            assert_eq!(e.exit_code(), EXIT_CONFIG);
        }
    }

    #[test]
    fn chain_is_one_line_and_says_each_cause_once() {
        let e = Config::parse("x = [", "w.toml").unwrap_err();
        let text = chain(&e);
        assert!(text.starts_with("config file w.toml:1:"), "{text}");
        assert!(!text.contains('\n'), "{text}");
        // An error that repeats its source in its own message.
        let e = watchkeeper_jobs::ClientError::Connect {
            path: "/nonexistent/daemon.sock".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let text = chain(&e);
        assert_eq!(text.matches("not found").count(), 1, "{text}");
        assert!(
            text.starts_with("cannot connect to /nonexistent/daemon.sock: "),
            "{text}"
        );
    }

    #[test]
    fn a_socket_path_longer_than_a_unix_address_is_a_configuration_error() {
        let long = format!("/{}", "s".repeat(MAX_SOCKET_PATH));
        let e = settings(&parse(&["--socket", &long]).unwrap(), Config::default()).unwrap_err();
        assert_eq!(e.exit_code(), EXIT_CONFIG);
        assert!(e.to_string().contains("108 bytes long"), "{e}");
        let fits = format!("/{}", "s".repeat(MAX_SOCKET_PATH - 1));
        assert!(settings(&parse(&["--socket", &fits]).unwrap(), Config::default()).is_ok());
    }
}
