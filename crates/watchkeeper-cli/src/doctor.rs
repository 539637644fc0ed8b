//! `watchkeeper doctor`: the runbook's triage. Each finding is one line, `PROBLEM: fix: COMMAND`.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use crate::cli::DoctorArgs;
use crate::exit;
use crate::layout::{self, Layout};
use crate::probe::ask_daemon;
use crate::systemd::{Manager, Props};

const PROPS: &[&str] = &[
    "Id",
    "LoadState",
    "ActiveState",
    "SubState",
    "Result",
    "NeedDaemonReload",
    "Listen",
    "StateChangeTimestampMonotonic",
];

/// How long a worker may be `activating` before it counts as stuck.
const STUCK_AFTER: Duration = Duration::from_secs(5);

/// One finding: what is wrong and the command that fixes it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Finding {
    pub(crate) problem: String,
    pub(crate) fix: String,
}

fn finding(problem: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        problem: problem.into(),
        fix: fix.into(),
    }
}

fn monotonic_us() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64) * 1_000_000 + (t.tv_nsec as u64) / 1000
}

fn get<'a>(p: &'a Props, k: &str) -> &'a str {
    p.get(k).map_or("", String::as_str)
}

/// `watchkeeper doctor`.
pub(crate) fn run(args: &DoctorArgs) -> Result<u8> {
    let m = Manager {
        user: args.facts.manager.is_user(),
    };
    m.reachable()?;
    let l = Layout::new(m.user);
    let findings = check(args, m, &l)?;
    for f in &findings {
        println!("{}: fix: {}", f.problem, f.fix);
    }
    if findings.is_empty() {
        println!("no findings");
        Ok(exit::OK)
    } else {
        Ok(exit::FINDINGS)
    }
}

fn check(args: &DoctorArgs, m: Manager, l: &Layout) -> Result<Vec<Finding>> {
    let mut out = Vec::new();
    let install = if m.user {
        "watchkeeper install --user"
    } else {
        "watchkeeper install --system"
    };
    let mut units = vec![
        layout::SOCKET.to_owned(),
        layout::DAEMON.to_owned(),
        layout::WORKER.to_owned(),
    ];
    units.extend(m.list_units(layout::WORKER_INSTANCES)?);
    let props = m.show(&units, PROPS)?;
    let now = monotonic_us();

    for (unit, p) in units.iter().zip(&props) {
        let load = get(p, "LoadState");
        match load {
            "loaded" => {}
            "masked" => {
                out.push(finding(
                    format!("{unit} is masked"),
                    m.cmd_line(&format!("unmask {unit}")),
                ));
                continue;
            }
            _ => {
                out.push(finding(
                    format!("{unit} not found ({load})"),
                    format!(
                        "{install} (or, if the unit file is there, {})",
                        m.cmd_line("daemon-reload")
                    ),
                ));
                continue;
            }
        }
        if get(p, "NeedDaemonReload") == "yes" {
            out.push(finding(
                format!("{unit}: its unit file changed on disk since it was loaded"),
                m.cmd_line("daemon-reload"),
            ));
        }
        let result = get(p, "Result");
        if result == "start-limit-hit" || result == "service-start-limit-hit" {
            let extra = if unit == layout::SOCKET {
                format!(" {}", layout::DAEMON)
            } else {
                String::new()
            };
            out.push(finding(
                format!("{unit} hit its start limit ({result})"),
                format!(
                    "{} && {}",
                    m.cmd_line(&format!("reset-failed {unit}{extra}")),
                    m.cmd_line(&format!("start {unit}"))
                ),
            ));
        } else if get(p, "ActiveState") == "failed" {
            out.push(finding(
                format!("{unit} failed ({result})"),
                format!(
                    "journalctl {}-u {unit}, then {}",
                    if m.user { "--user " } else { "" },
                    m.cmd_line(&format!("reset-failed {unit}"))
                ),
            ));
        }
    }

    // The socket: listening, its file there, and the daemon answers us.
    let sock_props = &props[0];
    let sock_path = sock_props
        .get("Listen")
        .and_then(|l| l.rsplit_once(" (").map(|(a, _)| a.to_owned()))
        .filter(|p| !p.is_empty());
    let mut answers = None;
    if let Some(path) = &sock_path {
        let path = PathBuf::from(path);
        let active = get(sock_props, "ActiveState") == "active";
        if active && !path.exists() {
            out.push(finding(
                format!(
                    "{}: the socket file {} is missing",
                    layout::SOCKET,
                    path.display()
                ),
                m.cmd_line(&format!("restart {}", layout::SOCKET)),
            ));
        } else if active && get(&props[1], "ActiveState") == "active" {
            match ask_daemon(&path, Duration::from_secs(3)) {
                Ok(_) => answers = Some(true),
                Err(e) => {
                    answers = Some(false);
                    let uid = rustix::process::getuid().as_raw();
                    if e.contains("not allowed") || e.contains("ermission denied") {
                        let cfg = l.config_dir().join("daemon.toml");
                        out.push(finding(
                            format!(
                                "the daemon's socket {} refuses uid {uid}: {e}",
                                path.display()
                            ),
                            format!(
                                "add {uid} to allowed_uids in {}, then {}",
                                cfg.display(),
                                m.cmd_line(&format!("reload {}", layout::DAEMON))
                            ),
                        ));
                    } else {
                        out.push(finding(
                            format!("the daemon does not answer on {}: {e}", path.display()),
                            format!(
                                "journalctl {}-u {}, then {}",
                                if m.user { "--user " } else { "" },
                                layout::DAEMON,
                                m.cmd_line(&format!("restart {}", layout::DAEMON))
                            ),
                        ));
                    }
                }
            }
        }
    }

    // Workers stuck activating: the broker is unreachable.
    for (unit, p) in units.iter().zip(&props).skip(2) {
        let since = get(p, "StateChangeTimestampMonotonic")
            .parse::<u64>()
            .unwrap_or(0);
        let stuck = get(p, "ActiveState") == "activating"
            && since > 0
            && Duration::from_micros(now.saturating_sub(since)) > STUCK_AFTER;
        if !stuck {
            continue;
        }
        let reachable = match (&sock_path, answers) {
            (_, Some(a)) => a,
            (Some(path), None) => ask_daemon(Path::new(path), Duration::from_secs(3)).is_ok(),
            (None, None) => false,
        };
        if !reachable {
            out.push(finding(
                format!(
                    "{unit} is stuck activating: the broker ({}) is unreachable",
                    sock_path.as_deref().unwrap_or("no socket")
                ),
                m.cmd_line(&format!("start {} {}", layout::SOCKET, layout::DAEMON)),
            ));
        } else {
            out.push(finding(
                format!("{unit} is stuck activating although the broker answers"),
                format!(
                    "journalctl {}-u {unit}",
                    if m.user { "--user " } else { "" }
                ),
            ));
        }
    }

    // Credentials.
    let cred_dir = args
        .credentials_dir
        .clone()
        .unwrap_or_else(|| l.config_dir().join("credentials"));
    check_credentials(&cred_dir, &args.credentials, &mut out);

    // The heartbeat directory.
    let hb_dir = args
        .facts
        .heartbeat_dir
        .clone()
        .unwrap_or_else(|| l.worker_state_dir());
    if hb_dir.exists() {
        let writable = hb_dir.is_dir()
            && rustix::fs::access(
                &hb_dir,
                rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
            )
            .is_ok();
        if !writable {
            out.push(finding(
                format!(
                    "the heartbeat directory {} is not writable",
                    hb_dir.display()
                ),
                format!("chmod 0700 {}", hb_dir.display()),
            ));
        }
    }

    // Linger, for a user installation.
    if m.user {
        let user = std::env::var("USER").unwrap_or_default();
        if !user.is_empty() && !Path::new("/var/lib/systemd/linger").join(&user).exists() {
            out.push(finding(
                format!("linger is off for {user}: the units stop when the last session ends"),
                format!("loginctl enable-linger {user}"),
            ));
        }
    }

    // Configurations.
    let daemon_cfg = l.config_dir().join("daemon.toml");
    if daemon_cfg.exists()
        && let Err(e) = watchkeeper_daemon::config::Config::load(&daemon_cfg)
    {
        out.push(finding(
            format!("{} does not parse: {}", daemon_cfg.display(), one_line(&e)),
            format!(
                "edit {}, then {}",
                daemon_cfg.display(),
                m.cmd_line(&format!("reload {}", layout::DAEMON))
            ),
        ));
    }
    let worker_cfg = l.config_dir().join("worker.toml");
    if worker_cfg.exists()
        && let Err(e) = watchkeeper_worker::config::Config::load(&worker_cfg)
    {
        out.push(finding(
            format!("{} does not parse: {}", worker_cfg.display(), one_line(&e)),
            format!("edit {}, then restart the workers", worker_cfg.display()),
        ));
    }
    Ok(out)
}

/// An error and its sources, on one line.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The credential directory (when there, or when credentials are required) must be 0700 and
/// its files 0600, owned by us; required names must exist.
fn check_credentials(dir: &Path, required: &[String], out: &mut Vec<Finding>) {
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(_) => {
            for name in required {
                out.push(finding(
                    format!("credential {name} is missing: no {}", dir.display()),
                    format!(
                        "install -d -m 0700 {d} && install -m 0600 /dev/stdin {d}/{name} (paste the secret, then Ctrl-D)",
                        d = dir.display()
                    ),
                ));
            }
            return;
        }
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode != 0o700 {
        out.push(finding(
            format!(
                "the credential directory {} has mode {mode:04o}, not 0700",
                dir.display()
            ),
            format!("chmod 0700 {}", dir.display()),
        ));
    }
    let uid = rustix::process::geteuid().as_raw();
    if meta.uid() != uid {
        out.push(finding(
            format!(
                "the credential directory {} is owned by uid {}, not {uid}",
                dir.display(),
                meta.uid()
            ),
            format!("chown {uid} {}", dir.display()),
        ));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut names: Vec<_> = entries.flatten().collect();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let p = e.path();
            let Ok(m) = std::fs::metadata(&p) else {
                continue;
            };
            if !m.is_file() {
                continue;
            }
            let mode = m.permissions().mode() & 0o777;
            if mode != 0o600 {
                out.push(finding(
                    format!(
                        "the credential {} has mode {mode:04o}, not 0600",
                        p.display()
                    ),
                    format!("chmod 0600 {}", p.display()),
                ));
            }
        }
    }
    for name in required {
        let p = dir.join(name);
        if !p.is_file() {
            out.push(finding(
                format!("credential {name} is missing: no {}", p.display()),
                format!(
                    "install -m 0600 /dev/stdin {} (paste the secret, then Ctrl-D)",
                    p.display()
                ),
            ));
        }
    }
}
