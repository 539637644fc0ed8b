//! End to end, under a real systemd *system* manager (PID 1 of a private namespace, see
//! `tests/support/system_manager.rs`): `watchkeeper install --system --enable --now` creates the
//! `watchkeeper` user with systemd-sysusers, writes the units into `/etc/systemd/system`, and
//! the daemon and the worker run as that user with their state directories, socket and
//! configuration owned and moded as the units say; `status --system` is healthy and a job runs;
//! the shipped `LoadCredential=` hands a job its credential as a private file (and the worker
//! still starts while the file is missing); `status` run by an operator who may read neither
//! the heartbeats nor the socket leaves those facts unchecked instead of calling it degraded;
//! a second install changes nothing; `doctor` finds the daemon's socket refusing an operator's
//! uid and stops finding it once its fix is followed; `uninstall` leaves no unit behind and
//! keeps the state, `--purge` removes it. The host's `/etc`, `/usr/local` and `/var/lib` never
//! see any of it.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;
use support::system_manager::SystemManager;
use support::wk::{GITHUB_TOKEN_JOB, built_binary};

const DEADLINE: Duration = Duration::from_secs(30);
const BINARIES: &[&str] = &[
    "watchkeeper-daemon",
    "watchkeeper-worker",
    "wk-jobs",
    "watchkeeper",
];
const SOCKET: &str = "watchkeeper-daemon.socket";
const DAEMON: &str = "watchkeeper-daemon.service";
const WORKER: &str = "watchkeeper-worker.service";
const SOCKET_PATH: &str = "/run/watchkeeper-daemon.sock";
const OPERATOR: &str = "wk-operator";
const SECRET: &str = "ghp_e2eUnderTheSystemManager";

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `watchkeeper ARGS` inside the namespace, as root or as `user`.
fn cli(sm: &SystemManager, user: Option<&str>, bin: &Path, args: &[&str]) -> Out {
    let o = match user {
        Some(u) => sm.run_as(u, bin, args),
        None => sm.run(bin, args),
    };
    let out = Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    };
    eprintln!(
        "{} watchkeeper {}\n{}{}(exit {})",
        if user.is_some() { "$" } else { "#" },
        args.join(" "),
        out.stdout,
        out.stderr,
        out.code
    );
    out
}

/// `stat -c FORMAT PATH` inside.
fn stat(sm: &SystemManager, format: &str, path: &str) -> Result<String> {
    Ok(sm.run_ok("stat", ["-c", format, path])?.trim().to_owned())
}

fn exists(sm: &SystemManager, path: &str) -> bool {
    sm.run("test", ["-e", path]).status.success()
}

fn wait_healthy(sm: &SystemManager, bin: &Path) -> Result<Value> {
    support::wk::wait_status_healthy(DEADLINE, || {
        let o = cli(sm, None, bin, &["status", "--system", "--json"]);
        (o.code, o.stdout)
    })
}

fn service<'a>(status: &'a Value, unit: &str) -> Result<&'a Value> {
    status["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["unit"] == unit))
        .with_context(|| format!("{unit} is not in {status:#}"))
}

fn jobs_stats(sm: &SystemManager, wk_jobs: &Path) -> Result<Value> {
    let out = sm.run_ok(wk_jobs, ["--socket", SOCKET_PATH, "stats"])?;
    serde_json::from_str(out.trim()).with_context(|| out.clone())
}

/// On the host, outside the namespace: the files an install, sysusers or a manager would
/// change there, the names below the directories it would write, and a kernel setting systemd
/// as PID 1 raises.
fn host_snapshot() -> Result<Vec<(String, Vec<u8>)>> {
    let mut snap = Vec::new();
    for f in [
        "/etc/passwd",
        "/etc/group",
        "/etc/shadow",
        "/proc/sys/fs/file-max",
    ] {
        snap.push((f.to_owned(), std::fs::read(f).unwrap_or_default()));
    }
    for d in [
        "/etc/systemd/system",
        "/etc/sysusers.d",
        "/etc/watchkeeper",
        "/usr/local",
        "/var/lib",
    ] {
        let o = Command::new("find")
            .args([d, "-maxdepth", "3", "-name", "*watchkeeper*"])
            .output()?;
        snap.push((format!("find {d}"), o.stdout));
    }
    Ok(snap)
}

#[test]
fn system_install_status_doctor_uninstall() -> Result<()> {
    let mut bins = Vec::new();
    for b in BINARIES {
        bins.push(built_binary(b)?);
    }
    let dir: PathBuf = bins[0].parent().context("binary dir")?.to_owned();
    ensure!(
        bins.iter().all(|b| b.parent() == Some(dir.as_path())),
        "the binaries are not in one directory: {bins:?}"
    );
    let host_before = host_snapshot()?;
    let Some(sm) = SystemManager::start()? else {
        return Ok(());
    };
    let bin = dir.join("watchkeeper");
    let wk_jobs = dir.join("wk-jobs");
    let dir_s = dir.display().to_string();
    let install = [
        "install",
        "--system",
        "--enable",
        "--now",
        "--bin-dir",
        &dir_s,
    ];

    // The harness itself: the machine's kernel settings and the root file system outside the
    // overlays are out of reach from inside. (Each probe writes the value already there, so
    // that a broken harness changes nothing either.)
    for (what, cmd) in [
        (
            "fs.file-max",
            "v=$(cat /proc/sys/fs/file-max) && echo $v >/proc/sys/fs/file-max",
        ),
        (
            "/sys",
            "v=$(cat /sys/kernel/mm/ksm/run) && echo $v >/sys/kernel/mm/ksm/run",
        ),
        (
            "/usr",
            "test ! -e /usr/wk-e2e-probe && touch /usr/wk-e2e-probe && rm /usr/wk-e2e-probe",
        ),
    ] {
        let o = sm.run("sh", ["-c", cmd]);
        ensure!(
            !o.status.success(),
            "{what} is writable inside the namespace"
        );
    }

    // Not root: refused, nothing written.
    sm.run_ok(
        "useradd",
        [
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            OPERATOR,
        ],
    )?;
    let o = cli(
        &sm,
        Some(OPERATOR),
        &bin,
        &["install", "--system", "--bin-dir", &dir_s],
    );
    ensure!(
        o.code == 5 && o.stderr.contains("needs root"),
        "{}",
        o.stderr
    );
    ensure!(!exists(
        &sm,
        "/etc/systemd/system/watchkeeper-daemon.service"
    ));

    // Install, enable and start.
    let o = cli(&sm, None, &bin, &install);
    ensure!(o.code == 0, "install failed: {}", o.stderr);
    ensure!(
        o.stdout.contains("systemd-sysusers: user watchkeeper"),
        "{}",
        o.stdout
    );

    // The system user of the shipped sysusers.d file.
    let pw = sm.run_ok("getent", ["passwd", "watchkeeper"])?;
    let fields: Vec<&str> = pw.trim().split(':').collect();
    ensure!(fields.len() == 7, "{pw}");
    let uid: u32 = fields[2].parse()?;
    ensure!(
        uid > 0 && uid < 1000 && fields[6] == "/usr/sbin/nologin",
        "not a system user: {pw}"
    );
    ensure!(
        sm.systemctl_ok(["is-enabled", SOCKET, DAEMON, WORKER])?
            .lines()
            .all(|l| l == "enabled"),
        "not all enabled"
    );
    ensure!(exists(
        &sm,
        "/etc/systemd/system/multi-user.target.wants/watchkeeper-daemon.service"
    ));
    sm.wait_for(WORKER, "ActiveState", "active", DEADLINE)?;

    // Daemon and worker run as watchkeeper, from the versioned install root.
    for unit in [DAEMON, WORKER] {
        let pid = sm.show(unit, &["MainPID"])?["MainPID"].clone();
        ensure!(pid != "0", "{unit} has no MainPID");
        let owner = stat(&sm, "%U", &format!("/proc/{pid}"))?;
        ensure!(owner == "watchkeeper", "{unit} runs as {owner}");
        let exe = sm.run_ok("readlink", [format!("/proc/{pid}/exe")])?;
        ensure!(
            exe.starts_with("/usr/local/lib/watchkeeper/versions/"),
            "{unit} runs {exe}"
        );
    }
    // What the units say about owners and modes.
    for (path, want) in [
        (SOCKET_PATH, "watchkeeper:watchkeeper 660"),
        ("/var/lib/watchkeeper-daemon", "watchkeeper:watchkeeper 700"),
        ("/var/lib/watchkeeper-worker", "watchkeeper:watchkeeper 700"),
        (
            "/var/lib/watchkeeper-worker/heartbeat.json",
            "watchkeeper:watchkeeper 600",
        ),
        ("/etc/watchkeeper/daemon.env", "root:root 600"),
        ("/etc/watchkeeper/daemon.toml", "root:root 644"),
    ] {
        let got = stat(&sm, "%U:%G %a", path)?;
        ensure!(got == want, "{path}: {got}, want {want}");
    }
    // The worker's credential is optional: its file is missing and the worker runs
    // (SetCredential= is systemd's fallback for a LoadCredential= without a file).
    ensure!(!exists(&sm, "/etc/watchkeeper/credentials/github-token"));
    ensure!(sm.show(WORKER, &["NRestarts"])?["NRestarts"] == "0");
    // Unused (worker.toml hands no credential to jobs), the missing file is no finding.
    let o = cli(&sm, None, &bin, &["doctor", "--system"]);
    ensure!(
        o.code == 0 && o.stdout.trim() == "no findings",
        "{}",
        o.stdout
    );

    // status: healthy, with the worker's heartbeat found, fresh and from its MainPID.
    let status = wait_healthy(&sm, &bin)?;
    // Still the first start: no restart hid behind the fallback.
    ensure!(sm.show(WORKER, &["NRestarts"])?["NRestarts"] == "0");
    let w = service(&status, WORKER)?;
    ensure!(
        w["heartbeat"]["found"] == true
            && w["heartbeat"]["fresh"] == true
            && w["heartbeat"]["pid_matches"] == true,
        "{w:#}"
    );
    ensure!(
        service(&status, DAEMON)?["daemon"]["answers"] == true,
        "{status:#}"
    );

    // A job runs through the installed daemon and worker.
    sm.run_ok(
        &wk_jobs,
        [
            "--socket",
            SOCKET_PATH,
            "submit",
            "--",
            "echo",
            "system install",
        ],
    )?;
    let t0 = Instant::now();
    loop {
        let s = jobs_stats(&sm, &wk_jobs)?;
        if s["completed"] == 1 {
            break;
        }
        ensure!(
            t0.elapsed() < DEADLINE,
            "the job did not complete: {s}\n{}",
            sm.journal(WORKER)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The shipped LoadCredential= at work: with the credential's file in place and the worker
    // allowed to hand it out, a job gets it as a private file, and the journal never shows it.
    // Once worker.toml hands it to jobs, doctor names the missing file, from the unit's own
    // LoadCredential= line.
    sm.run_ok(
        "sh",
        [
            "-c",
            "printf '%s\\n' 'allowlist = [\"echo\", \"sh\"]' 'credentials = [\"github-token\"]' \
             >/etc/watchkeeper/worker.toml",
        ],
    )?;
    let o = cli(&sm, None, &bin, &["doctor", "--system"]);
    ensure!(
        o.code == 4
            && o.stdout.lines().count() == 1
            && o.stdout.starts_with(
                "credential github-token of watchkeeper-worker.service is missing: \
                 no /etc/watchkeeper/credentials/github-token: fix: "
            ),
        "{}",
        o.stdout
    );
    sm.run_ok(
        "install",
        ["-d", "-m", "0700", "/etc/watchkeeper/credentials"],
    )?;
    sm.run_ok(
        "sh",
        [
            "-c",
            &format!("umask 077 && echo {SECRET} >/etc/watchkeeper/credentials/github-token"),
        ],
    )?;
    sm.systemctl_ok(["restart", WORKER])?;
    sm.wait_for(WORKER, "ActiveState", "active", DEADLINE)?;
    sm.run_ok(
        &wk_jobs,
        ["--socket", SOCKET_PATH, "submit-json", GITHUB_TOKEN_JOB],
    )?;
    let t0 = Instant::now();
    loop {
        let s = jobs_stats(&sm, &wk_jobs)?;
        ensure!(
            s["failed"] == 0,
            "the job failed: {s}\n{}",
            sm.journal(WORKER)
        );
        if s["completed"] == 2 && sm.journal(WORKER).contains("the token is [redacted]") {
            break;
        }
        ensure!(
            t0.elapsed() < DEADLINE,
            "the credential job did not complete: {s}\n{}",
            sm.journal(WORKER)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let journal = sm.journal(WORKER);
    ensure!(
        !journal.contains(SECRET),
        "the secret is in the journal:\n{journal}"
    );

    // A second install changes nothing and restarts nothing.
    let pid_before = sm.show(DAEMON, &["MainPID"])?["MainPID"].clone();
    let o = cli(&sm, None, &bin, &install);
    ensure!(
        o.code == 0 && !o.stdout.contains("\nwrote ") && o.stdout.contains("already current"),
        "{}",
        o.stdout
    );
    ensure!(sm.show(DAEMON, &["MainPID"])?["MainPID"] == pid_before);

    // doctor as root: nothing to find.
    let o = cli(&sm, None, &bin, &["doctor", "--system"]);
    ensure!(
        o.code == 0 && o.stdout.trim() == "no findings",
        "{}",
        o.stdout
    );
    // The heartbeat directory is judged for the workers' user, not for root (who may write
    // anywhere): 0500 is a finding, and its fix clears it.
    sm.run_ok("chmod", ["0500", "/var/lib/watchkeeper-worker"])?;
    let o = cli(&sm, None, &bin, &["doctor", "--system"]);
    let fix = "chown watchkeeper: /var/lib/watchkeeper-worker && chmod 0700 \
               /var/lib/watchkeeper-worker";
    ensure!(
        o.code == 4
            && o.stdout.lines().any(|l| l.starts_with(
                "the heartbeat directory /var/lib/watchkeeper-worker is not writable by \
                 watchkeeper"
            ) && l.ends_with(fix)),
        "{}",
        o.stdout
    );
    sm.run_ok("sh", ["-c", fix])?;
    let o = cli(&sm, None, &bin, &["doctor", "--system"]);
    ensure!(o.code == 0, "{}", o.stdout);
    // The workers' User= names no user: said so (a drop-in, reloaded, not restarted).
    sm.run_ok(
        "sh",
        [
            "-c",
            "mkdir -p /etc/systemd/system/watchkeeper-worker.service.d && printf \
             '[Service]\\nUser=wk-no-such-user\\n' \
             >/etc/systemd/system/watchkeeper-worker.service.d/50-e2e.conf",
        ],
    )?;
    sm.systemctl_ok(["daemon-reload"])?;
    let o = cli(&sm, None, &bin, &["doctor", "--system"]);
    ensure!(
        o.code == 4
            && o.stdout.lines().any(|l| l
                == "the workers' user wk-no-such-user (their User=) does not exist: fix: \
                    systemd-sysusers /etc/sysusers.d/watchkeeper.conf"),
        "{}",
        o.stdout
    );
    sm.run_ok(
        "rm",
        ["-r", "/etc/systemd/system/watchkeeper-worker.service.d"],
    )?;
    sm.systemctl_ok(["daemon-reload"])?;
    let o = cli(&sm, None, &bin, &["doctor", "--system"]);
    ensure!(o.code == 0, "{}", o.stdout);

    // status as an operator who may read neither the heartbeat (its directory is 0700
    // watchkeeper) nor the socket (0660 watchkeeper): the unreadable facts are named and left
    // out of the health, and the exit code says "could not ask" (3), not degraded.
    let o = cli(&sm, Some(OPERATOR), &bin, &["status", "--system", "--json"]);
    let v: Value = serde_json::from_str(o.stdout.trim()).with_context(|| o.stdout.clone())?;
    ensure!(
        o.code == 3 && v["overall_health"] == "healthy" && v["complete"] == false,
        "{v:#}"
    );
    let w = service(&v, WORKER)?;
    ensure!(
        w["health"] == "healthy"
            && w["heartbeat"]["permission_denied"] == true
            && w["unchecked"][0]
                .as_str()
                .is_some_and(|u| u.contains("permission denied")),
        "{w:#}"
    );
    let d = service(&v, DAEMON)?;
    ensure!(
        d["health"] == "healthy" && d["daemon"]["answers"].is_null(),
        "{d:#}"
    );
    let o = cli(&sm, Some(OPERATOR), &bin, &["status", "--system"]);
    ensure!(
        o.code == 3
            && o.stdout.contains("not checked as uid ")
            && o.stdout.contains("overall: healthy (incomplete)"),
        "{}",
        o.stdout
    );

    // metrics say the same: incomplete, and no daemon sample rather than a false 0.
    let o = cli(&sm, Some(OPERATOR), &bin, &["metrics", "--system"]);
    ensure!(
        o.code == 0
            && o.stdout
                .lines()
                .any(|l| l == "watchkeeper_status_complete 0")
            && !o.stdout.contains("\nwatchkeeper_daemon_answers ")
            && o.stdout
                .lines()
                .any(|l| l == "watchkeeper_overall_health 0"),
        "{}",
        o.stdout
    );
    let o = cli(&sm, None, &bin, &["metrics", "--system"]);
    ensure!(
        o.stdout
            .lines()
            .any(|l| l == "watchkeeper_status_complete 1")
            && o.stdout
                .lines()
                .any(|l| l == "watchkeeper_daemon_answers 1"),
        "{}",
        o.stdout
    );

    // An operator in the socket's group, but not in allowed_uids: doctor finds the daemon
    // refusing its uid and names the fix; once the fix is followed, the finding is gone.
    sm.run_ok("usermod", ["-aG", "watchkeeper", OPERATOR])?;
    let op_uid = sm.run_ok("id", ["-u", OPERATOR])?.trim().to_owned();
    let o = cli(&sm, Some(OPERATOR), &bin, &["doctor", "--system"]);
    let refusal = format!("the daemon's socket {SOCKET_PATH} refuses uid {op_uid}");
    let fix = format!(
        "fix: add {op_uid} to allowed_uids in /etc/watchkeeper/daemon.toml, then \
         systemctl reload watchkeeper-daemon.service"
    );
    ensure!(
        o.code == 4
            && o.stdout
                .lines()
                .any(|l| l.starts_with(&refusal) && l.ends_with(&fix)),
        "no refusal finding with its fix: {}",
        o.stdout
    );
    sm.run_ok(
        "sed",
        [
            "-i",
            &format!("s/^allowed_uids = \\[\\]/allowed_uids = [{op_uid}]/"),
            "/etc/watchkeeper/daemon.toml",
        ],
    )?;
    sm.systemctl_ok(["reload", DAEMON])?;
    let o = cli(&sm, Some(OPERATOR), &bin, &["doctor", "--system"]);
    ensure!(
        !o.stdout.contains("refuses uid"),
        "still refused after the fix: {}",
        o.stdout
    );
    // The operator may not write the workers' heartbeat directory, but the workers may: no
    // finding about it.
    ensure!(
        !o.stdout.contains("heartbeat directory"),
        "the operator's own access taken for the workers': {}",
        o.stdout
    );
    // Now the daemon answers the operator; only the heartbeat stays unchecked.
    let o = cli(&sm, Some(OPERATOR), &bin, &["status", "--system", "--json"]);
    let v: Value = serde_json::from_str(o.stdout.trim()).with_context(|| o.stdout.clone())?;
    let d = service(&v, DAEMON)?;
    ensure!(
        o.code == 3
            && d["daemon"]["answers"] == true
            && d["daemon"]["jobs"]["completed"] == 2
            && d.get("unchecked").is_none(),
        "{v:#}"
    );
    let o = sm.run_as(OPERATOR, &wk_jobs, ["--socket", SOCKET_PATH, "ping"]);
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Uninstall: no unit left (files, enablement or loaded), the state and configurations kept.
    let o = cli(&sm, None, &bin, &["uninstall", "--system"]);
    ensure!(o.code == 0, "{}", o.stderr);
    for unit in [SOCKET, DAEMON, WORKER] {
        let p = sm.show(unit, &["LoadState", "ActiveState"])?;
        ensure!(
            p["LoadState"] == "not-found" && p["ActiveState"] == "inactive",
            "{unit}: {p:?}"
        );
    }
    // Unit files and the enablement symlinks in *.wants/ alike.
    let left = sm.run_ok("find", ["/etc/systemd/system", "-name", "watchkeeper*"])?;
    ensure!(left.trim().is_empty(), "left behind: {left}");
    ensure!(!exists(&sm, SOCKET_PATH));
    ensure!(!exists(&sm, "/usr/local/lib/watchkeeper"));
    ensure!(!exists(&sm, "/etc/sysusers.d/watchkeeper.conf"));
    for kept in [
        "/var/lib/watchkeeper-daemon",
        "/etc/watchkeeper/daemon.toml",
        "/etc/watchkeeper/worker.env",
    ] {
        ensure!(exists(&sm, kept), "{kept} was not kept");
    }

    // --purge: the state and configurations go too.
    let o = cli(&sm, None, &bin, &["uninstall", "--system", "--purge"]);
    ensure!(o.code == 0, "{}", o.stderr);
    for gone in [
        "/var/lib/watchkeeper-daemon",
        "/var/lib/watchkeeper-worker",
        "/etc/watchkeeper",
    ] {
        ensure!(!exists(&sm, gone), "{gone} is still there");
    }

    // The host saw none of it.
    sm.stop()?;
    for p in [
        "/etc/systemd/system/watchkeeper-daemon.service",
        "/etc/sysusers.d/watchkeeper.conf",
        "/usr/local/lib/watchkeeper",
        "/var/lib/watchkeeper-daemon",
    ] {
        ensure!(!Path::new(p).exists(), "{p} appeared on the host");
    }
    for ((what, before), (_, after)) in host_before.iter().zip(host_snapshot()?) {
        ensure!(
            *before == after,
            "the host's {what} changed: {:?} -> {:?}",
            String::from_utf8_lossy(before),
            String::from_utf8_lossy(&after)
        );
    }
    Ok(())
}
