//! End to end, under a real `systemd --user`: `systemctl --user reload watchkeeper-daemon`
//! (`ExecReload=kill -HUP`) returns once the daemon sent `READY=1`, the unit stays active with
//! the same `MainPID`, and the new configuration is in effect: the next claim carries the new
//! `lease_secs`. A bad file fails the reload visibly and keeps the old configuration.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use support::wk::{DAEMON, SOCKET, WORKER, Wk, field, message};

const DEADLINE: Duration = Duration::from_secs(20);

/// Submits `true`, waits until it completed, and returns the `lease_secs` the worker got with
/// the claim (its "running job" journal line).
fn lease_of_next_job(wk: &Wk) -> Result<String> {
    let id = wk.wk_jobs(&["submit", "true"])?;
    let entry = wk.poll(
        &format!("the worker runs job {id}"),
        WORKER,
        DEADLINE,
        || {
            Ok(wk
                .journal_json(WORKER)?
                .into_iter()
                .find(|e| message(e) == "running job" && field(e, "F_JOB") == id))
        },
    )?;
    wk.poll(&format!("job {id} completed"), WORKER, DEADLINE, || {
        let s = wk.stats()?;
        Ok((s["completed"].to_string() == id).then_some(()))
    })?;
    Ok(field(&entry, "F_LEASE_SECS"))
}

/// `systemctl --user reload` and what the unit looks like right after it returned. The unit's
/// `ExecReload=` (wk-jobs … reload) exits only when the daemon has reloaded, non-zero if the
/// reload failed: `systemctl reload` then fails and `ReloadResult=` says so.
fn reload(
    wk: &Wk,
    pid: &str,
    expect_ok: bool,
) -> Result<std::collections::HashMap<String, String>> {
    let t = Instant::now();
    let out = wk.systemctl(["reload", DAEMON]);
    let took = t.elapsed();
    ensure!(
        out.status.success() == expect_ok,
        "systemctl reload: {:?} (expected success: {expect_ok}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let p = wk.show(
        DAEMON,
        &[
            "ActiveState",
            "SubState",
            "MainPID",
            "ReloadResult",
            "StatusText",
            "NRestarts",
        ],
    );
    eprintln!("reload returned after {took:?}: {p:?}");
    // `reload` waited for READY=1: the unit is out of `reloading` already.
    ensure!(
        p["ActiveState"] == "active" && p["SubState"] == "running",
        "{DAEMON} right after reload returned: {p:?}"
    );
    let result = if expect_ok { "success" } else { "exit-code" };
    ensure!(p["ReloadResult"] == result, "{p:?}");
    ensure!(p["MainPID"] == pid, "MainPID changed: {pid} -> {p:?}");
    ensure!(p["NRestarts"] == "0", "{p:?}");
    Ok(p)
}

#[test]
fn reload_waits_for_ready_and_applies_the_new_configuration() -> Result<()> {
    let daemon_toml = support::wk::read_contrib("config/daemon.toml")?;
    ensure!(
        daemon_toml.contains("lease_secs = 60"),
        "shipped daemon.toml changed"
    );
    let Some(wk) = Wk::start(None, None)? else {
        return Ok(());
    };
    wk.systemctl_ok(["start", SOCKET])?;
    wk.systemctl_ok(["start", DAEMON])?;
    wk.systemctl_ok(["start", WORKER])?;
    let pid = wk.assert_running(DAEMON)?["MainPID"].clone();
    ensure!(lease_of_next_job(&wk)? == "60", "lease before the reload");

    // A valid change.
    wk.write_config(
        "daemon.toml",
        &daemon_toml.replace("lease_secs = 60", "lease_secs = 7"),
    )?;
    let p = reload(&wk, &pid, true)?;
    ensure!(
        p["StatusText"].starts_with("queued ") && !p["StatusText"].contains("reload failed"),
        "{p:?}"
    );
    let line = wk.wait_journal(DAEMON, "configuration reloaded", DEADLINE)?;
    ensure!(field(&line, "F_LEASE_SECS") == "7", "{line}");
    let manager = wk
        .journal_json(DAEMON)?
        .into_iter()
        .find(|e| message(e).starts_with("Reloaded "))
        .with_context(|| format!("no `Reloaded` from the manager:\n{}", wk.journal(DAEMON)))?;
    eprintln!("manager: {}", message(&manager));
    // The manager finished the reload job only after the daemon had read the new file (both
    // log through journald's native socket, so the order is the order of sending).
    ensure!(
        support::wk::monotonic_us(&manager)? >= support::wk::monotonic_us(&line)?,
        "the manager finished the reload before the daemon re-read its configuration:\n{}",
        wk.journal(DAEMON)
    );
    ensure!(lease_of_next_job(&wk)? == "7", "lease after the reload");

    // A broken file: `systemctl reload` fails, STATUS= says why, and the daemon keeps running
    // with the previous configuration.
    wk.write_config("daemon.toml", "lease_secs = 0\n")?;
    let p = reload(&wk, &pid, false)?;
    ensure!(
        p["StatusText"].contains("reload failed") && p["StatusText"].contains("lease_secs"),
        "{p:?}"
    );
    ensure!(
        lease_of_next_job(&wk)? == "7",
        "lease after the failed reload"
    );
    Ok(())
}
