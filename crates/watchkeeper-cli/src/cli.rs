//! The command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// The operator's tool for the watchkeeper daemon and workers.
///
/// Exit codes (an API): 0 healthy/success, 1 degraded, 2 unhealthy or probe failed, 3 could
/// not ask, 4 doctor findings, 5 operation failed, 6 refused, 64 usage.
#[derive(Debug, Parser)]
#[command(name = "watchkeeper", version, propagate_version = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Which service manager: `--user` (the default unless run as root) or `--system`.
#[derive(Debug, Clone, Copy, Args)]
pub(crate) struct ManagerArgs {
    /// The calling user's service manager (`systemctl --user`).
    #[arg(long, conflicts_with = "system")]
    pub(crate) user: bool,
    /// The system's service manager (default when run as root).
    #[arg(long)]
    pub(crate) system: bool,
}

impl ManagerArgs {
    /// `true` for the user manager.
    pub(crate) fn is_user(self) -> bool {
        if self.user {
            return true;
        }
        if self.system {
            return false;
        }
        !rustix::process::geteuid().is_root()
    }
}

/// Where the facts come from, shared by `status`, `metrics` and `doctor`.
#[derive(Debug, Clone, Args)]
pub(crate) struct FactArgs {
    #[command(flatten)]
    pub(crate) manager: ManagerArgs,
    /// A heartbeat older than this is stale.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub(crate) max_age: Duration,
    /// The workers' heartbeat directory [default: the worker unit's StateDirectory=].
    #[arg(long)]
    pub(crate) heartbeat_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Health of the daemon, its socket, the worker and every worker@ instance.
    ///
    /// Exit code: 0 healthy, 1 degraded, 2 unhealthy, 3 could not ask the service manager (or
    /// could not read some facts, the rest healthy).
    Status(StatusArgs),
    /// One check for a liveness/readiness probe: a heartbeat file, or the daemon's socket.
    ///
    /// Exit code: 0 when fresh and sane (or the daemon answers), 2 with a one-line reason
    /// otherwise, 3 when the file cannot be read.
    Probe(ProbeArgs),
    /// The facts of `status` in the Prometheus text format.
    Metrics(MetricsArgs),
    /// Installs the shipped units, configurations and binaries.
    Install(InstallArgs),
    /// Stops, disables and removes what `install` wrote.
    Uninstall(UninstallArgs),
    /// Switches back to the previously installed binaries and restarts the units.
    Rollback(RollbackArgs),
    /// Triage of the usual failures, one line per finding with the command that fixes it.
    ///
    /// Exit code: 0 no findings, 4 findings, 3 could not ask the service manager.
    Doctor(DoctorArgs),
    /// A consistent snapshot of the daemon's job store (SQLite online backup), verified.
    Backup(BackupArgs),
    /// Replaces the daemon's job store with a verified backup (the daemon must be stopped).
    Restore(RestoreArgs),
    /// Shell completions on stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    pub(crate) facts: FactArgs,
    /// JSON (schema version 1, see the README) instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Redraw every --interval (in place on a terminal, appended frames otherwise).
    #[arg(long)]
    pub(crate) watch: bool,
    /// Time between frames of --watch.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub(crate) interval: Duration,
    /// Stop --watch after this many frames [default: until interrupted].
    #[arg(long)]
    pub(crate) frames: Option<u64>,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["heartbeat", "socket"])))]
pub(crate) struct ProbeArgs {
    /// A worker's heartbeat file.
    #[arg(long)]
    pub(crate) heartbeat: Option<PathBuf>,
    /// The daemon's socket: it must answer a ping.
    #[arg(long)]
    pub(crate) socket: Option<PathBuf>,
    /// A heartbeat older than this fails the probe.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub(crate) max_age: Duration,
    /// The heartbeat must have been written by this pid.
    #[arg(long, requires = "heartbeat")]
    pub(crate) expect_pid: Option<u32>,
    /// Readiness: the heartbeat must also say `ok` (not starting, degraded, stalled, stopping).
    #[arg(long, requires = "heartbeat")]
    pub(crate) ready: bool,
    /// How long to wait for the daemon's answer.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub(crate) timeout: Duration,
}

#[derive(Debug, Args)]
pub(crate) struct MetricsArgs {
    #[command(flatten)]
    pub(crate) facts: FactArgs,
    /// Write DIR/watchkeeper.prom atomically (node_exporter's textfile collector) instead of
    /// printing.
    #[arg(long, value_name = "DIR")]
    pub(crate) textfile: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct InstallArgs {
    #[command(flatten)]
    pub(crate) manager: ManagerArgs,
    /// Enable the units (socket, daemon, worker).
    #[arg(long)]
    pub(crate) enable: bool,
    /// Start them now (implies nothing about --enable).
    #[arg(long)]
    pub(crate) now: bool,
    /// Let the user's manager run without a login session (`loginctl enable-linger`).
    #[arg(long)]
    pub(crate) linger: bool,
    /// Where the binaries to install are [default: the directory of this program].
    #[arg(long, value_name = "DIR")]
    pub(crate) bin_dir: Option<PathBuf>,
    /// Overwrite units that were changed locally.
    #[arg(long)]
    pub(crate) force: bool,
}

#[derive(Debug, Args)]
pub(crate) struct UninstallArgs {
    #[command(flatten)]
    pub(crate) manager: ManagerArgs,
    /// Also remove the state (job store, heartbeats), configurations and environment files.
    #[arg(long)]
    pub(crate) purge: bool,
}

#[derive(Debug, Args)]
pub(crate) struct RollbackArgs {
    #[command(flatten)]
    pub(crate) manager: ManagerArgs,
}

#[derive(Debug, Args)]
pub(crate) struct DoctorArgs {
    #[command(flatten)]
    pub(crate) facts: FactArgs,
    /// The worker's credential directory to check (files 0600, directory 0700), besides the
    /// files the worker units load with `LoadCredential=` for the credentials `worker.toml`
    /// hands to jobs [default: the config directory's `credentials/`].
    #[arg(long)]
    pub(crate) credentials_dir: Option<PathBuf>,
    /// More credentials the workers need (each must exist in the credential directory).
    #[arg(long = "credential", value_name = "NAME")]
    pub(crate) credentials: Vec<String>,
}

#[derive(Debug, Args)]
pub(crate) struct BackupArgs {
    #[command(flatten)]
    pub(crate) manager: ManagerArgs,
    /// The daemon's state directory [default: its StateDirectory=].
    #[arg(long)]
    pub(crate) state_dir: Option<PathBuf>,
    /// The snapshot file [default: STATE_DIR/backups/jobs-UNIXTIME.sqlite3].
    #[arg(long)]
    pub(crate) to: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct RestoreArgs {
    #[command(flatten)]
    pub(crate) manager: ManagerArgs,
    /// The backup to restore.
    pub(crate) file: PathBuf,
    /// The daemon's state directory [default: its StateDirectory=].
    #[arg(long)]
    pub(crate) state_dir: Option<PathBuf>,
    /// Start the socket and the daemon afterwards.
    #[arg(long)]
    pub(crate) start: bool,
}

/// `120s`, `2m`, `500ms`, or plain seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration (e.g. 120s): {e}"))
}
