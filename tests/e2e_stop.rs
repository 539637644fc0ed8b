//! End to end, under a real `systemd --user`: `systemctl --user stop` ends the worker (also
//! one with a job running, which it lets finish) and the daemon with exit status 0,
//! `Result=success`, well within their `TimeoutStopSec=`.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use support::wk::{DAEMON, SOCKET, WORKER, Wk};

const DEADLINE: Duration = Duration::from_secs(20);

/// Stops `unit` and checks a clean exit; returns systemd's stop duration.
fn stop_cleanly(wk: &Wk, unit: &str) -> Result<Duration> {
    let before = wk.assert_running(unit)?;
    let timeout = wk.show(unit, &["TimeoutStopUSec"])["TimeoutStopUSec"].clone();
    let t = Instant::now();
    wk.systemctl_ok(["stop", unit])?;
    let wall = t.elapsed();
    let p = wk.show(
        unit,
        &[
            "ActiveState",
            "Result",
            "ExecMainCode",
            "ExecMainStatus",
            "ExecMainPID",
            "ActiveExitTimestampMonotonic",
            "InactiveEnterTimestampMonotonic",
        ],
    );
    let took = Duration::from_micros(
        p["InactiveEnterTimestampMonotonic"].parse::<u64>()?
            - p["ActiveExitTimestampMonotonic"].parse::<u64>()?,
    );
    eprintln!(
        "stop {unit}: {took:?} (systemctl returned after {wall:?}; TimeoutStopSec={timeout})"
    );
    ensure!(
        p["ActiveState"] == "inactive" && p["Result"] == "success",
        "{unit} after stop: {p:?}\n{}",
        wk.journal(unit)
    );
    // CLD_EXITED (1) with status 0: the process exited by itself, not by a signal.
    ensure!(
        p["ExecMainCode"] == "1" && p["ExecMainStatus"] == "0",
        "{unit} did not exit 0: {p:?}"
    );
    ensure!(p["ExecMainPID"] == before["MainPID"], "{p:?} vs {before:?}");
    // "Well within": a tenth of the shipped bound (30 s worker, 45 s daemon).
    let bound: u64 = timeout.trim_end_matches('s').parse()?;
    ensure!(
        took < Duration::from_secs(bound) / 10,
        "{unit} took {took:?} to stop (TimeoutStopSec={timeout})"
    );
    Ok(took)
}

#[test]
fn stop_exits_0_well_within_timeout_stop_sec() -> Result<()> {
    let Some(wk) = Wk::start(None, None)? else {
        return Ok(());
    };
    // Enabled (WantedBy=default.target, an active unit), a stopped unit stays loaded, so its
    // exit status can be read after the stop instead of being garbage-collected.
    wk.systemctl_ok(["enable", SOCKET, DAEMON, WORKER])?;
    wk.systemctl_ok(["start", SOCKET])?;
    wk.systemctl_ok(["start", DAEMON])?;
    wk.systemctl_ok(["start", WORKER])?;

    // An idle worker, and an idle daemon.
    stop_cleanly(&wk, WORKER)?;
    stop_cleanly(&wk, DAEMON)?;
    wk.wait_journal(DAEMON, "stopped", DEADLINE)?;
    wk.systemctl_ok(["start", DAEMON])?;

    // A worker running a job: the job is allowed to finish (grace_secs = 10), and is
    // reported completed, not killed by the stop (KillMode=mixed).
    wk.systemctl_ok(["start", WORKER])?;
    wk.wk_jobs(&["submit", "sleep", "1"])?;
    wk.poll("the worker runs the job", WORKER, DEADLINE, || {
        let s = wk.show(WORKER, &["StatusText"]);
        Ok(s["StatusText"].starts_with("running job 1").then_some(()))
    })?;
    let took = stop_cleanly(&wk, WORKER)?;
    // It waited for the job (< 1 s left), not for the grace period (10 s).
    ensure!(
        took < Duration::from_secs(5),
        "the stop waited longer than the job: {took:?}"
    );
    let s = wk.stats()?;
    ensure!(
        s["completed"] == 1 && s["claimed"] == 0 && s["queued"] == 0,
        "the job was not completed by the stopping worker: {s:?}"
    );

    // The daemon, with a worker connected to it: stopping the socket stops the daemon too
    // (Requires=), so the worker cannot re-activate it; the daemon closes the idle connection
    // and exits 0.
    wk.systemctl_ok(["start", WORKER])?;
    let worker = wk.assert_running(WORKER)?;
    let t = Instant::now();
    wk.systemctl_ok(["stop", SOCKET])?;
    eprintln!("stop {SOCKET} (and so {DAEMON}): {:?}", t.elapsed());
    let p = wk.show(
        DAEMON,
        &["ActiveState", "Result", "ExecMainCode", "ExecMainStatus"],
    );
    ensure!(
        p["ActiveState"] == "inactive"
            && p["Result"] == "success"
            && p["ExecMainCode"] == "1"
            && p["ExecMainStatus"] == "0",
        "{DAEMON} after stopping the socket: {p:?}\n{}",
        wk.journal(DAEMON)
    );
    wk.poll(
        "the daemon's second `stopped` line",
        DAEMON,
        DEADLINE,
        || {
            let n = wk
                .journal_json(DAEMON)?
                .iter()
                .filter(|e| support::wk::message(e) == "stopped")
                .count();
            Ok((n == 2).then_some(()))
        },
    )?;
    // The worker lives on without its daemon (degraded, not dead), then stops cleanly too.
    wk.poll(
        "the worker notices the daemon is gone",
        WORKER,
        DEADLINE,
        || {
            let s = wk.show(WORKER, &["StatusText"]);
            Ok(s["StatusText"]
                .starts_with("degraded: daemon unreachable")
                .then_some(()))
        },
    )?;
    ensure!(wk.main_pid(WORKER).to_string() == worker["MainPID"]);
    stop_cleanly(&wk, WORKER)?;
    Ok(())
}
