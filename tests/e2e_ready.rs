//! End to end, under a real `systemd --user`: the shipped daemon and worker units reach
//! `active (running)` only after `READY=1`, with the `STATUS=` our code sends; and the worker's
//! slow-start drill keeps its unit `activating` past `TimeoutStartSec=` through
//! `EXTEND_TIMEOUT_USEC=`, then it becomes active.

mod support;

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use support::wk::{DAEMON, SOCKET, WORKER, Wk, now_monotonic_us};

const DEADLINE: Duration = Duration::from_secs(20);

#[test]
fn daemon_and_worker_are_active_only_after_ready_and_slow_start_is_extended() -> Result<()> {
    let Some(wk) = Wk::start(None, None)? else {
        return Ok(());
    };

    // The daemon: `start` blocks until READY=1, which comes with the queue counts.
    let t = Instant::now();
    wk.systemctl_ok(["start", DAEMON])?;
    eprintln!("start {DAEMON}: {:?}", t.elapsed());
    let p = wk.assert_running(DAEMON)?;
    ensure!(
        p["StatusText"].starts_with("queued 0, claimed 0, completed 0"),
        "{DAEMON} StatusText: {p:?}"
    );
    // Requires= pulled in the socket unit.
    ensure!(
        wk.show(SOCKET, &["ActiveState"])["ActiveState"] == "active",
        "{SOCKET} not active"
    );
    wk.wait_journal(DAEMON, "ready; queued 0", DEADLINE)?;

    // The worker: READY=1 once the daemon answered its ping; then idle.
    let t = Instant::now();
    wk.systemctl_ok(["start", WORKER])?;
    eprintln!("start {WORKER}: {:?}", t.elapsed());
    let p = wk.assert_running(WORKER)?;
    ensure!(
        p["StatusText"].starts_with("idle; 0 completed"),
        "{WORKER} StatusText: {p:?}"
    );
    wk.systemctl_ok(["stop", WORKER])?;

    // Slow start: 3 s before connecting, TimeoutStartSec=2; the drill extends the start
    // timeout by 3 s every second.
    wk.drop_in(
        WORKER,
        "[Service]\nTimeoutStartSec=2\nEnvironment=WATCHKEEPER_DRILL_SLOW_START=3\n",
    )?;
    let p = wk.show(WORKER, &["TimeoutStartUSec"]);
    ensure!(p["TimeoutStartUSec"] == "2s", "drop-in not applied: {p:?}");
    let wk = &wk;
    thread::scope(|s| -> Result<()> {
        let t = Instant::now();
        let start = s.spawn(move || {
            let out = wk.systemctl(["start", WORKER]);
            (out, t.elapsed())
        });
        // While `start` blocks: the unit is `activating (start)` with the drill's status, also
        // once TimeoutStartSec= has passed. Each sighting is stamped with CLOCK_MONOTONIC, the
        // clock of systemd's timestamps.
        let mut last_activating_us = None;
        let mut statuses = Vec::new();
        while !start.is_finished() {
            let p = wk.show(WORKER, &["ActiveState", "SubState", "StatusText"]);
            let now = now_monotonic_us();
            match p["ActiveState"].as_str() {
                "activating" => {
                    ensure!(p["SubState"] == "start", "{p:?}");
                    if !statuses.contains(&p["StatusText"]) {
                        statuses.push(p["StatusText"].clone());
                    }
                    last_activating_us = Some(now);
                }
                // Before the start job ran, or after READY=1.
                "inactive" if last_activating_us.is_none() => {}
                "active" => {}
                _ => bail!(
                    "{WORKER} during the slow start: {p:?}\n{}",
                    wk.journal(WORKER)
                ),
            }
            thread::sleep(Duration::from_millis(50));
        }
        let (out, took) = start.join().expect("systemctl thread");
        eprintln!(
            "slow start: `systemctl start` returned {} after {took:?}; statuses {statuses:?}",
            out.status
        );
        ensure!(
            out.status.success(),
            "systemctl --user start {WORKER} failed ({}) after {took:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            wk.journal(WORKER)
        );
        let began = wk.prop_u64(WORKER, "InactiveExitTimestampMonotonic")?;
        let active = wk.prop_u64(WORKER, "ActiveEnterTimestampMonotonic")?;
        let last_activating = last_activating_us.context("never saw the unit activating")?;
        eprintln!(
            "slow start: activating for {:.3} s (systemd's timestamps); seen activating {:.3} s \
             after it began",
            (active - began) as f64 / 1e6,
            last_activating.saturating_sub(began) as f64 / 1e6
        );
        ensure!(
            active - began >= 3_000_000,
            "active {} µs after the start began: before the 3 s drill ended",
            active - began
        );
        ensure!(
            last_activating > began + 2_000_000,
            "never saw {WORKER} activating past TimeoutStartSec=2 (last {} µs after it began)",
            last_activating.saturating_sub(began)
        );
        ensure!(
            statuses
                .iter()
                .any(|s| s.starts_with("starting: slow-start drill")),
            "drill STATUS= not seen: {statuses:?}"
        );
        Ok(())
    })?;
    let p = wk.assert_running(WORKER)?;
    ensure!(p["Result"] == "success", "{p:?}");
    ensure!(p["NRestarts"] == "0", "{p:?}");
    ensure!(p["StatusText"].starts_with("idle;"), "{p:?}");
    Ok(())
}
