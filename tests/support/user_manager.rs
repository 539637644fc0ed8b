//! A private systemd user manager for end-to-end tests.
//!
//! [`UserManager::start`] runs `tests/systemd/user-manager.sh start STATEDIR`, which (as
//! root) gives a dedicated user (`wk-e2e-N`) a delegated cgroup, a private mount
//! namespace, a journald and a `systemd --user`. Commands then run inside that namespace
//! as that user (`user-manager.sh run`), and dropping the handle stops everything.
//!
//! * Not root, or no usable cgroups/namespaces: `start` prints `SKIPPING: ...` and returns
//!   `Ok(None)`, except with `CI=true`, where it returns an error.
//! * Concurrency: the script has `WK_E2E_SLOTS` (default 2) slots, one user each; a
//!   third manager waits for a free slot (a file lock held by the manager's namespace
//!   holder). Two managers for the same UID cannot run at once: the journal/`sd_pid_get_*`
//!   layout `user.slice/user-UID.slice/user@UID.service` is one cgroup per UID.
//! * Each manager starts with an empty home (unit files go to
//!   `~/.config/systemd/user`) and its own state dir under `$WK_E2E_STATE_BASE`
//!   (default `/var/lib/wk-e2e`; not under `/tmp`, which `PrivateTmp=` would hide from
//!   units). Binaries for units go to `STATEDIR/bin` ([`UserManager::install_binary`]).
//! * The state dir (journal files, logs) is deleted on drop, and kept when the test
//!   panicked or `WK_E2E_KEEP=1`; read the journal with
//!   `journalctl -D STATEDIR/journal`.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};

/// The harness script.
pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/systemd/user-manager.sh");
const DEFAULT_STATE_BASE: &str = "/var/lib/wk-e2e";
/// Properties that `wait_for` reports when it times out, besides the one it waited for.
const CONTEXT_PROPS: &[&str] = &[
    "ActiveState",
    "SubState",
    "Result",
    "StatusText",
    "MainPID",
    "NRestarts",
    "ExecMainStatus",
];

/// A running private `systemd --user`; dropping it stops the manager and all its units.
#[derive(Debug)]
pub struct UserManager {
    state_dir: PathBuf,
    user: String,
    uid: u32,
    gid: u32,
    home: PathBuf,
    start_time: Duration,
    stopped: bool,
}

impl UserManager {
    /// Starts a manager, or returns `Ok(None)` (after a loud `SKIPPING:` line) when this
    /// machine cannot host one. With `CI=true` that case is an error instead.
    pub fn start() -> Result<Option<UserManager>> {
        let check = Command::new("bash")
            .arg(SCRIPT)
            .arg("check")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {SCRIPT} check"))?;
        if !check.status.success() {
            let why = format!(
                "{}{}",
                String::from_utf8_lossy(&check.stdout).trim(),
                String::from_utf8_lossy(&check.stderr).trim()
            );
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                bail!("CI=true, but no systemd user manager can be had here: {why}");
            }
            // Straight to stderr, past libtest's output capture, so it is always seen.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPING: no systemd user manager can be had here: {why}"
            );
            return Ok(None);
        }

        let state_dir = new_state_dir()?;
        let t0 = Instant::now();
        let out = Command::new("bash")
            .arg(SCRIPT)
            .arg("start")
            .arg(&state_dir)
            // If this process dies without dropping us, the script's reaper stops it.
            .env("WK_E2E_OWNER_PID", std::process::id().to_string())
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {SCRIPT} start"))?;
        let start_time = t0.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || String::from_utf8_lossy(&out.stdout).trim() != "ready" {
            bail!(
                "{SCRIPT} start {} failed ({}):\n{}{}",
                state_dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                stderr
            );
        }
        eprint!("{stderr}");
        let read = |name: &str| -> Result<String> {
            let p = state_dir.join(name);
            Ok(fs::read_to_string(&p)
                .with_context(|| format!("reading {}", p.display()))?
                .trim()
                .to_owned())
        };
        let mut um = UserManager {
            user: String::new(),
            uid: 0,
            gid: 0,
            home: PathBuf::new(),
            start_time,
            stopped: false,
            state_dir: state_dir.clone(),
        };
        // From here on a failure still stops the manager (through Drop).
        um.user = read("user")?;
        um.uid = read("uid")?.parse().context("parsing uid")?;
        um.gid = read("gid")?.parse().context("parsing gid")?;
        um.home = PathBuf::from(read("home")?);
        Ok(Some(um))
    }

    /// `systemctl --user ARGS...` inside the manager's namespace, as the user.
    pub fn systemctl<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut all = vec![OsStr::new("--user").to_owned()];
        all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self.run("systemctl", all)
    }

    /// Like [`Self::systemctl`], but an error (with stdout/stderr) unless it exits 0;
    /// returns stdout.
    pub fn systemctl_ok<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.systemctl(&args);
        checked(&out, &format!("systemctl --user {}", join(&args)))
    }

    /// `CMD ARGS...` inside the manager's mount namespace as the user, with
    /// `XDG_RUNTIME_DIR=/run/user/UID`, `HOME`, `USER`, `PATH`, in the home directory.
    /// Panics only if the harness script cannot be spawned at all.
    pub fn run<I, S>(&self, cmd: impl AsRef<OsStr>, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Command::new("bash")
            .arg(SCRIPT)
            .arg("run")
            .arg(&self.state_dir)
            .arg("--")
            .arg(cmd)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {SCRIPT} run: {e}"))
    }

    /// Writes `~/.config/systemd/user/NAME` (owned by the user) and runs `daemon-reload`.
    pub fn install_unit(&self, name: &str, contents: &str) -> Result<()> {
        let dir = self.unit_dir();
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(name);
        fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
        std::os::unix::fs::chown(&path, Some(self.uid), Some(self.gid))
            .with_context(|| format!("chown {}", path.display()))?;
        self.systemctl_ok(["daemon-reload"])?;
        Ok(())
    }

    /// Copies an executable into `STATEDIR/bin` (mode 0755, readable by the user) and
    /// returns its path, for a unit's `ExecStart=`. Panics if the copy fails.
    pub fn install_binary(&self, src: &Path) -> PathBuf {
        let name = src
            .file_name()
            .unwrap_or_else(|| panic!("install_binary: {} has no file name", src.display()));
        let dest = self.state_dir.join("bin").join(name);
        fs::copy(src, &dest).unwrap_or_else(|e| {
            panic!(
                "install_binary: copy {} -> {}: {e}",
                src.display(),
                dest.display()
            )
        });
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("install_binary: chmod {}: {e}", dest.display()));
        dest
    }

    /// `systemctl --user show -p P1 -p P2 ... UNIT` as a map. Panics if systemctl fails
    /// (the manager is gone); see [`Self::try_show`].
    pub fn show(&self, unit: &str, props: &[&str]) -> HashMap<String, String> {
        self.try_show(unit, props)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Like [`Self::show`], but returns an error instead of panicking.
    pub fn try_show(&self, unit: &str, props: &[&str]) -> Result<HashMap<String, String>> {
        let mut args = vec!["show".to_owned()];
        for p in props {
            args.push("-p".to_owned());
            args.push((*p).to_owned());
        }
        args.push(unit.to_owned());
        let stdout = self.systemctl_ok(&args)?;
        Ok(stdout
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect())
    }

    /// Polls `show` every 50 ms until `prop` of `unit` equals `value`, or fails after
    /// `deadline` with the last seen properties and the unit's journal.
    pub fn wait_for(&self, unit: &str, prop: &str, value: &str, deadline: Duration) -> Result<()> {
        let mut props = vec![prop];
        props.extend(CONTEXT_PROPS.iter().filter(|p| **p != prop));
        let t0 = Instant::now();
        let (mut seen, mut error) = (None, None);
        loop {
            match self.try_show(unit, &props) {
                Ok(map) if map.get(prop).map(String::as_str) == Some(value) => return Ok(()),
                Ok(map) => seen = Some(map),
                Err(e) => error = Some(e),
            }
            if t0.elapsed() >= deadline {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let seen = match (seen, error) {
            (Some(map), _) => format!("{:?}", map.into_iter().collect::<BTreeMap<_, _>>()),
            (None, Some(e)) => format!("<show failed: {e:#}>"),
            (None, None) => "<nothing>".to_owned(),
        };
        bail!(
            "{unit}: {prop} did not become {value:?} within {deadline:?}; last seen: {seen}\n\
             journal of {unit}:\n{}",
            self.journal(unit)
        )
    }

    /// The last 50 journal lines of a user unit (`journalctl --user -u UNIT`), or what
    /// journalctl said when it failed.
    pub fn journal(&self, unit: &str) -> String {
        let out = self.run(
            "journalctl",
            [
                "--user",
                "-u",
                unit,
                "--no-pager",
                "-n",
                "50",
                "-o",
                "short-monotonic",
            ],
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// The user's home (on the host's file system, same path inside the namespace).
    pub fn user_home(&self) -> &Path {
        &self.home
    }

    /// `~/.config/systemd/user`.
    pub fn unit_dir(&self) -> PathBuf {
        self.home.join(".config/systemd/user")
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }

    pub fn gid(&self) -> u32 {
        self.gid
    }

    pub fn user_name(&self) -> &str {
        &self.user
    }

    /// `/run/user/UID`: exists only inside the manager's namespace.
    pub fn runtime_dir(&self) -> PathBuf {
        PathBuf::from(format!("/run/user/{}", self.uid))
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// How long `start` took (script start to `ready`).
    pub fn start_time(&self) -> Duration {
        self.start_time
    }

    /// Stops the manager now, reporting failures (drop does the same, silently).
    pub fn stop(mut self) -> Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let out = Command::new("bash")
            .arg(SCRIPT)
            .arg("stop")
            .arg(&self.state_dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {SCRIPT} stop"))?;
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            bail!(
                "{SCRIPT} stop {} failed ({}); state kept there",
                self.state_dir.display(),
                out.status
            );
        }
        let keep = thread::panicking() || std::env::var("WK_E2E_KEEP").is_ok_and(|v| v == "1");
        if keep {
            eprintln!("user manager state kept in {}", self.state_dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.state_dir);
        }
        Ok(())
    }
}

impl Drop for UserManager {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            let _ = writeln!(std::io::stderr(), "warning: {e:#}");
        }
    }
}

fn new_state_dir() -> Result<PathBuf> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let base = std::env::var_os("WK_E2E_STATE_BASE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_BASE));
    fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let dir = base.join(format!(
        "m-{}-{}-{}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn checked(out: &Output, what: &str) -> Result<String> {
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn join(args: &[std::ffi::OsString]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}
