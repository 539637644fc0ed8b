//! The watchkeeper reference daemon: a durable job broker on a Unix socket, supervised through
//! the `watchkeeper` library.
//!
//! Clients speak the newline-delimited JSON protocol of [`watchkeeper_jobs`] (see
//! `PROTOCOL.md`): producers `submit` jobs, workers `claim` them under a lease and report the
//! outcome. Jobs live in SQLite ([`store`]), and every change is committed before it is
//! acknowledged, so an acknowledged job survives `kill -9`.
//!
//! How the daemon uses the library, as a service author would:
//!
//! * [`SystemdEnv::from_env`](watchkeeper::SystemdEnv::from_env) once, the socket-activation
//!   fds taken first thing, [`logging::init`](watchkeeper::logging::init), then a
//!   [`Service`](watchkeeper::Service);
//! * `READY=1` only once the socket is bound (or taken) and the store is open and recovered
//!   (expired leases swept), with the queue counts in `STATUS=`, refreshed as they change;
//! * the watchdog is gated on two loops: `accept` (ticks at least every 250 ms, even when idle)
//!   and `store` (ticks only when a maintenance query on the database returned), so a wedged
//!   database stops the pings;
//! * `SIGHUP` re-reads `--config`; a bad file fails the reload, which the library reports in
//!   `STATUS=`, and the old configuration stays;
//! * `SIGTERM` stops accepting; each connection finishes the request it is in; exit 0;
//! * requests that arrive together are committed together ([`store::SharedStore`], group
//!   commit), each answered once its batch is on disk; a failing store is answered
//!   `unavailable` and shown in `STATUS=`;
//! * idle or slow connections cannot lock out new ones (the one idle the longest is closed at
//!   the cap; [`server`]);
//! * socket-activated with a broken configuration, the daemon stays up answering every
//!   connection with the error instead of exiting into a restart loop (`PROTOCOL.md`).
//!
//! [`run`] is the whole daemon; `main` only parses [`Options`] and maps the error to an exit
//! code ([`DaemonError::exit_code`]).
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

use std::ffi::OsString;
use std::path::PathBuf;

pub mod config;
mod daemon;
pub mod listener;
pub mod server;
pub mod store;

pub use daemon::{NAME, run, status_line};

/// The socket's file name inside `$RUNTIME_DIRECTORY`.
pub const SOCKET_NAME: &str = "daemon.sock";

/// Command-line options; each can also come from the environment variable shown.
#[derive(Debug, Clone, PartialEq, Eq, clap::Parser)]
#[command(name = "watchkeeper-daemon", version, about)]
pub struct Options {
    /// Socket to listen on when not socket-activated [default: $RUNTIME_DIRECTORY/daemon.sock]
    #[arg(long, value_name = "PATH", env = "WATCHKEEPER_SOCKET")]
    pub socket: Option<PathBuf>,

    /// Directory of the job store (jobs.sqlite3), created 0700 if missing
    /// [default: $STATE_DIRECTORY]
    #[arg(long, value_name = "PATH", env = "WATCHKEEPER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// TOML configuration, re-read on SIGHUP (lease_secs, max_attempts, allowed_uids,
    /// status_interval_secs)
    #[arg(long, value_name = "PATH", env = "WATCHKEEPER_CONFIG")]
    pub config: Option<PathBuf>,

    /// Give the socket this group (name or gid) and mode 0660, instead of mode 0600
    #[arg(long, value_name = "NAME", env = "WATCHKEEPER_SOCKET_GROUP")]
    pub socket_group: Option<String>,

    /// A uid allowed to connect besides root and the daemon's own (repeatable; the
    /// configuration's allowed_uids are added)
    #[arg(
        long = "allow-uid",
        value_name = "UID",
        env = "WATCHKEEPER_ALLOW_UIDS",
        value_delimiter = ',',
        value_parser = parse_allowed_uid
    )]
    pub allow_uids: Vec<u32>,

    /// Set by systemd for RuntimeDirectory= (the first of its colon-separated paths is used)
    #[arg(long, hide = true, env = "RUNTIME_DIRECTORY")]
    pub runtime_directory: Option<OsString>,

    /// Set by systemd for StateDirectory= (the first of its colon-separated paths is used)
    #[arg(long, hide = true, env = "STATE_DIRECTORY")]
    pub state_directory: Option<OsString>,
}

/// An `--allow-uid` value: any uid but [`config::NOBODY_UID`].
fn parse_allowed_uid(s: &str) -> Result<u32, String> {
    let uid: u32 = s.trim().parse().map_err(|e| format!("{e}"))?;
    if uid == config::NOBODY_UID {
        return Err(config::NOBODY_PROBLEM.to_owned());
    }
    Ok(uid)
}

/// The first path of a colon-separated list as systemd sets `RUNTIME_DIRECTORY` and
/// `STATE_DIRECTORY` (several directories are joined with `:`).
fn first_dir(list: &OsString) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt as _;
    let bytes = list.as_bytes();
    let first = bytes.split(|&b| b == b':').next().unwrap_or(bytes);
    (!first.is_empty()).then(|| PathBuf::from(std::ffi::OsStr::from_bytes(first)))
}

impl Options {
    /// The socket path: `--socket`, else `$RUNTIME_DIRECTORY/daemon.sock`.
    pub fn socket_path(&self) -> Result<PathBuf, DaemonError> {
        if let Some(path) = &self.socket {
            return Ok(path.clone());
        }
        self.runtime_directory
            .as_ref()
            .and_then(first_dir)
            .map(|dir| dir.join(SOCKET_NAME))
            .ok_or(DaemonError::NoSocketPath)
    }

    /// The state directory: `--state-dir`, else `$STATE_DIRECTORY`.
    pub fn state_dir(&self) -> Result<PathBuf, DaemonError> {
        if let Some(path) = &self.state_dir {
            return Ok(path.clone());
        }
        self.state_directory
            .as_ref()
            .and_then(first_dir)
            .ok_or(DaemonError::NoStateDir)
    }
}

/// Why the daemon could not start or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// Neither `--socket` nor `$RUNTIME_DIRECTORY`, and not socket-activated.
    #[error(
        "no socket path: pass --socket (or WATCHKEEPER_SOCKET), or set RUNTIME_DIRECTORY (RuntimeDirectory= in the unit), or use socket activation"
    )]
    NoSocketPath,
    /// Neither `--state-dir` nor `$STATE_DIRECTORY`.
    #[error(
        "no state directory: pass --state-dir (or WATCHKEEPER_STATE_DIR), or set STATE_DIRECTORY (StateDirectory= in the unit)"
    )]
    NoStateDir,
    /// The socket-activation variables or fds are unusable.
    #[error("cannot take the socket-activation fds")]
    Activation(#[source] watchkeeper::activation::ActivationError),
    /// Logging could not be set up.
    #[error("cannot set up logging")]
    Logging(#[source] watchkeeper::logging::LoggingError),
    /// The service could not be set up, or its stop timed out.
    #[error("service lifecycle")]
    Service(#[source] watchkeeper::ServiceError),
    /// `READY=1` could not be sent.
    #[error("cannot tell the manager the daemon is ready")]
    Ready(#[source] watchkeeper::LifecycleError),
    /// The configuration file is unusable.
    #[error("configuration")]
    Config(#[source] config::ConfigError),
    /// The socket could not be set up.
    #[error("listening socket")]
    Listener(#[source] listener::ListenerError),
    /// The store could not be opened or recovered.
    #[error("job store")]
    Store(#[source] store::StoreError),
}

impl DaemonError {
    /// The process exit code for this error, after the LSB conventions systemd shows
    /// (`status=2/INVALIDARGUMENT`, `status=6/NOTCONFIGURED`): 2 for missing or bad
    /// arguments, 6 for an unusable configuration file, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::NoSocketPath | DaemonError::NoStateDir => 2,
            DaemonError::Listener(
                listener::ListenerError::UnknownGroup { .. }
                | listener::ListenerError::GroupLookup { .. },
            ) => 2,
            DaemonError::Config(_) => 6,
            _ => 1,
        }
    }
}

/// Fds kept free for the store, the notify socket, logs and the like, below the soft
/// `RLIMIT_NOFILE`, when the connection cap is derived from it.
pub const RESERVED_FDS: u64 = 64;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (a daemon holding many connections needs
/// more than the usual 1024) and returns the soft limit now in force, `(before, after)`.
pub fn raise_nofile_limit() -> (u64, u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current.unwrap_or(u64::MAX);
    if limit.current == limit.maximum {
        return (before, before);
    }
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => (before, limit.maximum.unwrap_or(u64::MAX)),
        Err(e) => {
            tracing::warn!(error = %e, soft = before, "cannot raise RLIMIT_NOFILE to its hard limit");
            (before, before)
        }
    }
}

/// The connection cap for a soft `RLIMIT_NOFILE` of `nofile`: [`server::MAX_CONNECTIONS`], or
/// fewer if the fds would run out first (each connection is one fd; [`RESERVED_FDS`] stay
/// free).
pub fn connection_cap(nofile: u64) -> usize {
    let room = usize::try_from(nofile.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
    server::MAX_CONNECTIONS.min(room).max(1)
}

/// `error` and its sources on one line, joined with `: ` (for responses, `STATUS=` and
/// logs). Newlines inside messages become spaces.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        // Some errors repeat their source in their own message; say it once.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn parse(args: &[&str]) -> Options {
        Options::try_parse_from(std::iter::once("watchkeeper-daemon").chain(args.iter().copied()))
            .unwrap()
    }

    #[test]
    fn paths_come_from_options_or_systemd_directories() {
        let o = parse(&[
            "--runtime-directory",
            "/run/wk:/run/other",
            "--state-directory",
            "/var/lib/wk",
        ]);
        assert_eq!(
            o.socket_path().unwrap(),
            PathBuf::from("/run/wk/daemon.sock")
        );
        assert_eq!(o.state_dir().unwrap(), PathBuf::from("/var/lib/wk"));
        let o = parse(&[
            "--socket",
            "/tmp/s",
            "--state-dir",
            "/tmp/d",
            "--allow-uid",
            "7",
            "--allow-uid",
            "8",
            "--runtime-directory",
            "/run/wk",
        ]);
        assert_eq!(o.socket_path().unwrap(), PathBuf::from("/tmp/s"));
        assert_eq!(o.state_dir().unwrap(), PathBuf::from("/tmp/d"));
        assert_eq!(o.allow_uids, vec![7, 8]);
        let e = Options::try_parse_from(["watchkeeper-daemon", "--allow-uid", "7,65534"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("uid 65534 is nobody"), "{e}");
    }

    #[test]
    fn missing_paths_name_the_option_and_the_variable() {
        let o = Options {
            socket: None,
            state_dir: None,
            config: None,
            socket_group: None,
            allow_uids: vec![],
            runtime_directory: None,
            state_directory: Some(OsString::new()),
        };
        let e = o.state_dir().unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let msg = e.to_string();
        assert!(
            msg.contains("--state-dir") && msg.contains("STATE_DIRECTORY"),
            "{msg}"
        );
        let msg = o.socket_path().unwrap_err().to_string();
        assert!(
            msg.contains("--socket") && msg.contains("RUNTIME_DIRECTORY"),
            "{msg}"
        );
    }

    #[test]
    fn error_chain_is_one_line_without_repeats() {
        let e = config::Config::load(std::path::Path::new("/nonexistent/c.toml")).unwrap_err();
        let line = error_chain(&DaemonError::Config(e));
        assert_eq!(
            line,
            "configuration: cannot read the configuration /nonexistent/c.toml: No such file or directory (os error 2)"
        );
    }
}
