//! A private systemd *system* manager for end-to-end tests of system-mode units: systemd as
//! PID 1 of a private pid/mount/net/uts/ipc/cgroup namespace (`tests/systemd/system-manager.sh`).
//!
//! Inside, `/etc`, `/usr/local`, `/var/lib` (and the rest of what an install or a manager
//! writes) are overlays whose upper layers vanish with the namespace, so `watchkeeper install
//! --system`, systemd-sysusers and the units' state directories never reach the host. Every
//! command runs inside the namespace, as root or as a given user ([`SystemManager::run_as`]).
//!
//! [`SystemManager::start`] needs root and a machine where PID 1 is not systemd; otherwise it
//! prints `SKIPPING: ...` and returns `Ok(None)`, except with `CI=true`, where it is an error.
//! Dropping the handle kills the namespace's PID 1, which ends everything in it; the state dir
//! (the manager's console log) is kept when the test panicked or `WK_E2E_KEEP=1`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};

use super::user_manager::{checked, join, parse_show};

/// The harness script.
pub const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/systemd/system-manager.sh"
);
const DEFAULT_STATE_BASE: &str = "/var/tmp/wk-e2e-system";

/// A running private system manager; dropping it ends the namespace and all in it.
#[derive(Debug)]
pub struct SystemManager {
    state_dir: PathBuf,
    stopped: bool,
}

impl SystemManager {
    /// Starts one, or returns `Ok(None)` after a loud `SKIPPING:` line when this machine cannot
    /// host one (an error under `CI=true`).
    pub fn start() -> Result<Option<SystemManager>> {
        let check = Command::new("bash")
            .arg(SCRIPT)
            .arg("check")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {SCRIPT} check"))?;
        if !check.status.success() {
            let why = String::from_utf8_lossy(&check.stdout)
                .trim()
                .replace('\n', " ");
            return skip(&why);
        }
        let base = std::env::var_os("WK_E2E_SYSTEM_STATE_BASE")
            .map_or_else(|| PathBuf::from(DEFAULT_STATE_BASE), PathBuf::from);
        fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let state_dir = base.join(format!("s-{}-{nanos}", std::process::id()));
        let out = Command::new("bash")
            .arg(SCRIPT)
            .arg("start")
            .arg(&state_dir)
            .env("WK_E2E_OWNER_PID", std::process::id().to_string())
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {SCRIPT} start"))?;
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        if !out.status.success() || String::from_utf8_lossy(&out.stdout).trim() != "ready" {
            bail!(
                "{SCRIPT} start {} failed ({}): {}",
                state_dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Some(SystemManager {
            state_dir,
            stopped: false,
        }))
    }

    /// `cmd args…` inside the namespace, as root.
    pub fn run<I, S>(&self, cmd: impl AsRef<OsStr>, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.run_inner(None, cmd.as_ref(), args)
    }

    /// `cmd args…` inside the namespace, as `user` (with its groups).
    pub fn run_as<I, S>(&self, user: &str, cmd: impl AsRef<OsStr>, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.run_inner(Some(user), cmd.as_ref(), args)
    }

    fn run_inner<I, S>(&self, user: Option<&str>, cmd: &OsStr, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = Command::new("bash");
        c.arg(SCRIPT).arg("run").arg(&self.state_dir);
        if let Some(u) = user {
            c.args(["--as", u]);
        }
        c.arg("--").arg(cmd).args(args).stdin(Stdio::null());
        match c.output() {
            Ok(o) => o,
            Err(e) => Output {
                status: std::os::unix::process::ExitStatusExt::from_raw(127 << 8),
                stdout: Vec::new(),
                stderr: format!("cannot run {SCRIPT} run: {e}").into_bytes(),
            },
        }
    }

    /// `cmd args…` as root inside; its stdout, or an error with both outputs.
    pub fn run_ok<I, S>(&self, cmd: impl AsRef<OsStr>, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let what = format!("{} {}", cmd.as_ref().to_string_lossy(), join(&args));
        checked(&self.run(cmd.as_ref(), &args), &what)
    }

    /// `systemctl ARGS` inside, as root; its stdout, or an error.
    pub fn systemctl_ok<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.run_ok("systemctl", args)
    }

    /// `systemctl show -p …` of one unit (empty values for an unknown unit).
    pub fn show(&self, unit: &str, props: &[&str]) -> Result<HashMap<String, String>> {
        let mut args = vec!["show".to_owned(), unit.to_owned()];
        for p in props {
            args.push(format!("--property={p}"));
        }
        Ok(parse_show(&self.systemctl_ok(&args)?))
    }

    /// Waits until `prop` of `unit` is `value`; on timeout, an error with the unit's state
    /// and its journal.
    pub fn wait_for(&self, unit: &str, prop: &str, value: &str, deadline: Duration) -> Result<()> {
        let t0 = Instant::now();
        loop {
            let p = self.show(unit, &[prop])?;
            if p.get(prop).map(String::as_str) == Some(value) {
                return Ok(());
            }
            if t0.elapsed() > deadline {
                let ctx = self.show(
                    unit,
                    &["ActiveState", "SubState", "Result", "StatusText", "MainPID"],
                )?;
                bail!(
                    "{unit}: {prop} is not {value:?} after {deadline:?} ({ctx:?})\n{}",
                    self.journal(unit)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The unit's journal, for messages.
    pub fn journal(&self, unit: &str) -> String {
        let o = self.run("journalctl", ["--no-pager", "-n", "60", "-u", unit]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The file the manager logs to (its console).
    pub fn console(&self) -> PathBuf {
        self.state_dir.join("console")
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Ends the namespace now, reporting failures (drop does the same, with a warning).
    pub fn stop(mut self) -> Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        super::user_manager::script_stop(SCRIPT, &self.state_dir, "system manager")
    }
}

impl Drop for SystemManager {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            let _ = writeln!(std::io::stderr(), "warning: {e:#}");
        }
    }
}

fn skip(why: &str) -> Result<Option<SystemManager>> {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        bail!("CI=true, but no private systemd system manager can be had here: {why}");
    }
    // Straight to stderr, past libtest's output capture, so it is always seen.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPING: no private systemd system manager can be had here: {why}"
    );
    Ok(None)
}
