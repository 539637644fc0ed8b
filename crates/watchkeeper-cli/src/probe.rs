//! `watchkeeper probe`: one check, one line, an exit code (for Kubernetes exec probes, Docker
//! `HEALTHCHECK`, s6 checks).

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use watchkeeper_jobs::{Client, ClientError, Stats};

use crate::cli::ProbeArgs;
use crate::{exit, hb};

/// What the daemon said on its socket.
#[derive(Debug, Clone)]
pub(crate) struct DaemonAnswer {
    pub(crate) version: String,
    pub(crate) stats: Stats,
}

/// Why the daemon could not be asked.
#[derive(Debug, Clone)]
pub(crate) enum AskError {
    /// This uid may not ask: the socket's permissions refuse it (`answered: false`, the
    /// daemon's state is unknown), or the daemon answered that the uid is not in its
    /// `allowed_uids` (`answered: true`).
    Denied { message: String, answered: bool },
    /// Anything else: no socket, no answer, a broken connection.
    Failed(String),
}

impl std::fmt::Display for AskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AskError::Denied { message, .. } | AskError::Failed(message) => f.write_str(message),
        }
    }
}

impl From<ClientError> for AskError {
    fn from(e: ClientError) -> AskError {
        let answered = matches!(e, ClientError::NotAllowed { .. });
        let denied = answered
            || matches!(&e, ClientError::Connect { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied);
        if denied {
            AskError::Denied {
                message: e.to_string(),
                answered,
            }
        } else {
            AskError::Failed(e.to_string())
        }
    }
}

/// Pings the daemon at `socket` and asks its job counts, within `timeout`.
pub(crate) fn ask(socket: &Path, timeout: Duration) -> Result<DaemonAnswer, AskError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| AskError::Failed(format!("cannot start a runtime: {e}")))?;
    rt.block_on(async {
        let ask = async {
            let mut c = Client::connect(socket).await?;
            let version = c.ping().await?;
            let stats = c.stats().await?;
            Ok(DaemonAnswer { version, stats })
        };
        match tokio::time::timeout(timeout, ask).await {
            Ok(r) => r,
            Err(_) => Err(AskError::Failed(format!(
                "{}: no answer within {timeout:?}",
                socket.display()
            ))),
        }
    })
}

/// [`ask`], with the reason as text.
pub(crate) fn ask_daemon(socket: &Path, timeout: Duration) -> Result<DaemonAnswer, String> {
    ask(socket, timeout).map_err(|e| e.to_string())
}

/// Runs the probe: `Ok(code)` with the line already printed.
pub(crate) fn run(args: &ProbeArgs) -> Result<u8> {
    if let Some(socket) = &args.socket {
        return Ok(match ask_daemon(socket, args.timeout) {
            Ok(a) => {
                println!(
                    "ok: {} answers (version {}, {} queued, {} claimed)",
                    socket.display(),
                    a.version,
                    a.stats.queued,
                    a.stats.claimed
                );
                exit::OK
            }
            Err(e) => {
                println!("unhealthy: {e}");
                exit::UNHEALTHY
            }
        });
    }
    let Some(path) = &args.heartbeat else {
        return Err(exit::coded(
            exit::USAGE,
            "probe: give --heartbeat or --socket",
        ));
    };
    let f = hb::read(path, args.max_age);
    let (code, line) = judge(&f, path, args);
    println!("{line}");
    Ok(code)
}

/// The probe's verdict on a heartbeat.
fn judge(f: &hb::Facts, path: &Path, args: &ProbeArgs) -> (u8, String) {
    let p = path.display();
    if let Some(e) = &f.error {
        return (exit::CANNOT_ASK, format!("unreadable: {e}"));
    }
    if !f.found {
        return (
            exit::UNHEALTHY,
            format!("unhealthy: {p}: no heartbeat file"),
        );
    }
    let age = f.age_secs.unwrap_or(0);
    if !f.fresh {
        return (
            exit::UNHEALTHY,
            format!(
                "unhealthy: {p}: stale heartbeat, {age}s old (max {}s)",
                args.max_age.as_secs()
            ),
        );
    }
    if f.pid == Some(0) {
        return (exit::UNHEALTHY, format!("unhealthy: {p}: pid 0"));
    }
    if let Some(want) = args.expect_pid
        && f.pid != Some(want)
    {
        return (
            exit::UNHEALTHY,
            format!(
                "unhealthy: {p}: written by pid {}, expected {want}",
                f.pid.unwrap_or(0)
            ),
        );
    }
    if f.health_status == "stalled" {
        return (
            exit::UNHEALTHY,
            format!("unhealthy: {p}: the service says stalled"),
        );
    }
    if args.ready && !f.says_ok() {
        return (
            exit::UNHEALTHY,
            format!("not ready: {p}: health_status {}", f.health_status),
        );
    }
    (
        exit::OK,
        format!(
            "ok: {p}: {age}s old, pid {}, {} cycles, health {}",
            f.pid.unwrap_or(0),
            f.cycle_count,
            f.health_status
        ),
    )
}
