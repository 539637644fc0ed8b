//! A systemd user manager for end-to-end tests: a private one (as root), or the caller's own
//! (opt-in, not root).
//!
//! [`UserManager::start`] picks one of:
//!
//! * **Private manager** (root): runs `tests/systemd/user-manager.sh start STATEDIR`, which
//!   gives a dedicated user (`wk-e2e-N`) a delegated cgroup, a private mount namespace, a
//!   journald and a `systemd --user`. Commands then run inside that namespace as that user
//!   (`user-manager.sh run`), and dropping the handle stops everything.
//! * **Own manager** (not root, `WK_E2E_OWN_MANAGER=1`, and `systemctl --user
//!   is-system-running` says running or degraded): the caller's own `systemctl --user`.
//!   Commands run directly as the caller; the tests install the shipped units in
//!   `~/.config/systemd/user`, the binaries in `~/.local/bin` and the configurations in
//!   `~/.config/watchkeeper`, so this is opt-in. `start` refuses (an error) when any of those,
//!   the units' state directories, or a `watchkeeper-*` unit known to the manager is already
//!   there and was not written by the suite: everything the suite writes is listed in
//!   `~/.config/watchkeeper/.wk-e2e-owned` (the marker), and only what is listed there is
//!   ever removed. Dropping the handle stops (and disables, resets) the `watchkeeper-*` units
//!   and the units the suite installed, removes what it wrote, and runs `daemon-reload`; a run
//!   that could not (killed) leaves the marker, and the next `start` cleans up from it first.
//!   The unit names are fixed, so tests take turns: `start` waits for the file lock
//!   `$XDG_RUNTIME_DIR/wk-e2e-own.lock`. The journal is the user's own, so journal reads
//!   ([`UserManager::journal_args`]) start after a line `start` writes (`wk-e2e-own`).
//! * Otherwise `start` prints `SKIPPING: ...` and returns `Ok(None)`, except with `CI=true`,
//!   where it returns an error.
//!
//! For a private manager:
//!
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
//!
//! An own manager's state dir (only `bin/`) is under `$WK_E2E_STATE_BASE`, default
//! `$XDG_RUNTIME_DIR/wk-e2e-own`.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail, ensure};

/// The harness script.
pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/systemd/user-manager.sh");
/// `WK_E2E_OWN_MANAGER=1`: not root, use the caller's own `systemctl --user`.
pub const OWN_MANAGER_ENV: &str = "WK_E2E_OWN_MANAGER";
const OWN_HINT: &str = "set WK_E2E_OWN_MANAGER=1 to run against your own systemctl --user \
                        (it installs watchkeeper units, binaries and configs in your home)";
const DEFAULT_STATE_BASE: &str = "/var/lib/wk-e2e";
/// The marker (and list of what the suite wrote) of an own manager, in `~/.config/watchkeeper`.
const OWN_MARKER: &str = ".wk-e2e-owned";
/// `SYSLOG_IDENTIFIER` of the line that starts an own manager's journal.
const OWN_JOURNAL_ID: &str = "wk-e2e-own";
/// The units of the shipped set (`watchkeeper-*`), as a `systemctl` pattern.
const OWN_UNIT_PATTERN: &str = "watchkeeper-*";
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

/// A running `systemd --user` (private, or the caller's own); dropping it stops the private
/// manager and all its units, or cleans up after the tests in the caller's own one.
#[derive(Debug)]
pub struct UserManager {
    state_dir: PathBuf,
    user: String,
    uid: u32,
    gid: u32,
    home: PathBuf,
    start_time: Duration,
    stopped: bool,
    /// `Some` for the caller's own manager.
    own: Option<Own>,
}

/// What the suite does to the caller's own manager.
#[derive(Debug)]
struct Own {
    runtime_dir: PathBuf,
    /// `$XDG_RUNTIME_DIR/wk-e2e-own.lock`, held (flock) until the cleanup is over.
    lock: Option<fs::File>,
    /// `~/.config/watchkeeper/.wk-e2e-owned`.
    marker: PathBuf,
    /// What the suite created, in order (mirrored in the marker); `None` until the marker is
    /// written: before that, nothing is ours and the cleanup touches nothing.
    owned: Mutex<Option<Vec<Owned>>>,
    /// Journal reads start after this entry (the line `start` wrote).
    cursor: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A file (or symlink): removed.
    File,
    /// A directory: removed if empty.
    Dir,
    /// A directory with everything below it: removed with its contents.
    Tree,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Owned {
    kind: Kind,
    path: PathBuf,
}

impl UserManager {
    /// Starts a private manager (root), or takes the caller's own one (not root, with
    /// `WK_E2E_OWN_MANAGER=1`), or returns `Ok(None)` (after a loud `SKIPPING:` line) when
    /// neither can be had. With `CI=true` that case is an error instead.
    pub fn start() -> Result<Option<UserManager>> {
        let root = rustix::process::geteuid().is_root();
        let opted_in = std::env::var(OWN_MANAGER_ENV).is_ok_and(|v| v == "1");
        if !root && opted_in {
            return match own_manager_state() {
                Ok(()) => UserManager::start_own().map(Some),
                Err(why) => skip(&why, ""),
            };
        }
        if root && opted_in {
            eprintln!("{OWN_MANAGER_ENV}=1 is ignored as root: root gets a private manager");
        }
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
            let hint = if root {
                String::new()
            } else {
                format!("\n  {OWN_HINT}")
            };
            return skip(&why, &hint);
        }

        let state_dir = new_state_dir(&state_base(DEFAULT_STATE_BASE))?;
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
            own: None,
        };
        // From here on a failure still stops the manager (through Drop).
        um.user = read("user")?;
        um.uid = read("uid")?.parse().context("parsing uid")?;
        um.gid = read("gid")?.parse().context("parsing gid")?;
        um.home = PathBuf::from(read("home")?);
        Ok(Some(um))
    }

    /// The caller's own manager: takes the lock, cleans up after an earlier run that could
    /// not, refuses when something of a real installation is there, then writes the marker.
    fn start_own() -> Result<UserManager> {
        let t0 = Instant::now();
        let runtime_dir = PathBuf::from(
            std::env::var_os("XDG_RUNTIME_DIR").context("XDG_RUNTIME_DIR is not set")?,
        );
        let home = PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?);
        ensure!(
            home.is_absolute() && home.is_dir(),
            "HOME={} is not a directory",
            home.display()
        );
        let lock = lock_own(&runtime_dir)?;
        let state_dir = new_state_dir(&state_base(runtime_dir.join("wk-e2e-own")))?;
        let mut um = UserManager {
            state_dir,
            user: current_user_name(),
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
            home,
            start_time: Duration::ZERO,
            stopped: false,
            own: Some(Own {
                runtime_dir,
                lock: Some(lock),
                marker: PathBuf::new(),
                owned: Mutex::new(None),
                cursor: None,
            }),
        };
        // From here on a failure removes the state dir and releases the lock (Drop), and
        // once the marker is written, also cleans up what was written.
        let bin = um.state_dir.join("bin");
        fs::create_dir(&bin).with_context(|| format!("creating {}", bin.display()))?;
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))?;
        let config = um.home.join(".config/watchkeeper");
        let marker = config.join(OWN_MARKER);
        um.own_mut().marker = marker.clone();

        if marker.exists() {
            let owned = read_marker(&marker)?;
            eprintln!(
                "{} is left from an earlier e2e run that did not clean up: cleaning up",
                marker.display()
            );
            if let Err(e) = own_cleanup(&um.home, &owned) {
                bail!(
                    "cleaning up after an earlier e2e run ({}): {e:#}",
                    marker.display()
                );
            }
        }
        um.refuse_foreign_installation()?;

        // Everything the suite may create, other than what it claims as it writes: the
        // configuration directory (with the marker), the units' state directories, the
        // directories `systemctl enable` would create; and their missing parents.
        let mut owned = Vec::new();
        let plan = |owned: &mut Vec<Owned>, path: PathBuf, kind: Kind| {
            let mut missing = Vec::new();
            let mut p = path.parent();
            while let Some(d) = p.filter(|d| d.starts_with(&um.home) && *d != um.home) {
                if !d.exists() {
                    missing.push(d.to_owned());
                }
                p = d.parent();
            }
            for d in missing.into_iter().rev() {
                let entry = Owned {
                    kind: Kind::Dir,
                    path: d,
                };
                if !owned.contains(&entry) {
                    owned.push(entry);
                }
            }
            if !path.exists() {
                owned.push(Owned { kind, path });
            }
        };
        plan(&mut owned, config.clone(), Kind::Tree);
        for dir in own_state_dirs(&um.home) {
            plan(&mut owned, dir, Kind::Tree);
        }
        let unit_dir = um.unit_dir();
        plan(&mut owned, unit_dir.clone(), Kind::Dir);
        for target in install_targets()? {
            plan(&mut owned, unit_dir.join(target), Kind::Dir);
        }
        // (`owned` lists missing directories only, parents first.)
        for o in &owned {
            if config.starts_with(&o.path) {
                fs::create_dir(&o.path)
                    .with_context(|| format!("creating {}", o.path.display()))?;
                fs::set_permissions(&o.path, fs::Permissions::from_mode(0o755))?;
            }
        }
        write_marker(&marker, &owned)?;
        *um.own_ref().owned.lock().expect("owned") = Some(owned);

        um.own_mut().cursor = um.own_journal_start();
        um.start_time = t0.elapsed();
        eprintln!(
            "using the own systemd user manager of {} (uid {}); the e2e files are listed in {}",
            um.user,
            um.uid,
            marker.display()
        );
        Ok(um)
    }

    fn own_ref(&self) -> &Own {
        self.own.as_ref().expect("an own manager")
    }

    fn own_mut(&mut self) -> &mut Own {
        self.own.as_mut().expect("an own manager")
    }

    /// Whether this is the caller's own manager (not a private one).
    pub fn is_own(&self) -> bool {
        self.own.is_some()
    }

    /// An error listing what of a real installation is there: files the suite would write,
    /// the units' state directories, `watchkeeper-*` units the manager knows.
    fn refuse_foreign_installation(&self) -> Result<()> {
        let mut found = Vec::new();
        let unit_dir = self.unit_dir();
        if let Ok(entries) = fs::read_dir(&unit_dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("watchkeeper-") {
                    found.push(e.path().display().to_string());
                } else if (name.ends_with(".wants") || name.ends_with(".requires"))
                    && e.path().is_dir()
                {
                    for w in fs::read_dir(e.path()).into_iter().flatten().flatten() {
                        if w.file_name().to_string_lossy().starts_with("watchkeeper-") {
                            found.push(w.path().display().to_string());
                        }
                    }
                }
            }
        }
        let mut paths: Vec<PathBuf> = super::wk::BINARIES
            .iter()
            .map(|b| self.home.join(".local/bin").join(b))
            .collect();
        paths.push(self.home.join(".config/watchkeeper"));
        paths.extend(own_state_dirs(&self.home));
        for p in paths {
            if p.symlink_metadata().is_ok() {
                found.push(p.display().to_string());
            }
        }
        let units = self.systemctl([
            "list-units",
            "--all",
            "--plain",
            "--no-legend",
            "--no-pager",
            OWN_UNIT_PATTERN,
        ]);
        let text = checked(&units, "systemctl --user list-units --all watchkeeper-*")?;
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            // A unit only referenced (`After=`) is `not-found inactive`: not an installation.
            if f.len() >= 3 && (f[1] != "not-found" || f[2] != "inactive") {
                found.push(format!("unit {} ({} {})", f[0], f[1], f[2]));
            }
        }
        let files = self.systemctl([
            "list-unit-files",
            "--plain",
            "--no-legend",
            "--no-pager",
            OWN_UNIT_PATTERN,
        ]);
        for line in String::from_utf8_lossy(&files.stdout).lines() {
            if let Some(name) = line.split_whitespace().next() {
                found.push(format!("unit file {name}"));
            }
        }
        let env = self.systemctl(["show-environment"]);
        for line in String::from_utf8_lossy(&env.stdout).lines() {
            if let Some((k, v)) = line.split_once('=') {
                let default = match k {
                    "XDG_CONFIG_HOME" => ".config",
                    "XDG_STATE_HOME" => ".local/state",
                    _ => continue,
                };
                if Path::new(v) != self.home.join(default) {
                    found.push(format!(
                        "the manager's {k}={v} (the tests expect ~/{default})"
                    ));
                }
            }
        }
        found.sort();
        found.dedup();
        ensure!(
            found.is_empty(),
            "{OWN_MANAGER_ENV}=1: refusing to use the own systemd user manager of {}: the e2e \
             tests install and remove watchkeeper's units, binaries, configurations and state \
             there, and these are already present and not from an earlier e2e run (no {}):\n  \
             {}\nUninstall them (or run the tests as root, with a private manager).",
            self.user,
            self.home
                .join(".config/watchkeeper")
                .join(OWN_MARKER)
                .display(),
            found.join("\n  ")
        );
        Ok(())
    }

    /// Writes a line to the user's journal and returns its cursor, so that the journal of this
    /// run leaves out earlier runs' entries for the same units. `None` (with a warning) if the
    /// line does not show up in `journalctl --user`.
    fn own_journal_start(&self) -> Option<String> {
        let nonce = format!(
            "watchkeeper e2e: own manager taken by pid {} at {:?}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
        );
        let out = self.run("systemd-cat", ["-t", OWN_JOURNAL_ID, "echo", &nonce]);
        if !out.status.success() {
            eprintln!(
                "warning: systemd-cat failed ({}): {}; journal reads include earlier runs",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            let out = self.run(
                "journalctl",
                [
                    "--user",
                    "-t",
                    OWN_JOURNAL_ID,
                    "-n",
                    "20",
                    "-o",
                    "json",
                    "--no-pager",
                ],
            );
            let cursor = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|e| e["MESSAGE"].as_str() == Some(nonce.as_str()))
                .and_then(|e| e["__CURSOR"].as_str().map(str::to_owned));
            if cursor.is_some() {
                return cursor;
            }
            thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "warning: the line written with systemd-cat -t {OWN_JOURNAL_ID} did not show up in \
             journalctl --user within 10 s; journal reads include earlier runs"
        );
        None
    }

    /// Arguments for `journalctl --user` that leave out entries from before this manager was
    /// taken: empty for a private manager (its journal is its own), `--after-cursor=...` for
    /// the caller's own one.
    pub fn journal_args(&self) -> Vec<String> {
        match self.own.as_ref().and_then(|o| o.cursor.as_ref()) {
            Some(c) => vec![format!("--after-cursor={c}")],
            None => Vec::new(),
        }
    }

    /// Before the suite writes `path` (a file, or a directory it creates): with the caller's
    /// own manager, an error if `path` exists and was not written by the suite, else `path` is
    /// recorded in the marker, to be removed on drop. A no-op for a private manager.
    pub fn claim(&self, path: &Path, dir: bool) -> Result<()> {
        let Some(own) = &self.own else {
            return Ok(());
        };
        let mut guard = own.owned.lock().expect("owned");
        let owned = guard
            .as_mut()
            .context("the own manager's marker is not written yet")?;
        let covered = owned
            .iter()
            .any(|o| *o.path == *path || (o.kind == Kind::Tree && path.starts_with(&o.path)));
        if covered {
            return Ok(());
        }
        ensure!(
            path.symlink_metadata().is_err(),
            "refusing to overwrite {}: it was not written by the e2e suite (not in {})",
            path.display(),
            own.marker.display()
        );
        owned.push(Owned {
            kind: if dir { Kind::Dir } else { Kind::File },
            path: path.to_owned(),
        });
        write_marker(&own.marker, owned)
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
    /// With the caller's own manager: `CMD ARGS...` directly, in the home directory.
    /// Panics only if the harness script (or `CMD`) cannot be spawned at all.
    pub fn run<I, S>(&self, cmd: impl AsRef<OsStr>, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        if self.own.is_some() {
            return own_cmd(&self.home, cmd.as_ref(), args);
        }
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
    /// With the caller's own manager the file must not exist yet (see [`Self::claim`]); it is
    /// stopped and removed on drop.
    pub fn install_unit(&self, name: &str, contents: &str) -> Result<()> {
        let dir = self.unit_dir();
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(name);
        self.claim(&path, false)?;
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
        Ok(parse_show(&self.systemctl_ok(&args)?))
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

    /// The last 50 journal lines of a user unit (`journalctl --user -u UNIT`, from this
    /// manager's start on: [`Self::journal_args`]), or what journalctl said when it failed.
    pub fn journal(&self, unit: &str) -> String {
        let mut args: Vec<String> = ["--user", "-u", unit, "--no-pager", "-o", "short-monotonic"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        // (With --after-cursor, `-n 50` would be the first 50 after it.)
        args.extend(self.journal_args());
        let out = self.run("journalctl", &args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = stdout.lines().collect();
        format!(
            "{}\n{}",
            lines[lines.len().saturating_sub(50)..].join("\n"),
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

    /// `/run/user/UID`: exists only inside the manager's namespace. With the caller's own
    /// manager: `$XDG_RUNTIME_DIR`.
    pub fn runtime_dir(&self) -> PathBuf {
        match &self.own {
            Some(own) => own.runtime_dir.clone(),
            None => PathBuf::from(format!("/run/user/{}", self.uid)),
        }
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// How long `start` took (script start to `ready`; with the caller's own manager,
    /// including the wait for the lock).
    pub fn start_time(&self) -> Duration {
        self.start_time
    }

    /// Stops the manager now, reporting failures (drop does the same, with a warning). With the
    /// caller's own manager: stops the units, removes what the suite wrote, reloads.
    pub fn stop(mut self) -> Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        if let Some(own) = &mut self.own {
            let owned = own.owned.get_mut().expect("owned").take();
            let result = match &owned {
                Some(owned) => own_cleanup(&self.home, owned),
                None => Ok(()),
            };
            if result.is_err() && owned.is_some() {
                eprintln!(
                    "the e2e files stay listed in {}: the next run cleans up after this one",
                    own.marker.display()
                );
            }
            let keep = thread::panicking() || std::env::var("WK_E2E_KEEP").is_ok_and(|v| v == "1");
            if !keep {
                let _ = fs::remove_dir_all(&self.state_dir);
                // The default base, if now empty.
                if let Some(base) = self
                    .state_dir
                    .parent()
                    .filter(|b| b.file_name() == Some(OsStr::new("wk-e2e-own")))
                {
                    let _ = fs::remove_dir(base);
                }
            }
            // Only now may the next test take the manager.
            own.lock = None;
            return result;
        }
        script_stop(SCRIPT, &self.state_dir, "user manager")
    }
}

/// `SCRIPT stop STATE_DIR`, then the state dir is removed, or kept (and named) when the test
/// panicked or `WK_E2E_KEEP=1`.
pub fn script_stop(script: &str, state_dir: &Path, what: &str) -> Result<()> {
    let out = Command::new("bash")
        .arg(script)
        .arg("stop")
        .arg(state_dir)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {script} stop"))?;
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!(
            "{script} stop {} failed ({}); state kept there",
            state_dir.display(),
            out.status
        );
    }
    let keep = thread::panicking() || std::env::var("WK_E2E_KEEP").is_ok_and(|v| v == "1");
    if keep {
        eprintln!("{what} state kept in {}", state_dir.display());
    } else {
        let _ = fs::remove_dir_all(state_dir);
    }
    Ok(())
}

impl Drop for UserManager {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            let _ = writeln!(std::io::stderr(), "warning: {e:#}");
        }
    }
}

/// `$WK_E2E_STATE_BASE`, or `default`.
fn state_base(default: impl Into<PathBuf>) -> PathBuf {
    std::env::var_os("WK_E2E_STATE_BASE")
        .map(PathBuf::from)
        .unwrap_or_else(|| default.into())
}

fn new_state_dir(base: &Path) -> Result<PathBuf> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    fs::create_dir_all(base).with_context(|| format!("creating {}", base.display()))?;
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

/// `systemctl show` output (`KEY=VALUE` lines) as a map.
pub fn parse_show(stdout: &str) -> HashMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// `out`'s stdout when it succeeded, else an error naming `what` with both outputs.
pub fn checked(out: &Output, what: &str) -> Result<String> {
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

/// Arguments as one line, for messages.
pub fn join(args: &[std::ffi::OsString]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `Ok(None)` after a loud `SKIPPING:` line, or an error under `CI=true`.
fn skip(why: &str, hint: &str) -> Result<Option<UserManager>> {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        bail!("CI=true, but no systemd user manager can be had here: {why}{hint}");
    }
    // Straight to stderr, past libtest's output capture, so it is always seen.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPING: no systemd user manager can be had here: {why}{hint}"
    );
    Ok(None)
}

/// `Ok` if the caller's own manager is there (`systemctl --user is-system-running` says running
/// or degraded; `starting` is waited for, up to 30 s), else why not.
fn own_manager_state() -> std::result::Result<(), String> {
    let prefix = format!("{OWN_MANAGER_ENV}=1, but");
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if Path::new(&d).is_dir() => {}
        Some(d) => return Err(format!("{prefix} XDG_RUNTIME_DIR={d:?} is not a directory")),
        None => return Err(format!("{prefix} XDG_RUNTIME_DIR is not set")),
    }
    let t0 = Instant::now();
    loop {
        let out = Command::new("systemctl")
            .args(["--user", "is-system-running"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{prefix} systemctl cannot be run: {e}"))?;
        let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        match state.as_str() {
            "running" | "degraded" => return Ok(()),
            "starting" | "initializing" if t0.elapsed() < Duration::from_secs(30) => {
                thread::sleep(Duration::from_millis(200));
            }
            _ => {
                return Err(format!(
                    "{prefix} `systemctl --user is-system-running` says {state:?} ({}; {}), \
                     not running or degraded",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
    }
}

/// Takes `RUNTIME_DIR/wk-e2e-own.lock` (flock), waiting up to `WK_E2E_SLOT_TIMEOUT` (600 s):
/// one test at a time uses the own manager (the unit names are fixed). Released when the
/// returned file is closed, also when the process dies.
fn lock_own(runtime_dir: &Path) -> Result<fs::File> {
    use rustix::fs::{FlockOperation, flock};
    let path = runtime_dir.join("wk-e2e-own.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let timeout = Duration::from_secs(
        std::env::var("WK_E2E_SLOT_TIMEOUT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(600),
    );
    let t0 = Instant::now();
    let mut said = false;
    loop {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(file),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK || e == rustix::io::Errno::INTR => {}
            Err(e) => bail!("flock {}: {e}", path.display()),
        }
        if !said {
            eprintln!(
                "waiting for {} (another e2e test uses the own manager)",
                path.display()
            );
            said = true;
        }
        ensure!(
            t0.elapsed() < timeout,
            "{} still locked after {timeout:?}: another e2e test uses the own manager",
            path.display()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

fn current_user_name() -> String {
    if let Ok(u) = std::env::var("USER") {
        if !u.is_empty() {
            return u;
        }
    }
    Command::new("id")
        .arg("-un")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The shipped units' `StateDirectory=`: `~/.config/NAME` for a 252 user unit, `~/.local/state/NAME`
/// for newer managers.
fn own_state_dirs(home: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for base in [".config", ".local/state"] {
        for name in ["watchkeeper-daemon", "watchkeeper-worker"] {
            dirs.push(home.join(base).join(name));
        }
    }
    dirs
}

/// `TARGET.wants`/`TARGET.requires`: the directories `systemctl enable` of the shipped user units
/// creates (from their `WantedBy=`/`RequiredBy=`).
fn install_targets() -> Result<Vec<String>> {
    let mut dirs = Vec::new();
    for unit in super::wk::USER_UNITS {
        let text = super::wk::read_contrib(&format!("systemd/user/{unit}"))?;
        for line in text.lines() {
            let (suffix, value) = if let Some(v) = line.strip_prefix("WantedBy=") {
                ("wants", v)
            } else if let Some(v) = line.strip_prefix("RequiredBy=") {
                ("requires", v)
            } else {
                continue;
            };
            for target in value.split_whitespace() {
                let dir = format!("{target}.{suffix}");
                if !dirs.contains(&dir) {
                    dirs.push(dir);
                }
            }
        }
    }
    Ok(dirs)
}

const MARKER_HEADER: &str = "\
# Written by watchkeeper's end-to-end tests (tests/support/user_manager.rs, WK_E2E_OWN_MANAGER=1).
# They installed what is listed below (file: removed; dir: removed if empty; tree: removed with
# its contents) and remove it when they are done; a later run removes it if this one could not.
";

fn write_marker(marker: &Path, owned: &[Owned]) -> Result<()> {
    let mut text = MARKER_HEADER.to_owned();
    for o in owned {
        let kind = match o.kind {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Tree => "tree",
        };
        text.push_str(&format!("{kind} {}\n", o.path.display()));
    }
    let tmp = marker.with_extension("tmp");
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, marker).with_context(|| format!("renaming to {}", marker.display()))
}

fn read_marker(marker: &Path) -> Result<Vec<Owned>> {
    let text =
        fs::read_to_string(marker).with_context(|| format!("reading {}", marker.display()))?;
    let mut owned = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (kind, path) = line
            .split_once(' ')
            .with_context(|| format!("{}: bad line {line:?}", marker.display()))?;
        let kind = match kind {
            "file" => Kind::File,
            "dir" => Kind::Dir,
            "tree" => Kind::Tree,
            _ => bail!("{}: bad line {line:?}", marker.display()),
        };
        ensure!(
            Path::new(path).is_absolute(),
            "{}: bad line {line:?}",
            marker.display()
        );
        owned.push(Owned {
            kind,
            path: PathBuf::from(path),
        });
    }
    // The marker must list its own directory: otherwise it is not ours.
    ensure!(
        owned
            .iter()
            .any(|o| o.kind == Kind::Tree && marker.parent() == Some(o.path.as_path())),
        "{} does not list its own directory: not a marker of the e2e tests",
        marker.display()
    );
    Ok(owned)
}

/// `CMD ARGS...` as the caller, in `home`.
fn own_cmd<I, S>(home: &Path, cmd: &OsStr, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(cmd)
        .args(args)
        .current_dir(home)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", cmd.to_string_lossy()))
}

/// After the tests, in the caller's own manager: stops, disables and resets the `watchkeeper-*`
/// units and those the suite installed, removes what `owned` lists (the marker last), and
/// reloads the manager. Goes on after a failure; the error lists them all (the marker is then
/// kept, for the next run).
fn own_cleanup(home: &Path, owned: &[Owned]) -> Result<()> {
    let unit_dir = home.join(".config/systemd/user");
    let systemctl = |args: &[&str]| {
        own_cmd(home, OsStr::new("systemctl"), {
            let mut all = vec!["--user"];
            all.extend_from_slice(args);
            all
        })
    };
    let mut errors = Vec::new();
    // The unit files the suite installed (not its temporary files or drop-in directories).
    let unit_files: Vec<String> = owned
        .iter()
        .filter(|o| o.kind == Kind::File && o.path.parent() == Some(unit_dir.as_path()))
        .filter_map(|o| o.path.file_name()?.to_str().map(str::to_owned))
        .filter(|n| {
            [".service", ".socket", ".timer", ".path", ".target"]
                .iter()
                .any(|s| n.ends_with(s))
        })
        .collect();
    let mut patterns = vec![OWN_UNIT_PATTERN.to_owned()];
    patterns.extend(
        unit_files
            .iter()
            .filter(|n| !n.starts_with("watchkeeper-"))
            .map(|n| n.replace("@.", "@*.")),
    );
    let patterns: Vec<&str> = patterns.iter().map(String::as_str).collect();

    let mut stop = vec!["stop"];
    stop.extend_from_slice(&patterns);
    let out = systemctl(&stop);
    if !out.status.success() {
        errors.push(format!(
            "systemctl --user {}: {} {}",
            stop.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let existing: Vec<&str> = unit_files
        .iter()
        .filter(|n| unit_dir.join(n).exists())
        .map(String::as_str)
        .collect();
    if !existing.is_empty() {
        let mut disable = vec!["--quiet", "disable"];
        disable.extend_from_slice(&existing);
        let _ = systemctl(&disable);
    }
    // What `disable` left: links to the units in `*.wants`/`*.requires`.
    for e in fs::read_dir(&unit_dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.ends_with(".wants") || name.ends_with(".requires")) {
            continue;
        }
        for w in fs::read_dir(e.path()).into_iter().flatten().flatten() {
            let n = w.file_name().to_string_lossy().into_owned();
            let template = n
                .split_once('@')
                .map(|(a, b)| format!("{a}@.{}", b.rsplit('.').next().unwrap_or("")));
            if n.starts_with("watchkeeper-")
                || unit_files.contains(&n)
                || template.is_some_and(|t| unit_files.contains(&t))
            {
                if let Err(err) = fs::remove_file(w.path()) {
                    errors.push(format!("removing {}: {err}", w.path().display()));
                }
            }
        }
    }
    let mut reset = vec!["reset-failed"];
    reset.extend_from_slice(&patterns);
    let _ = systemctl(&reset);

    // Newest first; the marker's directory (and its parents) last, once all else is gone.
    let marker_dir = owned
        .iter()
        .find(|o| o.kind == Kind::Tree && o.path.join(OWN_MARKER).exists())
        .map(|o| o.path.clone());
    let is_late = |p: &Path| marker_dir.as_deref().is_some_and(|m| m.starts_with(p));
    let remove = |o: &Owned, errors: &mut Vec<String>| {
        let r = match o.kind {
            Kind::File => fs::remove_file(&o.path),
            Kind::Tree => fs::remove_dir_all(&o.path),
            // Not empty (something else is in it now): stays.
            Kind::Dir => {
                fs::remove_dir(&o.path).or_else(|e| if o.path.is_dir() { Ok(()) } else { Err(e) })
            }
        };
        match r {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                errors.push(format!("removing {}: {e}", o.path.display()));
            }
            _ => {}
        }
    };
    for o in owned.iter().rev().filter(|o| !is_late(&o.path)) {
        remove(o, &mut errors);
    }
    let out = systemctl(&["daemon-reload"]);
    if !out.status.success() {
        errors.push(format!(
            "systemctl --user daemon-reload: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    if errors.is_empty() {
        for o in owned.iter().rev().filter(|o| is_late(&o.path)) {
            remove(o, &mut errors);
        }
    }
    ensure!(
        errors.is_empty(),
        "cleaning up the own systemd user manager:\n  {}",
        errors.join("\n  ")
    );
    Ok(())
}
