//! `BlockingService` in a real child process (`examples/06_blocking`, no async runtime in its
//! code) under the fake manager's real notify socket: `READY=1`, progress-gated pings, a
//! `SIGHUP` reload, a hung loop that withholds the pings, and `SIGTERM` → `STOPPING=1`, exit 0.

mod common;

use std::time::Duration;

use common::{DEADLINE, Service};
use rustix::process::Signal;
use watchkeeper_testkit::FakeManager;

#[test]
fn a_blocking_service_pings_reloads_and_stops_cleanly() {
    let manager = FakeManager::start().unwrap();
    let watchdog = Duration::from_secs(1);
    let service = Service::start(
        &manager,
        "06_blocking",
        &["--interval-ms", "50"],
        Some(watchdog),
        &[],
    );
    let ready = manager.wait_ready(DEADLINE).unwrap();
    assert_eq!(ready.get("STATUS"), Some("working"));
    let mut seen = ready.seq;
    for _ in 0..3 {
        seen = manager.wait_ping_since(seen + 1, DEADLINE).unwrap().seq;
    }
    // No ping before READY=1.
    assert!(manager.records()[..ready.seq].iter().all(|r| !r.is_ping()));

    let since = manager.len();
    service.signal(Signal::HUP);
    let reloading = manager
        .wait_for_since(since, "RELOADING=1", DEADLINE, |r| r.has("RELOADING", "1"))
        .unwrap();
    assert!(reloading.get("MONOTONIC_USEC").is_some());
    manager
        .wait_for_since(reloading.seq, "READY=1", DEADLINE, |r| r.has("READY", "1"))
        .unwrap();

    service.signal(Signal::TERM);
    let (status, stderr) = service.wait();
    assert!(status.success(), "{status}\n{stderr}");
    manager.wait_stopping(DEADLINE).unwrap();
    manager.check_stopped_cleanly().unwrap();
}

#[test]
fn a_hung_blocking_loop_withholds_the_pings() {
    let manager = FakeManager::start().unwrap();
    let watchdog = Duration::from_secs(1);
    let service = Service::start(
        &manager,
        "06_blocking",
        &["--interval-ms", "50", "--hang-after", "5"],
        Some(watchdog),
        &[],
    );
    manager.wait_ready(DEADLINE).unwrap();
    let stalled = manager
        .wait_for("STATUS=stalled", DEADLINE, |r| {
            r.get("STATUS")
                .is_some_and(|s| s.starts_with("stalled: no progress in 'work'"))
        })
        .unwrap();
    // A whole watchdog timeout without a ping: systemd would fire now.
    manager.expect_no_ping(watchdog).unwrap();
    assert!(
        manager.records()[stalled.seq..]
            .iter()
            .all(|r| !r.is_ping())
    );
    service.signal(Signal::KILL);
    let (status, _) = service.wait();
    assert!(!status.success());
}
