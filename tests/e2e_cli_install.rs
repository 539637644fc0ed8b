//! End to end, under a real `systemd --user`: `watchkeeper install --user --enable --now` from
//! a directory of built binaries, then `status` says healthy; a second install changes nothing;
//! a locally changed unit is refused without `--force`; a new build becomes a new version and
//! `rollback` runs the previous binary again; `uninstall` leaves no unit behind and keeps the
//! state, `--purge` removes it; no manager and no linger fail with a clear message.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;
use support::user_manager::UserManager;
use support::wk::built_binary;

const DEADLINE: Duration = Duration::from_secs(30);
const BINARIES: &[&str] = &[
    "watchkeeper-daemon",
    "watchkeeper-worker",
    "wk-jobs",
    "watchkeeper",
];
const WORKER: &str = "watchkeeper-worker.service";

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn cli(um: &UserManager, bin: &Path, args: &[&str]) -> Out {
    let o = um.run(bin, args);
    let out = Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    };
    eprintln!(
        "$ watchkeeper {}\n{}{}(exit {})",
        args.join(" "),
        out.stdout,
        out.stderr,
        out.code
    );
    out
}

/// A directory of the binaries, readable by the user; `extra` is appended to the worker
/// (a different build of the same program).
fn bin_dir(um: &UserManager, name: &str, extra: &[u8]) -> Result<PathBuf> {
    let dir = um.state_dir().join(name);
    fs::create_dir_all(&dir)?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
    for b in BINARIES {
        let mut bytes = fs::read(built_binary(b)?)?;
        if *b == "watchkeeper-worker" {
            bytes.extend_from_slice(extra);
        }
        fs::write(dir.join(b), bytes)?;
        fs::set_permissions(dir.join(b), fs::Permissions::from_mode(0o755))?;
    }
    Ok(dir)
}

fn wait_healthy(um: &UserManager, bin: &Path) -> Result<Value> {
    support::wk::wait_status_healthy(DEADLINE, || {
        let o = cli(um, bin, &["status", "--json"]);
        (o.code, o.stdout)
    })
}

/// The directory of the worker's running executable.
fn worker_exe_dir(um: &UserManager) -> Result<String> {
    let p = um.show(WORKER, &["MainPID"]);
    let pid: u32 = p["MainPID"].parse()?;
    ensure!(pid > 0, "{WORKER} has no MainPID");
    let exe = fs::read_link(format!("/proc/{pid}/exe"))?;
    Ok(exe.parent().context("exe dir")?.display().to_string())
}

#[test]
fn install_status_rollback_uninstall() -> Result<()> {
    let Some(um) = UserManager::start()? else {
        return Ok(());
    };
    let v1 = bin_dir(&um, "build-1", b"")?;
    let bin = v1.join("watchkeeper");
    let home = um.user_home().to_owned();
    let units = um.unit_dir();

    // No manager: a clear message, exit 3, nothing written.
    let o = um.run(
        "env",
        [
            "XDG_RUNTIME_DIR=/nonexistent",
            &bin.display().to_string(),
            "install",
            "--user",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(
        o.status.code() == Some(3) && err.contains("no user service manager answers"),
        "{err}"
    );
    ensure!(!units.join("watchkeeper-daemon.service").exists());

    // No logind here: linger cannot be enabled, and the message names the command.
    let o = cli(
        &um,
        &bin,
        &[
            "install",
            "--user",
            "--linger",
            "--bin-dir",
            &v1.display().to_string(),
        ],
    );
    ensure!(
        o.code == 5 && o.stderr.contains("loginctl enable-linger"),
        "{}",
        o.stderr
    );

    let o = cli(
        &um,
        &bin,
        &[
            "install",
            "--user",
            "--enable",
            "--now",
            "--bin-dir",
            &v1.display().to_string(),
        ],
    );
    ensure!(o.code == 0, "{}", o.stderr);
    for u in [
        "watchkeeper-daemon.service",
        "watchkeeper-daemon.socket",
        "watchkeeper-worker@.service",
        "watchkeeper-metrics.timer",
    ] {
        let text = fs::read_to_string(units.join(u))?;
        ensure!(
            !text.contains("%h/.local/bin"),
            "{u}: binary path not filled in"
        );
    }
    let daemon = fs::read_to_string(units.join("watchkeeper-daemon.service"))?;
    ensure!(
        daemon.contains(&format!(
            "{}/.local/lib/watchkeeper/current/watchkeeper-daemon",
            home.display()
        )),
        "{daemon}"
    );
    for c in ["daemon.toml", "worker.toml", "daemon.env", "worker.env"] {
        ensure!(
            home.join(".config/watchkeeper").join(c).is_file(),
            "{c} missing"
        );
    }
    let v = wait_healthy(&um, &bin)?;
    ensure!(v["services"].as_array().map(Vec::len) == Some(3), "{v}");
    let first = worker_exe_dir(&um)?;
    ensure!(
        first.contains("/.local/lib/watchkeeper/versions/"),
        "{first}"
    );

    // Idempotent; and never overwrites a configuration.
    fs::write(
        home.join(".config/watchkeeper/worker.env"),
        "RUST_LOG=debug\n",
    )?;
    let o = cli(
        &um,
        &bin,
        &[
            "install",
            "--user",
            "--enable",
            "--now",
            "--bin-dir",
            &v1.display().to_string(),
        ],
    );
    ensure!(
        o.code == 0 && !o.stdout.contains("\nwrote ") && o.stdout.contains("already current"),
        "{}",
        o.stdout
    );
    ensure!(fs::read_to_string(home.join(".config/watchkeeper/worker.env"))? == "RUST_LOG=debug\n");

    // A local change is refused (exit 6) and kept; --force overwrites it.
    let unit = units.join("watchkeeper-worker.service");
    let shipped = fs::read_to_string(&unit)?;
    fs::write(&unit, format!("{shipped}# local\n"))?;
    let o = cli(
        &um,
        &bin,
        &["install", "--user", "--bin-dir", &v1.display().to_string()],
    );
    ensure!(
        o.code == 6
            && o.stderr.contains("--force")
            && o.stderr.contains("watchkeeper-worker.service"),
        "{}",
        o.stderr
    );
    ensure!(fs::read_to_string(&unit)?.ends_with("# local\n"));
    let o = cli(
        &um,
        &bin,
        &[
            "install",
            "--user",
            "--force",
            "--bin-dir",
            &v1.display().to_string(),
        ],
    );
    ensure!(
        o.code == 0 && fs::read_to_string(&unit)? == shipped,
        "{}",
        o.stderr
    );

    // A new build: a new version, the running units restarted on it, the old one kept.
    let v2 = bin_dir(&um, "build-2", b"\0second build")?;
    let o = cli(
        &um,
        &bin,
        &["install", "--user", "--bin-dir", &v2.display().to_string()],
    );
    ensure!(
        o.code == 0 && o.stdout.contains("try-restart"),
        "{}",
        o.stdout
    );
    wait_healthy(&um, &bin)?;
    let second = worker_exe_dir(&um)?;
    ensure!(
        second != first && second.contains("/versions/"),
        "{first} -> {second}"
    );
    let o = cli(&um, &bin, &["rollback", "--user"]);
    ensure!(o.code == 0, "{}", o.stderr);
    wait_healthy(&um, &bin)?;
    ensure!(
        worker_exe_dir(&um)? == first,
        "rollback did not run the previous binary"
    );

    // Uninstall: no unit left (files or loaded), the state and configurations kept.
    let o = cli(&um, &bin, &["uninstall", "--user"]);
    ensure!(o.code == 0, "{}", o.stderr);
    let left: Vec<String> = fs::read_dir(&units)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|n| n.starts_with("watchkeeper-"))
        .collect();
    ensure!(left.is_empty(), "left behind: {left:?}");
    let loaded = um.systemctl_ok([
        "list-units",
        "--all",
        "--plain",
        "--no-legend",
        "watchkeeper-*",
    ])?;
    ensure!(loaded.trim().is_empty(), "still loaded: {loaded}");
    ensure!(!home.join(".local/lib/watchkeeper").exists());
    ensure!(home.join(".config/watchkeeper/daemon.toml").is_file());
    ensure!(
        home.join(".config/watchkeeper-daemon").is_dir(),
        "the daemon's state is gone"
    );

    // --purge: no state either.
    let o = cli(
        &um,
        &bin,
        &[
            "install",
            "--user",
            "--now",
            "--bin-dir",
            &v1.display().to_string(),
        ],
    );
    ensure!(o.code == 0, "{}", o.stderr);
    let o = cli(&um, &bin, &["uninstall", "--user", "--purge"]);
    ensure!(o.code == 0, "{}", o.stderr);
    for d in [
        ".config/watchkeeper",
        ".config/watchkeeper-daemon",
        ".config/watchkeeper-worker",
        ".local/lib/watchkeeper",
    ] {
        ensure!(!home.join(d).exists(), "{d} left after --purge");
    }
    Ok(())
}
