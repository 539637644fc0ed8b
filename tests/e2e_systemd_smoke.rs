//! Smoke test of the end-to-end harness: a real (private) `systemd --user` honours
//! READY/STATUS from a Type=notify unit and kills a unit that stops pinging its watchdog.
//! Skips (loudly) where no manager can be had, fails under `CI=true`.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use support::user_manager::UserManager;

const READY_UNIT: &str = "\
[Unit]
Description=watchkeeper e2e smoke: READY + STATUS

[Service]
Type=notify
NotifyAccess=all
TimeoutStartSec=20
ExecStart=/bin/sh -c 'systemd-notify --ready --status=smoke-ok; exec sleep 300'
";

const WATCHDOG_UNIT: &str = "\
[Unit]
Description=watchkeeper e2e smoke: READY, then never pings the watchdog

[Service]
Type=notify
NotifyAccess=all
TimeoutStartSec=20
WatchdogSec=2
Restart=no
ExecStart=/bin/sh -c 'systemd-notify --ready --status=no-pings; exec sleep 300'
";

#[test]
fn notify_ready_status_and_watchdog_under_a_real_user_manager() -> Result<()> {
    let Some(um) = UserManager::start()? else {
        return Ok(());
    };
    eprintln!(
        "manager for {} (uid {}) ready in {:?}, state in {}",
        um.user_name(),
        um.uid(),
        um.start_time(),
        um.state_dir().display()
    );

    // READY=1 + STATUS=: `start` returns only once READY arrived.
    um.install_unit("wk-smoke.service", READY_UNIT)?;
    let t = Instant::now();
    um.systemctl_ok(["start", "wk-smoke.service"])?;
    eprintln!(
        "systemctl --user start wk-smoke.service returned after {:?}",
        t.elapsed()
    );
    let p = um.show(
        "wk-smoke.service",
        &["ActiveState", "SubState", "StatusText"],
    );
    ensure!(p["ActiveState"] == "active", "ActiveState: {p:?}");
    ensure!(p["SubState"] == "running", "SubState: {p:?}");
    ensure!(p["StatusText"] == "smoke-ok", "StatusText: {p:?}");

    um.systemctl_ok(["stop", "wk-smoke.service"])?;
    let p = um.show("wk-smoke.service", &["ActiveState", "Result"]);
    ensure!(p["ActiveState"] == "inactive", "after stop: {p:?}");

    // WatchdogSec=2 and no WATCHDOG=1: killed with Result=watchdog, Restart=no keeps it
    // failed.
    um.install_unit("wk-watchdog.service", WATCHDOG_UNIT)?;
    let t = Instant::now();
    um.systemctl_ok(["start", "wk-watchdog.service"])?;
    let p = um.show("wk-watchdog.service", &["ActiveState", "WatchdogUSec"]);
    ensure!(
        p["ActiveState"] == "active",
        "watchdog unit after start: {p:?}"
    );
    ensure!(p["WatchdogUSec"] == "2s", "WatchdogUSec: {p:?}");
    um.wait_for(
        "wk-watchdog.service",
        "ActiveState",
        "failed",
        Duration::from_secs(6),
    )?;
    let took = t.elapsed();
    let p = um.show(
        "wk-watchdog.service",
        &["ActiveState", "Result", "NRestarts"],
    );
    ensure!(p["Result"] == "watchdog", "watchdog unit: {p:?}");
    ensure!(p["NRestarts"] == "0", "watchdog unit restarted: {p:?}");
    ensure!(
        took >= Duration::from_millis(1900),
        "failed too early ({took:?}): {p:?}"
    );
    eprintln!("watchdog unit failed with Result=watchdog {took:?} after start");

    let journal = um.journal("wk-watchdog.service");
    ensure!(
        journal.contains("Watchdog timeout"),
        "journal of wk-watchdog.service:\n{journal}"
    );

    let t = Instant::now();
    um.stop()?;
    eprintln!("manager stopped in {:?}", t.elapsed());
    Ok(())
}
