//! `watchkeeper doctor`: the runbook's triage. Each finding is one line, `PROBLEM: fix: COMMAND`.

use std::collections::{BTreeMap, BTreeSet};
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
    "User",
];

/// Where systemd mounts the units' credentials in their mount namespace.
const RUN_CREDENTIALS: &str = "/run/credentials";

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

    // Credentials: the credential directory, the names asked for with --credential, and the
    // files the worker units load with LoadCredential=.
    let cred_dir = args
        .credentials_dir
        .clone()
        .unwrap_or_else(|| l.config_dir().join("credentials"));
    let mut creds = Credentials::default();
    creds.scan_dir(&cred_dir);
    for name in &args.credentials {
        creds.require(cred_dir.join(name), name, None);
    }
    let workers: Vec<&str> = units
        .iter()
        .zip(&props)
        .skip(2)
        .filter(|(_, p)| get(p, "LoadState") == "loaded")
        .map(|(u, _)| u.as_str())
        .collect();
    // The credentials the workers hand to jobs (worker.toml's `credentials`): a unit's
    // credential file only matters for those, the rest are optional (the SetCredential=
    // placeholder stands in). `None` when worker.toml does not parse (a finding of its own):
    // then every file counts.
    let worker_cfg = l.config_dir().join("worker.toml");
    let worker_config = worker_cfg
        .exists()
        .then(|| watchkeeper_worker::config::Config::load(&worker_cfg));
    let wanted: Option<Vec<String>> = match &worker_config {
        None => Some(Vec::new()),
        Some(r) => r.as_ref().ok().map(|c| c.credentials.clone()),
    };
    let counts = |name: &str| wanted.as_ref().is_none_or(|w| w.iter().any(|n| n == name));
    // Units whose credentials are known (from the bus), or else whose unit files set
    // LoadCredential= at all.
    let with_creds: Vec<String> = match units_load_credentials(m, &workers) {
        Ok(loaded) => {
            let mut with: Vec<String> = loaded.iter().map(|(u, _, _)| u.clone()).collect();
            with.dedup();
            if let Some(w) = &wanted
                && !workers.is_empty()
            {
                for name in w
                    .iter()
                    .filter(|n| !loaded.iter().any(|(_, id, _)| id == *n))
                {
                    out.push(finding(
                        format!(
                            "{} lists credential {name}, but no worker unit loads it: jobs \
                             asking for it are denied",
                            worker_cfg.display()
                        ),
                        format!(
                            "add LoadCredential={name}:PATH to the worker units: {}",
                            m.cmd_line(&format!("edit {}", workers[0]))
                        ),
                    ));
                }
            }
            for (unit, name, path) in loaded {
                // A relative PATH names a credential of the manager itself (systemd.exec(5)):
                // nothing on disk here to check, so it is left out.
                let path = PathBuf::from(path);
                if path.is_absolute() && counts(&name) {
                    creds.require(path, &name, Some(&unit));
                }
            }
            with
        }
        Err(e) => {
            // Without the bus, only whether the unit files set LoadCredential= at all.
            let declared: Vec<String> = workers
                .iter()
                .filter(|u| {
                    m.run_ok(&["cat", "--no-pager", u])
                        .map_or(true, |text| declares_load_credential(&text))
                })
                .map(|u| (*u).to_owned())
                .collect();
            let matters = wanted.as_ref().is_none_or(|w| !w.is_empty());
            if !declared.is_empty() && matters {
                out.push(finding(
                    format!(
                        "cannot read LoadCredential= of {}: {e}",
                        declared.join(", ")
                    ),
                    format!(
                        "{}, or check the LoadCredential= files of `{}` by hand",
                        if m.user {
                            "install the user bus (dbus-user-session) and log in again"
                        } else {
                            "start the system bus (systemctl start dbus.service)"
                        },
                        m.cmd_line(&format!("cat {}", declared[0]))
                    ),
                ));
            }
            declared
        }
    };
    // systemd 252 mounts a unit's credentials below /run/credentials when the unit has a mount
    // namespace (the workers' hardening does): a user manager cannot create that directory,
    // and where it is missing the unit fails to start with 226/NAMESPACE. PID 1 creates it
    // whenever it starts (mount_setup()): only a machine whose PID 1 is not systemd lacks it.
    if m.user && !with_creds.is_empty() && !Path::new(RUN_CREDENTIALS).is_dir() {
        out.push(finding(
            format!(
                "{} load credentials but {RUN_CREDENTIALS} is missing: the user manager \
                 then fails their start with 226/NAMESPACE",
                with_creds.join(", ")
            ),
            format!(
                "sudo install -d -m 0755 {RUN_CREDENTIALS} (at every boot: echo \
                 'd {RUN_CREDENTIALS} 0755 root root -' | sudo tee \
                 /etc/tmpfiles.d/watchkeeper-credentials.conf)"
            ),
        ));
    }
    // The manager reads the files: the user for a user install, root for a system install.
    let owner = if m.user {
        rustix::process::geteuid().as_raw()
    } else {
        0
    };
    let as_whom = if m.user {
        "run doctor as the user whose manager runs the units"
    } else {
        "sudo watchkeeper doctor --system"
    };
    creds.check(owner, as_whom, &mut out);

    // The heartbeat directory.
    let hb_dir = args
        .facts
        .heartbeat_dir
        .clone()
        .unwrap_or_else(|| l.worker_state_dir());
    check_heartbeat_dir(m, &props, &hb_dir, &mut out);

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
            format!(
                "{} does not parse: {}",
                daemon_cfg.display(),
                exit::one_line(&e)
            ),
            format!(
                "edit {}, then {}",
                daemon_cfg.display(),
                m.cmd_line(&format!("reload {}", layout::DAEMON))
            ),
        ));
    }
    if let Some(Err(e)) = &worker_config {
        out.push(finding(
            format!(
                "{} does not parse: {}",
                worker_cfg.display(),
                exit::one_line(e)
            ),
            format!("edit {}, then restart the workers", worker_cfg.display()),
        ));
    }
    Ok(out)
}

/// The heartbeat directory, when there, must be writable by whoever the workers run as. A
/// system install's workers write as their `User=`: judged by owner and mode, so that neither
/// root (who may write anywhere) nor an operator (who may not) is the measure. A user install's
/// workers are the caller: its own access.
fn check_heartbeat_dir(m: Manager, props: &[Props], hb_dir: &Path, out: &mut Vec<Finding>) {
    if !hb_dir.exists() {
        return;
    }
    let user = if m.user {
        None
    } else {
        props
            .iter()
            .skip(2)
            .map(|p| get(p, "User"))
            .find(|u| !u.is_empty())
    };
    let uid = match user {
        None => None,
        Some(name) => match name.parse::<u32>() {
            Ok(uid) => Some(uid),
            Err(_) => match nix::unistd::User::from_name(name) {
                Ok(Some(u)) => Some(u.uid.as_raw()),
                Ok(None) => {
                    out.push(finding(
                        format!("the workers' user {name} (their User=) does not exist"),
                        "systemd-sysusers /etc/sysusers.d/watchkeeper.conf",
                    ));
                    None
                }
                Err(_) => None,
            },
        },
    };
    if let (Some(name), Some(uid)) = (user, uid) {
        let md = std::fs::metadata(hb_dir);
        let ok = md
            .as_ref()
            .is_ok_and(|md| md.is_dir() && md.uid() == uid && md.mode() & 0o300 == 0o300);
        if !ok {
            let what = md.map_or_else(
                |e| e.to_string(),
                |md| format!("owner uid {}, mode {:04o}", md.uid(), md.mode() & 0o7777),
            );
            out.push(finding(
                format!(
                    "the heartbeat directory {} is not writable by {name}, the workers' user \
                     ({what})",
                    hb_dir.display()
                ),
                format!("chown {name}: {d} && chmod 0700 {d}", d = hb_dir.display()),
            ));
        }
        return;
    }
    let writable = hb_dir.is_dir()
        && rustix::fs::access(
            hb_dir,
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

/// The `LoadCredential=ID:PATH` pairs of `units`, as `(UNIT, ID, PATH)`, in order.
///
/// systemd 252's `systemctl show -p LoadCredential` prints `LoadCredential=[unprintable]` (it
/// has no printer for the D-Bus type `a(ss)`), so the property is read with
/// `busctl --json=short get-property`, one call per unit. `busctl` needs the bus (the user bus
/// for a user install), where `systemctl` also works without it; without one, an error.
fn units_load_credentials(
    m: Manager,
    units: &[&str],
) -> Result<Vec<(String, String, String)>, String> {
    let mut out = Vec::new();
    for &unit in units {
        let args = [
            m.flag(),
            "--json=short",
            "get-property",
            "org.freedesktop.systemd1",
            &unit_object_path(unit),
            "org.freedesktop.systemd1.Service",
            "LoadCredential",
        ];
        let o = std::process::Command::new("busctl")
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("cannot run busctl: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "`busctl {} get-property ... {unit} LoadCredential` failed ({}): {}",
                m.flag(),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        let text = String::from_utf8_lossy(&o.stdout);
        for (id, path) in parse_load_credential(&text).map_err(|e| format!("{unit}: {e}"))? {
            out.push((unit.to_owned(), id, path));
        }
    }
    Ok(out)
}

/// Whether `systemctl cat UNIT` (the unit file and its drop-ins, in order) leaves a
/// `LoadCredential=` in effect: an empty assignment resets the list (systemd.exec(5)).
fn declares_load_credential(text: &str) -> bool {
    let mut any = false;
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("LoadCredential=") {
            any = !v.trim().is_empty();
        }
    }
    any
}

/// `busctl --json=short get-property ... LoadCredential`: `{"type":"a(ss)","data":[["ID","PATH"],...]}`.
fn parse_load_credential(text: &str) -> Result<Vec<(String, String)>, String> {
    #[derive(serde::Deserialize)]
    struct Reply {
        #[serde(rename = "type")]
        ty: String,
        data: Vec<(String, String)>,
    }
    let r: Reply = serde_json::from_str(text.trim())
        .map_err(|e| format!("LoadCredential: not the expected busctl JSON ({e}): {text:?}"))?;
    if r.ty != "a(ss)" {
        return Err(format!(
            "LoadCredential has the D-Bus type {:?}, not a(ss)",
            r.ty
        ));
    }
    Ok(r.data)
}

/// The manager's D-Bus object of a unit: `sd_bus_path_encode("/org/freedesktop/systemd1/unit",
/// UNIT)` (sd_bus_path_encode(3): ASCII letters and digits stay, every other byte is `_` and two
/// lower-case hex digits). Written out here because it is these few lines; a D-Bus crate
/// would add a dependency for them.
fn unit_object_path(unit: &str) -> String {
    let mut p = String::from("/org/freedesktop/systemd1/unit/");
    if unit.is_empty() {
        p.push('_');
    }
    for b in unit.bytes() {
        if b.is_ascii_alphanumeric() {
            p.push(char::from(b));
        } else {
            p.push_str(&format!("_{b:02x}"));
        }
    }
    p
}

/// A credential file that must exist, and who needs it.
#[derive(Debug, Default)]
struct Required {
    names: BTreeSet<String>,
    units: BTreeSet<String>,
}

/// The credential checks, each directory and file once however many units and options name it:
/// a directory must be 0700 and a file 0600 (no group or other bits, readable by the owner),
/// both owned by the uid the manager runs as; a required file must exist. A `LoadCredential=`
/// with a relative PATH (a credential the manager itself was given, systemd.exec(5)) is not
/// required here: there is no file of it to look at.
#[derive(Debug, Default)]
struct Credentials {
    /// Directories checked with each regular file in them (the credential directory).
    scanned: BTreeSet<PathBuf>,
    /// Files that must exist; their directories are checked too (but not their other files).
    required: BTreeMap<PathBuf, Required>,
}

impl Credentials {
    fn scan_dir(&mut self, dir: &Path) {
        self.scanned.insert(dir.to_owned());
    }

    /// `path` must exist; `unit` loads it (`None`: asked for with `--credential`).
    fn require(&mut self, path: PathBuf, name: &str, unit: Option<&str>) {
        let r = self.required.entry(path).or_default();
        r.names.insert(name.to_owned());
        r.units.extend(unit.map(str::to_owned));
    }

    /// `as_whom`: how to run doctor so that it may look (the fix of a file it cannot stat).
    fn check(&self, owner: u32, as_whom: &str, out: &mut Vec<Finding>) {
        let mut dirs: BTreeSet<PathBuf> = self.scanned.clone();
        dirs.extend(
            self.required
                .keys()
                .filter_map(|p| p.parent())
                .map(Path::to_owned),
        );
        // Each file stat'ed once, checked in path order.
        let mut files = BTreeMap::new();
        for d in &dirs {
            let Ok(meta) = std::fs::metadata(d) else {
                // Missing: the required files in it are reported as missing.
                continue;
            };
            if !meta.is_dir() {
                continue;
            }
            check_mode_owner(d, &meta, owner, out);
            if self.scanned.contains(d)
                && let Ok(entries) = std::fs::read_dir(d)
            {
                files.extend(entries.flatten().filter_map(|e| {
                    let p = e.path();
                    let m = std::fs::metadata(&p)
                        .ok()
                        .filter(std::fs::Metadata::is_file)?;
                    Some((p, m))
                }));
            }
        }
        let mut missing = Vec::new();
        for (p, r) in &self.required {
            match std::fs::metadata(p) {
                Ok(m) if m.is_file() => {
                    files.insert(p.clone(), m);
                }
                // A directory (systemd loads each file in it) or a socket: not a file to check.
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing.push((p, r)),
                Err(e) => out.push(finding(
                    format!("cannot check the credential {}: {e}", p.display()),
                    as_whom,
                )),
            }
        }
        for (f, meta) in &files {
            check_mode_owner(f, meta, owner, out);
        }
        for (p, r) in missing {
            let names = r.names.iter().cloned().collect::<Vec<_>>().join(", ");
            let of = if r.units.is_empty() {
                String::new()
            } else {
                format!(
                    " of {}",
                    r.units.iter().cloned().collect::<Vec<_>>().join(", ")
                )
            };
            let install = format!(
                "install -m 0600 /dev/stdin {} (paste the secret, then Ctrl-D)",
                p.display()
            );
            let fix = match p.parent().filter(|d| !d.is_dir()) {
                Some(d) => format!("install -d -m 0700 {} && {install}", d.display()),
                None => install,
            };
            out.push(finding(
                format!("credential {names}{of} is missing: no {}", p.display()),
                fix,
            ));
        }
    }
}

/// Whether a credential file's (`dir == false`) or directory's mode is right: no group or
/// other bits, and the owner can read it (and search it, a directory).
fn mode_ok(mode: u32, dir: bool) -> bool {
    let need = if dir { 0o500 } else { 0o400 };
    mode & 0o077 == 0 && mode & need == need
}

/// The mode and owner of a credential file or directory (never its content).
fn check_mode_owner(p: &Path, meta: &std::fs::Metadata, owner: u32, out: &mut Vec<Finding>) {
    let dir = meta.is_dir();
    let (what, want) = if dir {
        ("the credential directory", "0700")
    } else {
        ("the credential", "0600")
    };
    let mode = meta.permissions().mode() & 0o7777;
    if !mode_ok(mode, dir) {
        out.push(finding(
            format!("{what} {} has mode {mode:04o}, not {want}", p.display()),
            format!("chmod {want} {}", p.display()),
        ));
    }
    if meta.uid() != owner {
        out.push(finding(
            format!(
                "{what} {} is owned by uid {}, not {owner}",
                p.display(),
                meta.uid()
            ),
            format!("chown {owner} {}", p.display()),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `busctl --user --json=short get-property org.freedesktop.systemd1
    /// /org/freedesktop/systemd1/unit/watchkeeper_2dworker_40alpha_2eservice
    /// org.freedesktop.systemd1.Service LoadCredential` printed under systemd 252 for
    /// `LoadCredential=token:…`, `other:…`, `rel` and `rel2:relname`.
    const BUSCTL_252: &str = "{\"type\":\"a(ss)\",\"data\":[[\"other\",\"/home/wk-e2e-0/.config/watchkeeper/credentials/other\"],[\"token\",\"/home/wk-e2e-0/.config/watchkeeper/credentials/token\"],[\"rel\",\"rel\"],[\"rel2\",\"relname\"]]}\n";

    #[test]
    fn load_credential_parses_busctl_json() {
        let v = parse_load_credential(BUSCTL_252).expect("parses");
        assert_eq!(
            v,
            [
                (
                    "other".to_owned(),
                    "/home/wk-e2e-0/.config/watchkeeper/credentials/other".to_owned()
                ),
                (
                    "token".to_owned(),
                    "/home/wk-e2e-0/.config/watchkeeper/credentials/token".to_owned()
                ),
                ("rel".to_owned(), "rel".to_owned()),
                ("rel2".to_owned(), "relname".to_owned()),
            ]
        );
        assert_eq!(
            parse_load_credential("{\"type\":\"a(ss)\",\"data\":[]}\n"),
            Ok(vec![])
        );
    }

    #[test]
    fn load_credential_rejects_other_text() {
        // What systemd 252's `systemctl show -p LoadCredential` prints: no value to parse.
        let e = parse_load_credential("[unprintable]").expect_err("not JSON");
        assert!(e.contains("[unprintable]"), "{e}");
        let e = parse_load_credential("{\"type\":\"as\",\"data\":[]}").expect_err("type");
        assert!(e.contains("not a(ss)"), "{e}");
    }

    #[test]
    fn unit_files_declare_load_credential() {
        // Commented out: not set.
        let shipped = "# /home/u/.config/systemd/user/watchkeeper-worker@.service\n[Service]\n\
                       #LoadCredential=github-token:%E/watchkeeper/credentials/github-token\n\
                       #SetCredential=github-token:watchkeeper-credential-missing\n";
        assert!(!declares_load_credential(shipped));
        // The shipped unit sets it.
        assert!(declares_load_credential(include_str!(
            "../../../contrib/systemd/user/watchkeeper-worker@.service"
        )));
        let drop_in = format!(
            "{shipped}\n# /home/u/.config/systemd/user/watchkeeper-worker@.service.d/50-x.conf\n\
             [Service]\nLoadCredential=token:/home/u/token\n"
        );
        assert!(declares_load_credential(&drop_in));
        assert!(!declares_load_credential(&format!(
            "{drop_in}[Service]\nLoadCredential=\n"
        )));
    }

    #[test]
    fn unit_object_paths_are_bus_escaped() {
        // As busctl and the manager spell them (`busctl --user tree org.freedesktop.systemd1`).
        assert_eq!(
            unit_object_path("watchkeeper-worker@alpha.service"),
            "/org/freedesktop/systemd1/unit/watchkeeper_2dworker_40alpha_2eservice"
        );
        assert_eq!(
            unit_object_path("watchkeeper-worker@a_b.service"),
            "/org/freedesktop/systemd1/unit/watchkeeper_2dworker_40a_5fb_2eservice"
        );
    }

    #[test]
    fn credential_modes() {
        assert!(mode_ok(0o600, false) && mode_ok(0o400, false));
        assert!(!mode_ok(0o644, false) && !mode_ok(0o640, false) && !mode_ok(0o200, false));
        assert!(mode_ok(0o700, true) && mode_ok(0o500, true));
        assert!(!mode_ok(0o755, true) && !mode_ok(0o710, true) && !mode_ok(0o600, true));
    }

    #[test]
    fn each_path_is_checked_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let creds = dir.path().join("credentials");
        std::fs::create_dir(&creds).expect("mkdir");
        std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let token = creds.join("token");
        std::fs::write(&token, "s3cr3t").expect("write");
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let mut c = Credentials::default();
        c.scan_dir(&creds);
        c.require(token.clone(), "token", None);
        c.require(token.clone(), "token", Some("a.service"));
        c.require(token.clone(), "token", Some("b.service"));
        c.require(creds.join("gone"), "gone", Some("a.service"));
        c.require(creds.join("gone"), "gone", Some("b.service"));
        let mut out = Vec::new();
        c.check(rustix::process::geteuid().as_raw(), "as root", &mut out);
        let lines: Vec<String> = out
            .iter()
            .map(|f| format!("{}: fix: {}", f.problem, f.fix))
            .collect();
        assert_eq!(
            lines,
            [
                format!(
                    "the credential directory {} has mode 0755, not 0700: fix: chmod 0700 {}",
                    creds.display(),
                    creds.display()
                ),
                format!(
                    "the credential {} has mode 0644, not 0600: fix: chmod 0600 {}",
                    token.display(),
                    token.display()
                ),
                format!(
                    "credential gone of a.service, b.service is missing: no {}: fix: install -m 0600 \
                     /dev/stdin {} (paste the secret, then Ctrl-D)",
                    creds.join("gone").display(),
                    creds.join("gone").display()
                ),
            ]
        );
    }
}
