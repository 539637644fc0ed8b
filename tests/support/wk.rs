//! The shipped watchkeeper pieces, installed for a user manager (private, or the caller's own:
//! see [`UserManager`]) the way a user would install them: the built binaries in
//! `~/.local/bin`, the units of `contrib/systemd/user` verbatim in `~/.config/systemd/user`,
//! the configurations of `contrib/config` in `~/.config/watchkeeper` (`%E/watchkeeper`, where
//! the units read them).
//!
//! Test settings go into drop-ins (`~/.config/systemd/user/UNIT.d/50-e2e.conf`), so that the
//! shipped units are what runs. Every file and directory is written through
//! [`UserManager::claim`], so that with the caller's own manager nothing foreign is overwritten
//! and everything written is removed afterwards.
//!
//! The binaries come from `target/PROFILE` next to the test binary, or from `$WK_E2E_BIN_DIR`
//! (e.g. when the test binary runs as another user, from a copy).

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use watchkeeper::heartbeat::{Heartbeat, check_heartbeat};

use super::user_manager::UserManager;

/// A job (JSON for `wk-jobs submit-json`) that asks for the credential `github-token`, checks
/// that it got it as a private file (0600 in a 0700 directory, not in its environment), and
/// prints it on stdout and stderr (for the worker to redact).
pub const GITHUB_TOKEN_JOB: &str = r#"{"command": ["sh", "-c", "f=\"$WK_CREDENTIAL_GITHUB_TOKEN\"; test \"$(stat -c %a \"$f\")\" = 600 || exit 2; test \"$(stat -c %a \"$(dirname \"$f\")\")\" = 700 || exit 3; env | grep -qF \"$(cat \"$f\")\" && exit 4; echo \"the token is $(cat \"$f\")\"; echo \"on stderr: $(cat \"$f\")\" >&2"], "credentials": ["github-token"]}"#;

/// The workspace root.
pub const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The binaries the units run, as cargo builds them into `target/debug`.
pub const BINARIES: &[&str] = &["watchkeeper-daemon", "watchkeeper-worker", "wk-jobs"];
/// The shipped user units.
pub const USER_UNITS: &[&str] = &[
    "watchkeeper-daemon.service",
    "watchkeeper-daemon.socket",
    "watchkeeper-worker.service",
    "watchkeeper-worker@.service",
];
/// The shipped system units.
pub const SYSTEM_UNITS: &[&str] = USER_UNITS;

pub const DAEMON: &str = "watchkeeper-daemon.service";
pub const SOCKET: &str = "watchkeeper-daemon.socket";
pub const WORKER: &str = "watchkeeper-worker.service";

/// The package that builds each of [`BINARIES`].
const PACKAGES: &[(&str, &str)] = &[
    ("watchkeeper-daemon", "watchkeeper-daemon"),
    ("watchkeeper-worker", "watchkeeper-worker"),
    ("wk-jobs", "watchkeeper-jobs"),
    ("watchkeeper", "watchkeeper-cli"),
    ("wk-fake-manager", "watchkeeper-testkit"),
    ("wk-notify-script", "watchkeeper-testkit"),
];

/// `target/PROFILE`, the directory of the running test binary's parent
/// (`target/PROFILE/deps/TEST-HASH`).
fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    exe.parent()
        .filter(|d| d.ends_with("deps"))
        .and_then(Path::parent)
        .map(Path::to_owned)
        .with_context(|| format!("{} is not in target/PROFILE/deps", exe.display()))
}

/// `target/PROFILE/NAME`, next to the running test binary's `deps` directory.
///
/// `cargo test --workspace` builds the binaries of the packages that have integration tests
/// (all three do). A binary still missing (e.g. after `cargo test --test e2e_…` on a clean
/// tree) is built here, once, with `$CARGO build -p PACKAGE --bin NAME` into the same target
/// directory and profile; if that fails (or the test does not run under cargo) the error says
/// what to build. Binaries older than the sources under `crates/`
/// only get a warning: run `cargo test --workspace` (not only `--test e2e_…`) after a change.
///
/// With `WK_E2E_BIN_DIR` set, `$WK_E2E_BIN_DIR/NAME` instead (never built here).
pub fn built_binary(name: &str) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("WK_E2E_BIN_DIR") {
        let path = PathBuf::from(dir).join(name);
        ensure!(
            path.is_file(),
            "{} is missing (WK_E2E_BIN_DIR): copy the built {name} there",
            path.display()
        );
        warn_if_stale(&path);
        return Ok(path);
    }
    let dir = profile_dir()?;
    let path = dir.join(name);
    if !path.is_file() {
        build_missing(name, &dir)?;
    }
    ensure!(
        path.is_file(),
        "{} is missing: the e2e tests run the built binaries; build them with \
         `cargo test --workspace` and `cargo build -p watchkeeper-jobs --bin wk-jobs`",
        path.display()
    );
    warn_if_stale(&path);
    Ok(path)
}

fn build_missing(name: &str, profile_dir: &Path) -> Result<()> {
    let Some(cargo) = std::env::var_os("CARGO") else {
        return Ok(());
    };
    let package = PACKAGES
        .iter()
        .find(|(bin, _)| *bin == name)
        .map(|(_, p)| *p)
        .with_context(|| format!("no package known for {name}"))?;
    let target_dir = profile_dir.parent().context("no target dir")?;
    let mut cmd = std::process::Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        package,
        "--bin",
        name,
        "--target-dir",
    ])
    .arg(target_dir)
    .current_dir(ROOT);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
        None => bail!("odd profile dir {}", profile_dir.display()),
    }
    eprintln!("{name} is not built (cargo test --workspace does not build it): {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed ({status})");
    Ok(())
}

fn warn_if_stale(binary: &Path) {
    fn newest(dir: &Path) -> Option<std::time::SystemTime> {
        let mut latest = None;
        for e in fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            let t = if p.is_dir() {
                newest(&p)
            } else {
                e.metadata().ok()?.modified().ok()
            };
            latest = latest.max(t);
        }
        latest
    }
    let Ok(built) = fs::metadata(binary).and_then(|m| m.modified()) else {
        return;
    };
    let name = binary.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let crates: &[&str] = match name {
        "wk-jobs" => &["watchkeeper-jobs"],
        "watchkeeper-daemon" => &["watchkeeper", "watchkeeper-jobs", "watchkeeper-daemon"],
        _ => &["watchkeeper", "watchkeeper-jobs", "watchkeeper-worker"],
    };
    let sources = crates
        .iter()
        .filter_map(|c| newest(&Path::new(ROOT).join("crates").join(c).join("src")))
        .max();
    if sources.is_some_and(|s| s > built) {
        eprintln!(
            "warning: {} is older than the sources under crates/: the e2e tests run the \
             binary as built; run `cargo test --workspace` to rebuild it",
            binary.display()
        );
    }
}

/// A private user manager with watchkeeper installed.
#[derive(Debug)]
pub struct Wk {
    pub um: UserManager,
}

impl std::ops::Deref for Wk {
    type Target = UserManager;
    fn deref(&self) -> &UserManager {
        &self.um
    }
}

impl Wk {
    /// Starts a manager and installs binaries, units and configurations; `Ok(None)` when
    /// [`UserManager::start`] skips. `daemon_toml`/`worker_toml` replace the shipped
    /// configurations when given.
    pub fn start(daemon_toml: Option<&str>, worker_toml: Option<&str>) -> Result<Option<Wk>> {
        let Some(um) = UserManager::start()? else {
            return Ok(None);
        };
        // (A missing binary fails the test here; dropping `um` stops the manager.)
        let binaries = BINARIES
            .iter()
            .map(|b| built_binary(b))
            .collect::<Result<Vec<_>>>()?;
        let wk = Wk { um };
        let bin = wk.user_home().join(".local/bin");
        wk.mkdir_user(&bin)?;
        for src in &binaries {
            let dest = bin.join(src.file_name().context("binary name")?);
            wk.claim(&dest, false)?;
            fs::copy(src, &dest)
                .with_context(|| format!("copy {} -> {}", src.display(), dest.display()))?;
            wk.own(&dest, 0o755)?;
        }
        for unit in USER_UNITS {
            let text = read_contrib(&format!("systemd/user/{unit}"))?;
            wk.write_user_file(&wk.unit_dir().join(unit), &text)?;
        }
        wk.write_config(
            "daemon.toml",
            &daemon_toml.map_or_else(|| read_contrib("config/daemon.toml"), |s| Ok(s.into()))?,
        )?;
        wk.write_config(
            "worker.toml",
            &worker_toml.map_or_else(|| read_contrib("config/worker.toml"), |s| Ok(s.into()))?,
        )?;
        wk.systemctl_ok(["daemon-reload"])?;
        Ok(Some(wk))
    }

    /// Creates `dir` and its missing parents below the home, owned by the user.
    pub fn mkdir_user(&self, dir: &Path) -> Result<()> {
        let home = self.user_home().to_owned();
        ensure!(
            dir.starts_with(&home),
            "{} is not below {}",
            dir.display(),
            home.display()
        );
        let mut p = home;
        for c in dir.strip_prefix(self.user_home())?.components() {
            p.push(c);
            if !p.exists() {
                self.claim(&p, true)?;
                fs::create_dir(&p).with_context(|| format!("mkdir {}", p.display()))?;
                self.own(&p, 0o755)?;
            }
        }
        Ok(())
    }

    fn own(&self, path: &Path, mode: u32) -> Result<()> {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", path.display()))?;
        std::os::unix::fs::chown(path, Some(self.uid()), Some(self.gid()))
            .with_context(|| format!("chown {}", path.display()))
    }

    /// Writes a file below the home (parents created), owned by the user, mode 0644.
    pub fn write_user_file(&self, path: &Path, text: &str) -> Result<()> {
        self.mkdir_user(path.parent().context("no parent")?)?;
        // Write a new file and rename it over the old one: a reader never sees half of it.
        let tmp = path.with_extension("e2e-tmp");
        self.claim(&tmp, false)?;
        self.claim(path, false)?;
        fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        self.own(&tmp, 0o644)?;
        fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
    }

    /// `~/.config/watchkeeper` (`%E/watchkeeper`), where the units read their configuration.
    pub fn config_dir(&self) -> PathBuf {
        self.user_home().join(".config/watchkeeper")
    }

    /// Writes `~/.config/watchkeeper/NAME`.
    pub fn write_config(&self, name: &str, text: &str) -> Result<()> {
        self.write_user_file(&self.config_dir().join(name), text)
    }

    /// Writes the drop-in `~/.config/systemd/user/UNIT.d/50-e2e.conf` and reloads the manager.
    /// For a template instance (`NAME@INST.service`) pass the template (`NAME@.service`) to
    /// affect every instance.
    pub fn drop_in(&self, unit: &str, text: &str) -> Result<()> {
        let path = self.unit_dir().join(format!("{unit}.d/50-e2e.conf"));
        self.write_user_file(&path, text)?;
        self.systemctl_ok(["daemon-reload"])?;
        Ok(())
    }

    /// The worker's `StateDirectory=watchkeeper-worker`: `~/.config/watchkeeper-worker` for a
    /// 252 user unit (newer managers use `~/.local/state`; whichever exists is returned).
    pub fn worker_state_dir(&self) -> PathBuf {
        let newer = self.user_home().join(".local/state/watchkeeper-worker");
        if newer.is_dir() {
            newer
        } else {
            self.user_home().join(".config/watchkeeper-worker")
        }
    }

    /// The daemon's socket inside the namespace.
    pub fn socket_path(&self) -> String {
        format!("{}/watchkeeper-daemon.sock", self.runtime_dir().display())
    }

    /// `wk-jobs --socket SOCKET ARGS...` as the user inside the namespace; stdout, or an
    /// error with stderr.
    pub fn wk_jobs(&self, args: &[&str]) -> Result<String> {
        let bin = self.user_home().join(".local/bin/wk-jobs");
        let mut all = vec!["--socket".to_owned(), self.socket_path()];
        all.extend(args.iter().map(|s| (*s).to_owned()));
        let out = self.run(&bin, &all);
        ensure!(
            out.status.success(),
            "wk-jobs {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `wk-jobs stats`, parsed.
    pub fn stats(&self) -> Result<HashMap<String, u64>> {
        let text = self.wk_jobs(&["stats"])?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("stats: {text}"))?;
        v.as_object()
            .with_context(|| format!("stats is not an object: {text}"))?
            .iter()
            .map(|(k, v)| {
                Ok((
                    k.clone(),
                    v.as_u64().with_context(|| format!("stats.{k}: {text}"))?,
                ))
            })
            .collect()
    }

    /// A unit's `MainPID` (0 when none).
    pub fn main_pid(&self, unit: &str) -> u32 {
        let p = self.show(unit, &["MainPID"]);
        p["MainPID"].parse().unwrap_or(0)
    }

    /// A numeric property (timestamps in µs, counters).
    pub fn prop_u64(&self, unit: &str, prop: &str) -> Result<u64> {
        let p = self.try_show(unit, &[prop])?;
        let v = p
            .get(prop)
            .with_context(|| format!("{unit} has no {prop}"))?;
        v.parse()
            .with_context(|| format!("{unit}: {prop}={v:?} is not a number"))
    }

    /// Asserts `ActiveState=active SubState=running` of `unit`.
    pub fn assert_running(&self, unit: &str) -> Result<HashMap<String, String>> {
        let p = self.show(
            unit,
            &[
                "ActiveState",
                "SubState",
                "StatusText",
                "MainPID",
                "NRestarts",
                "Result",
            ],
        );
        ensure!(
            p["ActiveState"] == "active" && p["SubState"] == "running",
            "{unit} is not active (running): {p:?}\n{}",
            self.journal(unit)
        );
        Ok(p)
    }

    /// The heartbeat file of a worker (`heartbeat.json` or `heartbeat-INSTANCE.json`).
    pub fn heartbeat(&self, file: &str) -> Result<Option<Heartbeat>> {
        let path = self.worker_state_dir().join(file);
        let st = check_heartbeat(&path, Duration::from_secs(3600))
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(st.heartbeat)
    }

    /// The journal of a user unit as JSON entries (all of them since the manager was started
    /// or taken, oldest first).
    pub fn journal_json(&self, unit: &str) -> Result<Vec<serde_json::Value>> {
        let mut args: Vec<String> = ["--user", "-u", unit, "--no-pager", "-o", "json", "--all"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        args.extend(self.journal_args());
        let out = self.run("journalctl", &args);
        ensure!(
            out.status.success(),
            "journalctl --user -u {unit}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("journal line: {l}")))
            .collect()
    }

    /// Polls `journal_json(unit)` until an entry whose `MESSAGE` contains `needle` shows up;
    /// returns the first such entry.
    pub fn wait_journal(
        &self,
        unit: &str,
        needle: &str,
        deadline: Duration,
    ) -> Result<serde_json::Value> {
        let t0 = Instant::now();
        loop {
            if let Some(e) = self
                .journal_json(unit)?
                .into_iter()
                .find(|e| message(e).contains(needle))
            {
                return Ok(e);
            }
            if t0.elapsed() >= deadline {
                bail!(
                    "no journal entry of {unit} containing {needle:?} within {deadline:?}:\n{}",
                    self.journal(unit)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls `check` (every 50 ms) until it returns `Some`, or fails after `deadline` with
    /// `what` and the journal of `unit`.
    pub fn poll<T>(
        &self,
        what: &str,
        unit: &str,
        deadline: Duration,
        mut check: impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        let t0 = Instant::now();
        let mut last_err = None;
        loop {
            match check() {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => last_err = Some(e),
            }
            if t0.elapsed() >= deadline {
                bail!(
                    "{what}: not within {deadline:?} (last error: {})\njournal of {unit}:\n{}",
                    last_err.map_or_else(|| "none".to_owned(), |e| format!("{e:#}")),
                    self.journal(unit)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A journal entry's `MESSAGE` (text; a byte-array message is decoded lossily).
pub fn message(entry: &serde_json::Value) -> String {
    field(entry, "MESSAGE")
}

/// A journal entry's field as text.
pub fn field(entry: &serde_json::Value, name: &str) -> String {
    match &entry[name] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(bytes) => String::from_utf8_lossy(
            &bytes
                .iter()
                .filter_map(|b| b.as_u64().map(|b| b as u8))
                .collect::<Vec<_>>(),
        )
        .into_owned(),
        _ => String::new(),
    }
}

/// A journal entry's `__MONOTONIC_TIMESTAMP` (µs, CLOCK_MONOTONIC of this boot).
pub fn monotonic_us(entry: &serde_json::Value) -> Result<u64> {
    let s = field(entry, "__MONOTONIC_TIMESTAMP");
    s.parse()
        .with_context(|| format!("__MONOTONIC_TIMESTAMP {s:?} in {entry}"))
}

/// CLOCK_MONOTONIC now, in µs (the clock of systemd's `*TimestampMonotonic` properties).
pub fn now_monotonic_us() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1000
}

/// A file of `contrib/`.
pub fn read_contrib(rel: &str) -> Result<String> {
    let path = Path::new(ROOT).join("contrib").join(rel);
    fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// Runs `status_json` (one `watchkeeper status --json`: its exit code and stdout) every 200 ms
/// until it exits 0 with `overall_health` healthy; the report, or an error with the last one
/// after `deadline`.
pub fn wait_status_healthy(
    deadline: Duration,
    mut status_json: impl FnMut() -> (i32, String),
) -> Result<serde_json::Value> {
    let t0 = Instant::now();
    loop {
        let (code, stdout) = status_json();
        let v: serde_json::Value =
            serde_json::from_str(stdout.trim()).with_context(|| stdout.clone())?;
        if code == 0 && v["overall_health"] == "healthy" {
            return Ok(v);
        }
        ensure!(
            t0.elapsed() < deadline,
            "not healthy within {deadline:?}: {v:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
