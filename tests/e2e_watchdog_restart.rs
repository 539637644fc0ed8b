//! End to end, under a real `systemd --user`: a worker whose poll loop hangs
//! (`--drill-hang-after N`) stops pinging the watchdog, is killed with `Result=watchdog` and
//! restarted, within `WatchdogSec=` + 10 % of the last ping systemd recorded.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use support::wk::{SOCKET, WORKER, Wk, monotonic_us};

const DEADLINE: Duration = Duration::from_secs(20);
const WATCHDOG_SEC: u64 = 2;
const RESTART_MS: u64 = 100;

#[test]
fn a_hung_poll_loop_ends_in_a_watchdog_restart() -> Result<()> {
    let Some(wk) = Wk::start(None, None)? else {
        return Ok(());
    };
    wk.drop_in(
        WORKER,
        &format!("[Service]\nWatchdogSec={WATCHDOG_SEC}\nRestartSec={RESTART_MS}ms\n"),
    )?;
    // The drill through the unit's own `EnvironmentFile=-%E/watchkeeper/worker.env`, removed
    // once the first instance runs: the restarted instance works normally.
    wk.write_config("worker.env", "WATCHKEEPER_DRILL_HANG_AFTER=4\n")?;
    wk.systemctl_ok(["start", SOCKET])?;
    wk.systemctl_ok(["start", WORKER])?;
    std::fs::remove_file(wk.config_dir().join("worker.env"))?;
    let p = wk.assert_running(WORKER)?;
    let pid1 = p["MainPID"].clone();
    let p = wk.show(WORKER, &["WatchdogUSec", "RestartUSec"]);
    ensure!(
        p["WatchdogUSec"] == format!("{WATCHDOG_SEC}s"),
        "WatchdogUSec: {p:?}"
    );

    // Follow the first instance: remember the last ping systemd recorded, until systemd
    // acts on the missing pings; then wait for the new instance's READY=1.
    const PROPS: &[&str] = &[
        "ActiveState",
        "SubState",
        "MainPID",
        "Result",
        "NRestarts",
        "StatusText",
        "WatchdogTimestampMonotonic",
        "ExecMainStartTimestampMonotonic",
    ];
    let t0 = Instant::now();
    let mut last_ping = 0u64;
    let mut pings = 0;
    let mut seen_stalled = false;
    let mut results_seen = Vec::new();
    let after = loop {
        let p = wk.show(WORKER, PROPS);
        if p["MainPID"] == pid1 && p["SubState"] == "running" {
            let ts: u64 = p["WatchdogTimestampMonotonic"].parse()?;
            if ts != last_ping {
                pings += 1;
                last_ping = ts;
            }
        } else if p["Result"] != "success" && !results_seen.contains(&p["Result"]) {
            results_seen.push(p["Result"].clone());
        }
        // The library's STATUS= once the loop stopped ticking (kept until the new instance).
        seen_stalled |= p["StatusText"].starts_with("stalled: no progress in 'poll'");
        if p["MainPID"] != pid1 && p["MainPID"] != "0" && p["ActiveState"] == "active" {
            break p;
        }
        ensure!(
            t0.elapsed() < DEADLINE,
            "no watchdog restart within {DEADLINE:?}: {p:?}\n{}",
            wk.journal(WORKER)
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    ensure!(pings >= 1 && last_ping > 0, "no ping seen");
    ensure!(
        after["NRestarts"].parse::<u32>()? >= 1,
        "NRestarts after the watchdog: {after:?}"
    );
    ensure!(
        seen_stalled,
        "STATUS= never said the poll loop stalled (library) before the kill"
    );

    // The journal: the manager's watchdog timeout and the unit's result, in order.
    let journal = wk.journal_json(WORKER)?;
    let timeout = journal
        .iter()
        .find(|e| {
            support::wk::message(e).contains(&format!("Watchdog timeout (limit {WATCHDOG_SEC}s)!"))
        })
        .with_context(|| {
            format!(
                "no watchdog timeout in the journal:\n{}",
                wk.journal(WORKER)
            )
        })?;
    let failed = journal
        .iter()
        .find(|e| support::wk::message(e).contains("Failed with result 'watchdog'"))
        .with_context(|| format!("no Result=watchdog in the journal:\n{}", wk.journal(WORKER)))?;
    let t_kill = monotonic_us(timeout)?;
    ensure!(
        monotonic_us(failed)? >= t_kill,
        "result logged before the timeout"
    );
    ensure!(
        results_seen.iter().all(|r| r == "watchdog"),
        "Result while restarting: {results_seen:?}"
    );

    let limit = WATCHDOG_SEC * 1_100_000;
    let kill_after = t_kill - last_ping;
    let t_start2: u64 = after["ExecMainStartTimestampMonotonic"].parse()?;
    let restart_after = t_start2 - last_ping;
    eprintln!(
        "watchdog: {pings} pings seen; last ping -> watchdog kill {:.3} s; last ping -> new \
         instance started {:.3} s (RestartSec {RESTART_MS} ms, so {:.3} s net); Result seen \
         while restarting: {results_seen:?}",
        kill_after as f64 / 1e6,
        restart_after as f64 / 1e6,
        (restart_after - RESTART_MS * 1000) as f64 / 1e6
    );
    ensure!(
        kill_after >= WATCHDOG_SEC * 1_000_000 - 50_000,
        "killed {kill_after} µs after the last ping, before WatchdogSec={WATCHDOG_SEC}"
    );
    ensure!(
        kill_after <= limit,
        "killed {kill_after} µs after the last ping, more than WatchdogSec × 1.1"
    );
    ensure!(
        restart_after - RESTART_MS * 1000 <= limit,
        "restarted {restart_after} µs after the last ping (RestartSec {RESTART_MS} ms): more \
         than WatchdogSec × 1.1 + RestartSec"
    );
    // The new instance (no drill) keeps pinging and stops cleanly.
    let p = wk.assert_running(WORKER)?;
    ensure!(p["StatusText"].starts_with("idle;"), "{p:?}");
    let first = wk.prop_u64(WORKER, "WatchdogTimestampMonotonic")?;
    wk.poll("the new instance pings", WORKER, DEADLINE, || {
        Ok((wk.prop_u64(WORKER, "WatchdogTimestampMonotonic")? > first).then_some(()))
    })?;
    wk.systemctl_ok(["stop", WORKER])?;
    Ok(())
}
