//! A poll loop that hangs stops the watchdog pings (and its heartbeat), while a healthy one pings
//! at half the timeout. The hung case is what systemd's watchdog then kills.

mod common;

use std::time::Duration;

use common::{DEADLINE, Service};
use rustix::process::Signal;
use watchkeeper::heartbeat::{DEFAULT_MAX_AGE, check_heartbeat};
use watchkeeper_testkit::FakeManager;

#[test]
fn hung_loop_withholds_pings_and_freezes_the_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let hb = dir.path().join("state/heartbeat.json");
    let manager = FakeManager::start().unwrap();
    let watchdog = Duration::from_secs(1);
    let service = Service::start(
        &manager,
        "02_poll_loop",
        &[
            "--hang-after",
            "5",
            "--interval-ms",
            "50",
            "--heartbeat",
            hb.to_str().unwrap(),
        ],
        Some(watchdog),
        &[],
    );
    manager.wait_ready(DEADLINE).unwrap();
    let stalled = manager
        .wait_for("STATUS=stalled", DEADLINE, |r| {
            r.get("STATUS")
                .is_some_and(|s| s.starts_with("stalled: no progress in 'poll'"))
        })
        .unwrap();
    let before = check_heartbeat(&hb, DEFAULT_MAX_AGE).unwrap();
    let frozen = before.heartbeat.clone().unwrap();
    assert_eq!(frozen.counter("cycle_count"), 5);
    assert_eq!(frozen.pid, service.pid);

    // A whole watchdog timeout without a ping: systemd would fire now.
    manager.expect_no_ping(watchdog).unwrap();
    let after = check_heartbeat(&hb, DEFAULT_MAX_AGE).unwrap();
    assert_eq!(
        after.heartbeat.unwrap(),
        frozen,
        "heartbeat must not advance"
    );
    assert!(
        manager.records()[stalled.seq..]
            .iter()
            .all(|r| !r.is_ping())
    );

    // What systemd does on a watchdog timeout.
    service.signal(Signal::ABORT);
    let (status, _) = service.wait();
    assert!(!status.success());
}

#[test]
fn healthy_loop_pings_at_half_the_timeout() {
    let manager = FakeManager::start().unwrap();
    let watchdog = Duration::from_secs(2);
    let service = Service::start(
        &manager,
        "02_poll_loop",
        &["--interval-ms", "50"],
        Some(watchdog),
        &[],
    );
    manager.wait_ready(DEADLINE).unwrap();
    let mut seen = 0;
    for _ in 0..4 {
        seen = manager.wait_ping_since(seen, DEADLINE).unwrap().seq + 1;
    }
    // Protocol check, not a timing goal: gaps of 1 s, with a wide margin for a loaded machine.
    manager
        .check_ping_cadence(watchdog, Duration::from_millis(600), 4)
        .unwrap();
    service.signal(Signal::TERM);
    let (status, stderr) = service.wait();
    assert!(status.success(), "{status}\n{stderr}");
    manager.wait_stopping(DEADLINE).unwrap();
    manager.check_stopped_cleanly().unwrap();
}
