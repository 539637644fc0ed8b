//! End to end, under a real `systemd --user`: `watchkeeper doctor` finds each planted fault of
//! the runbook, one line each with the command that fixes it, and nothing on a sound
//! installation.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, ensure};
use support::wk::{DAEMON, SOCKET, Wk, built_binary};

const DEADLINE: Duration = Duration::from_secs(60);
const ALPHA: &str = "watchkeeper-worker@alpha.service";

/// Linger is logind's file; the test enables it by hand (no logind here) and removes it.
struct Linger(PathBuf);
impl Drop for Linger {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn doctor(wk: &Wk, bin: &Path, extra: &[&str]) -> (i32, Vec<String>) {
    let mut args = vec!["doctor"];
    args.extend(extra);
    let o = wk.run(bin, &args);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    eprintln!(
        "$ watchkeeper {}\n{text}{}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    (
        o.status.code().unwrap_or(-1),
        text.lines().map(str::to_owned).collect(),
    )
}

/// `watchkeeper doctor` where the user bus is not there (the systemd manager still answers on
/// its own socket, as `systemctl --user` finds it without a bus).
fn doctor_without_bus(wk: &Wk, bin: &Path) -> (i32, Vec<String>) {
    let o = wk.run(
        "env",
        [
            "DBUS_SESSION_BUS_ADDRESS=unix:path=/nonexistent/bus".as_ref(),
            bin.as_os_str(),
            "doctor".as_ref(),
        ],
    );
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    eprintln!(
        "$ env DBUS_SESSION_BUS_ADDRESS=unix:path=/nonexistent/bus watchkeeper doctor\n{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    (
        o.status.code().unwrap_or(-1),
        text.lines().map(str::to_owned).collect(),
    )
}

/// `watchkeeper doctor` as the user, in a mount namespace of its own below the manager's whose
/// `/run` is a fresh tmpfs holding only the manager's `/run/user` and `/run/systemd`: a host
/// without `/run/credentials`, as doctor sees it (the manager keeps its own). The namespace is
/// entered through the holder process the harness records in `STATE_DIR/holder.pid`; it and
/// its mounts end with the command. `None` with the caller's own manager (this needs root).
fn doctor_without_run_credentials(wk: &Wk, bin: &Path) -> Result<Option<(i32, Vec<String>)>> {
    if wk.is_own() {
        eprintln!("not planting a missing /run/credentials: needs the private manager (root)");
        return Ok(None);
    }
    let holder = fs::read_to_string(wk.state_dir().join("holder.pid"))?;
    let holder = holder
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    let new_run = wk.state_dir().join("run-without-credentials");
    if !new_run.exists() {
        fs::create_dir(&new_run)?;
    }
    let script = r#"set -e
new=$1 uid=$2 gid=$3 home=$4 user=$5 bin=$6
mount -n -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$new"
mkdir "$new/user" "$new/systemd"
mount -n --rbind /run/user "$new/user"
mount -n --rbind /run/systemd "$new/systemd"
mount -n --move "$new" /run
test ! -e /run/credentials
cd "$home"
exec setpriv --reuid="$uid" --regid="$gid" --init-groups -- env -i HOME="$home" USER="$user" \
    LOGNAME="$user" PATH=/usr/local/bin:/usr/bin:/bin XDG_RUNTIME_DIR="/run/user/$uid" \
    LANG=C.UTF-8 "$bin" doctor"#;
    let o = std::process::Command::new("nsenter")
        .args([
            "-t",
            &holder,
            "-m",
            "--",
            "unshare",
            "-m",
            "--propagation",
            "private",
        ])
        .args(["--", "sh", "-c", script, "sh"])
        .arg(&new_run)
        .arg(wk.uid().to_string())
        .arg(wk.gid().to_string())
        .arg(wk.user_home())
        .arg(wk.user_name())
        .arg(bin)
        .stdin(std::process::Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    eprintln!(
        "$ watchkeeper doctor (no /run/credentials)\n{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(Some((
        o.status.code().unwrap_or(-1),
        text.lines().map(str::to_owned).collect(),
    )))
}

/// Asserts that a finding containing `needle` is there, with a fix containing `fix`.
fn has(lines: &[String], needle: &str, fix: &str) -> Result<()> {
    ensure!(
        lines.iter().any(|l| l.contains(needle)
            && l.split_once(": fix: ")
                .is_some_and(|(_, f)| f.contains(fix))),
        "no finding {needle:?} with fix {fix:?} in {lines:#?}"
    );
    Ok(())
}

/// The shipped worker units load `github-token`: a sound installation has its file, 0600 in a
/// 0700 directory, owned by the user.
fn provide_github_token(wk: &Wk) -> Result<PathBuf> {
    let creds = wk.config_dir().join("credentials");
    let file = creds.join("github-token");
    wk.write_user_file(&file, "ghp_doctorNeverPrintsIt\n")?;
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600))?;
    fs::set_permissions(&creds, fs::Permissions::from_mode(0o700))?;
    Ok(file)
}

fn clean(wk: &Wk, bin: &Path) -> Result<()> {
    let (code, lines) = doctor(wk, bin, &[]);
    ensure!(code == 0 && lines == ["no findings"], "{code}: {lines:#?}");
    Ok(())
}

#[test]
fn doctor_finds_each_planted_fault() -> Result<()> {
    let Some(wk) = Wk::start(None, None)? else {
        return Ok(());
    };
    let bin = wk.install_binary(&built_binary("watchkeeper")?);
    provide_github_token(&wk)?;
    wk.systemctl_ok(["start", SOCKET, DAEMON, ALPHA])?;
    wk.wait_for(ALPHA, "ActiveState", "active", DEADLINE)?;

    // Linger off (no logind file for the user).
    let (code, lines) = doctor(&wk, &bin, &[]);
    ensure!(code == 4, "exit {code}");
    has(
        &lines,
        "linger is off",
        &format!("loginctl enable-linger {}", wk.user_name()),
    )?;
    fs::create_dir_all("/var/lib/systemd/linger")?;
    let linger = Linger(Path::new("/var/lib/systemd/linger").join(wk.user_name()));
    fs::write(&linger.0, "")?;
    clean(&wk, &bin)?;

    // A configuration that does not parse: the parser's error on one line.
    let worker_toml = wk.config_dir().join("worker.toml");
    let good = fs::read_to_string(&worker_toml)?;
    wk.write_config("worker.toml", "poll_interval_ms = \"soon\"\n")?;
    let (code, lines) = doctor(&wk, &bin, &[]);
    ensure!(code == 4);
    has(&lines, "worker.toml does not parse: ", "edit ")?;
    ensure!(
        lines.iter().any(|l| l.contains("poll_interval_ms")),
        "{lines:#?}"
    );
    wk.write_config("worker.toml", &good)?;

    // Credentials: directory and file modes, a missing one.
    let creds = wk.config_dir().join("credentials");
    fs::write(creds.join("token"), "s3cr3t-value\n")?;
    fs::set_permissions(&creds, fs::Permissions::from_mode(0o755))?;
    fs::set_permissions(creds.join("token"), fs::Permissions::from_mode(0o644))?;
    for p in [creds.clone(), creds.join("token")] {
        std::os::unix::fs::chown(&p, Some(wk.uid()), Some(wk.gid()))?;
    }
    let (code, lines) = doctor(
        &wk,
        &bin,
        &["--credential", "absent", "--credential", "token"],
    );
    ensure!(code == 4);
    has(
        &lines,
        "has mode 0755, not 0700",
        &format!("chmod 0700 {}", creds.display()),
    )?;
    has(
        &lines,
        "has mode 0644, not 0600",
        &format!("chmod 0600 {}", creds.join("token").display()),
    )?;
    has(&lines, "credential absent is missing", "install -m 0600")?;
    ensure!(lines.len() == 3, "{lines:#?}");
    ensure!(
        !lines.iter().any(|l| l.contains("s3cr3t-value")),
        "a secret in the output"
    );
    fs::set_permissions(&creds, fs::Permissions::from_mode(0o700))?;
    fs::set_permissions(creds.join("token"), fs::Permissions::from_mode(0o600))?;
    let (code, lines) = doctor(&wk, &bin, &["--credential", "token"]);
    ensure!(code == 0, "{lines:#?}");

    // The heartbeat directory is not writable.
    let hb = wk.worker_state_dir();
    fs::set_permissions(&hb, fs::Permissions::from_mode(0o500))?;
    let (code, lines) = doctor(&wk, &bin, &[]);
    fs::set_permissions(&hb, fs::Permissions::from_mode(0o700))?;
    ensure!(code == 4);
    has(
        &lines,
        "heartbeat directory",
        &format!("chmod 0700 {}", hb.display()),
    )?;

    // The socket file is gone while the socket unit is active; the fix brings it back.
    let out = wk.run("rm", [wk.socket_path()]);
    ensure!(out.status.success());
    let (_, lines) = doctor(&wk, &bin, &[]);
    has(
        &lines,
        "is missing",
        "systemctl --user restart watchkeeper-daemon.socket",
    )?;
    wk.systemctl_ok(["restart", SOCKET])?;
    wk.systemctl_ok(["start", DAEMON])?;
    clean(&wk, &bin)?;

    // A unit file changed without daemon-reload.
    let template = wk.unit_dir().join("watchkeeper-worker@.service");
    let text = fs::read_to_string(&template)?;
    wk.write_user_file(&template, &format!("{text}# changed\n"))?;
    let (_, lines) = doctor(&wk, &bin, &[]);
    has(&lines, "changed on disk", "systemctl --user daemon-reload")?;
    wk.systemctl_ok(["daemon-reload"])?;

    // The worker is stuck activating: the socket cannot listen (a directory took its path),
    // the broker is unreachable.
    wk.systemctl_ok(["stop", ALPHA, DAEMON, SOCKET])?;
    ensure!(wk.run("mkdir", [wk.socket_path()]).status.success());
    wk.systemctl_ok(["start", "--no-block", ALPHA])?;
    wk.wait_for(ALPHA, "ActiveState", "activating", DEADLINE)?;
    let lines = wk.poll("stuck activating", ALPHA, DEADLINE, || {
        let (_, lines) = doctor(&wk, &bin, &[]);
        Ok(lines
            .iter()
            .any(|l| l.contains("stuck activating"))
            .then_some(lines))
    })?;
    has(
        &lines,
        "is stuck activating: the broker",
        "systemctl --user start watchkeeper-daemon.socket",
    )?;
    has(
        &lines,
        "watchkeeper-daemon.socket failed",
        "systemctl --user reset-failed watchkeeper-daemon.socket",
    )?;
    ensure!(wk.run("rmdir", [wk.socket_path()]).status.success());
    wk.systemctl_ok(["reset-failed", SOCKET])?;
    wk.systemctl_ok(["start", SOCKET, DAEMON])?;
    wk.wait_for(ALPHA, "ActiveState", "active", DEADLINE)?;
    clean(&wk, &bin)?;

    // A crash loop of the daemon ends in its start limit; the socket fails with it.
    wk.drop_in(DAEMON, "[Service]\nExecStart=\nExecStart=/bin/false\n")?;
    let _ = wk.systemctl(["restart", DAEMON]);
    wk.wait_for(SOCKET, "Result", "service-start-limit-hit", DEADLINE)?;
    let (_, lines) = doctor(&wk, &bin, &[]);
    has(
        &lines,
        "watchkeeper-daemon.socket hit its start limit",
        "systemctl --user reset-failed watchkeeper-daemon.socket watchkeeper-daemon.service",
    )?;
    has(
        &lines,
        "watchkeeper-daemon.service failed",
        "journalctl --user -u watchkeeper-daemon.service",
    )?;
    wk.drop_in(DAEMON, "[Service]\n")?;
    wk.systemctl_ok(["reset-failed", SOCKET, DAEMON])?;
    wk.systemctl_ok(["start", SOCKET, DAEMON])?;
    wk.wait_for(DAEMON, "SubState", "running", DEADLINE)?;
    wk.wait_for(ALPHA, "ActiveState", "active", DEADLINE)?;
    let (code, lines) = doctor(&wk, &bin, &[]);
    ensure!(code == 0, "{lines:#?}");

    // A unit not found.
    fs::remove_file(wk.unit_dir().join("watchkeeper-worker.service"))?;
    wk.systemctl_ok(["daemon-reload"])?;
    let (code, lines) = doctor(&wk, &bin, &[]);
    ensure!(code == 4);
    has(
        &lines,
        "watchkeeper-worker.service not found",
        "watchkeeper install --user",
    )?;
    drop(linger);
    Ok(())
}

const BETA: &str = "watchkeeper-worker@beta.service";
const WORKER: &str = "watchkeeper-worker.service";

/// The worker units' own credentials: doctor reads `LoadCredential=` from the loaded units and
/// checks each file (missing, modes, owner) once, while the unit runs on the `SetCredential=`
/// fallback.
#[test]
fn doctor_checks_the_credentials_the_units_load() -> Result<()> {
    let Some(wk) = Wk::start(None, None)? else {
        return Ok(());
    };
    let bin = wk.install_binary(&built_binary("watchkeeper")?);
    fs::create_dir_all("/var/lib/systemd/linger")?;
    let linger = Linger(Path::new("/var/lib/systemd/linger").join(wk.user_name()));
    fs::write(&linger.0, "")?;
    // A unit that loads no credential (an empty LoadCredential= resets the shipped list):
    // neither a missing user bus nor a missing /run/credentials matters.
    for unit in ["watchkeeper-worker.service", "watchkeeper-worker@.service"] {
        wk.drop_in(unit, "[Service]\nLoadCredential=\nSetCredential=\n")?;
    }
    let (code, lines) = doctor_without_bus(&wk, &bin);
    ensure!(code == 0 && lines == ["no findings"], "{code}: {lines:#?}");
    if let Some((code, lines)) = doctor_without_run_credentials(&wk, &bin)? {
        ensure!(code == 0 && lines == ["no findings"], "{code}: {lines:#?}");
    }
    // The shipped units again, with their credential's file in place.
    for unit in ["watchkeeper-worker.service", "watchkeeper-worker@.service"] {
        fs::remove_file(wk.unit_dir().join(format!("{unit}.d/50-e2e.conf")))?;
    }
    wk.systemctl_ok(["daemon-reload"])?;
    provide_github_token(&wk)?;
    let creds = wk.config_dir().join("job-credentials");
    let token = creds.join("token");
    wk.drop_in(
        "watchkeeper-worker@.service",
        &format!(
            "[Service]\nLoadCredential=token:{}\nSetCredential=token:missing\n",
            token.display()
        ),
    )?;
    // The workers hand `token` to jobs: its file matters (github-token, loaded too, does not).
    let worker_toml = support::wk::read_contrib("config/worker.toml")?;
    wk.write_config(
        "worker.toml",
        &format!("{worker_toml}credentials = [\"token\"]\n"),
    )?;
    wk.systemctl_ok(["start", SOCKET, DAEMON, ALPHA, BETA])?;
    wk.wait_for(ALPHA, "ActiveState", "active", DEADLINE)?;
    wk.wait_for(BETA, "ActiveState", "active", DEADLINE)?;

    // The file (and its directory) missing: one finding for both instances, naming them and
    // the path, with the command that creates both.
    let (code, lines) = doctor(&wk, &bin, &[]);
    ensure!(code == 4, "exit {code}: {lines:#?}");
    has(
        &lines,
        &format!(
            "credential token of {ALPHA}, {BETA} is missing: no {}",
            token.display()
        ),
        &format!(
            "install -d -m 0700 {} && install -m 0600 /dev/stdin {}",
            creds.display(),
            token.display()
        ),
    )?;
    ensure!(lines.len() == 1, "{lines:#?}");

    // Meanwhile the unit runs: systemd uses the SetCredential= fallback, no crash loop.
    wk.systemctl_ok(["restart", ALPHA])?;
    wk.wait_for(ALPHA, "ActiveState", "active", DEADLINE)?;
    let p = wk.assert_running(ALPHA)?;
    ensure!(p["NRestarts"] == "0", "{p:?}");

    // Wrong modes of the directory and the file; never the secret in the output.
    fs::create_dir(&creds)?;
    fs::write(&token, "s3cr3t-value\n")?;
    fs::set_permissions(&creds, fs::Permissions::from_mode(0o755))?;
    fs::set_permissions(&token, fs::Permissions::from_mode(0o640))?;
    for p in [&creds, &token] {
        std::os::unix::fs::chown(p, Some(wk.uid()), Some(wk.gid()))?;
    }
    let (code, lines) = doctor(&wk, &bin, &[]);
    ensure!(code == 4, "exit {code}: {lines:#?}");
    has(
        &lines,
        "has mode 0755, not 0700",
        &format!("chmod 0700 {}", creds.display()),
    )?;
    has(
        &lines,
        "has mode 0640, not 0600",
        &format!("chmod 0600 {}", token.display()),
    )?;
    ensure!(lines.len() == 2, "{lines:#?}");
    ensure!(
        !lines.iter().any(|l| l.contains("s3cr3t-value")),
        "a secret in the output"
    );

    // The file owned by someone else (root): the manager, running as the user, cannot read it.
    fs::set_permissions(&creds, fs::Permissions::from_mode(0o700))?;
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600))?;
    std::os::unix::fs::chown(&token, Some(0), Some(0))?;
    let (code, lines) = doctor(&wk, &bin, &[]);
    ensure!(code == 4, "exit {code}: {lines:#?}");
    has(
        &lines,
        &format!(
            "the credential {} is owned by uid 0, not {}",
            token.display(),
            wk.uid()
        ),
        &format!("chown {} {}", wk.uid(), token.display()),
    )?;
    ensure!(lines.len() == 1, "{lines:#?}");

    // All fine: no findings, and the unit starts with the file.
    std::os::unix::fs::chown(&token, Some(wk.uid()), Some(wk.gid()))?;
    clean(&wk, &bin)?;
    wk.systemctl_ok(["restart", ALPHA])?;
    wk.assert_running(ALPHA)?;
    clean(&wk, &bin)?;

    // worker.toml lists a credential no unit loads: the jobs asking for it would be denied.
    wk.write_config(
        "worker.toml",
        &format!("{worker_toml}credentials = [\"token\", \"nowhere\"]\n"),
    )?;
    let (code, lines) = doctor(&wk, &bin, &[]);
    ensure!(code == 4, "exit {code}: {lines:#?}");
    has(
        &lines,
        "lists credential nowhere, but no worker unit loads it",
        "add LoadCredential=nowhere:PATH to the worker units: systemctl --user edit",
    )?;
    ensure!(lines.len() == 1, "{lines:#?}");
    wk.write_config(
        "worker.toml",
        &format!("{worker_toml}credentials = [\"token\"]\n"),
    )?;
    clean(&wk, &bin)?;

    // Where /run/credentials is missing, the units that load credentials would not start.
    if let Some((code, lines)) = doctor_without_run_credentials(&wk, &bin)? {
        ensure!(code == 4, "exit {code}: {lines:#?}");
        has(
            &lines,
            &format!("{ALPHA}, {BETA} load credentials but /run/credentials is missing"),
            "sudo install -d -m 0755 /run/credentials",
        )?;
        ensure!(lines.len() == 1, "{lines:#?}");
    }

    // Without a bus to read the property from, doctor says so instead of passing silently.
    let (code, lines) = doctor_without_bus(&wk, &bin);
    ensure!(code == 4, "exit {code}: {lines:#?}");
    has(
        &lines,
        &format!("cannot read LoadCredential= of {WORKER}, {ALPHA}, {BETA}: "),
        "dbus-user-session",
    )?;
    ensure!(lines.len() == 1, "{lines:#?}");

    // A relative path names a credential of the manager itself: not a file doctor can check.
    wk.drop_in(
        "watchkeeper-worker@.service",
        &format!(
            "[Service]\nLoadCredential=token:{}\nLoadCredential=inherited:from-manager\n\
             SetCredential=token:missing\n",
            token.display()
        ),
    )?;
    let o = wk.run(
        "busctl",
        [
            "--user",
            "get-property",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1/unit/watchkeeper_2dworker_40alpha_2eservice",
            "org.freedesktop.systemd1.Service",
            "LoadCredential",
        ],
    );
    let text = String::from_utf8_lossy(&o.stdout);
    ensure!(
        text.contains("\"inherited\" \"from-manager\""),
        "the relative LoadCredential= is not loaded: {text}"
    );
    clean(&wk, &bin)?;
    drop(linger);
    Ok(())
}
