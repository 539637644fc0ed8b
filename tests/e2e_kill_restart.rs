//! End to end, under a real `systemd --user`: `kill -9` of the daemon or of a worker
//! (`systemctl --user kill -s KILL`) ends in `Restart=on-failure`: `NRestarts` goes up by one,
//! a new `MainPID`, active again, and the pair works again.

mod support;

use std::time::Duration;

use anyhow::{Result, ensure};
use support::wk::{DAEMON, SOCKET, WORKER, Wk};

const DEADLINE: Duration = Duration::from_secs(20);

fn kill_and_wait_for_restart(wk: &Wk, unit: &str) -> Result<()> {
    let before = wk.assert_running(unit)?;
    let n_before: u32 = before["NRestarts"].parse()?;
    let killed = wk.journal_json(unit)?.len();
    wk.systemctl_ok(["kill", "-s", "KILL", unit])?;
    let after = wk.poll(
        &format!("{unit} restarted after kill -9"),
        unit,
        DEADLINE,
        || {
            let p = wk.try_show(
                unit,
                &[
                    "ActiveState",
                    "SubState",
                    "MainPID",
                    "NRestarts",
                    "Result",
                    "StatusText",
                ],
            )?;
            let restarted = p["ActiveState"] == "active"
                && p["MainPID"] != "0"
                && p["MainPID"] != before["MainPID"];
            Ok(restarted.then_some(p))
        },
    )?;
    eprintln!(
        "{unit}: MainPID {} -> {}, NRestarts {} -> {}",
        before["MainPID"], after["MainPID"], n_before, after["NRestarts"]
    );
    ensure!(
        after["NRestarts"].parse::<u32>()? == n_before + 1,
        "{unit}: NRestarts {n_before} -> {after:?}"
    );
    ensure!(after["SubState"] == "running", "{unit}: {after:?}");
    // The manager's account of it, after the kill.
    let journal = wk.journal_json(unit)?;
    let messages: Vec<String> = journal[killed..].iter().map(support::wk::message).collect();
    ensure!(
        messages
            .iter()
            .any(|m| m.contains("Main process exited, code=killed, status=9/KILL")),
        "{unit}: no SIGKILL exit in the journal: {messages:#?}"
    );
    ensure!(
        messages
            .iter()
            .any(|m| m.contains("Failed with result 'signal'")),
        "{unit}: no Result=signal in the journal: {messages:#?}"
    );
    ensure!(
        messages
            .iter()
            .any(|m| m.contains("Scheduled restart job, restart counter is at")),
        "{unit}: no restart scheduled in the journal: {messages:#?}"
    );
    Ok(())
}

#[test]
fn kill_9_restarts_the_daemon_and_the_worker() -> Result<()> {
    let Some(wk) = Wk::start(None, None)? else {
        return Ok(());
    };
    wk.systemctl_ok(["start", SOCKET])?;
    wk.systemctl_ok(["start", DAEMON])?;
    wk.systemctl_ok(["start", WORKER])?;

    kill_and_wait_for_restart(&wk, WORKER)?;
    // The new worker got READY=1 again, so it reached the daemon.
    ensure!(wk.show(WORKER, &["StatusText"])["StatusText"].starts_with("idle;"));

    kill_and_wait_for_restart(&wk, DAEMON)?;
    ensure!(wk.wk_jobs(&["ping"])? == env!("CARGO_PKG_VERSION"));
    // The worker lost the daemon and finds the new one: it goes back to idle, still the same
    // process (losing the daemon is not a reason to die).
    let worker_pid = wk.main_pid(WORKER);
    let id = wk.wk_jobs(&["submit", "true"])?;
    wk.poll(
        "the job completed after the daemon restart",
        WORKER,
        DEADLINE,
        || {
            let s = wk.stats()?;
            Ok((s["completed"] == 1).then_some(()))
        },
    )?;
    eprintln!("job {id} completed after the daemon's restart");
    ensure!(wk.main_pid(WORKER) == worker_pid, "the worker restarted");
    wk.assert_running(WORKER)?;
    Ok(())
}
