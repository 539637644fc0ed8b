//! SIGTERM → STOPPING=1, EXTEND_TIMEOUT_USEC= while the in-flight jobs finish, exit 0; and
//! SIGTERM during the start is a clean stop too.

mod common;

use common::{DEADLINE, Service};
use rustix::process::Signal;
use watchkeeper_testkit::FakeManager;

#[test]
fn sigterm_stops_gracefully_within_the_bound() {
    let manager = FakeManager::start().unwrap();
    let service = Service::start(
        &manager,
        "04_graceful_stop",
        &[
            "--jobs",
            "2",
            "--job-ms",
            "300",
            "--stop-timeout-ms",
            "10000",
        ],
        None,
        &[],
    );
    let ready = manager.wait_ready(DEADLINE).unwrap();
    assert_eq!(ready.get("STATUS"), Some("2 workers busy"));
    assert_eq!(ready.pid, Some(service.pid));

    service.signal(Signal::TERM);
    let (status, stderr) = service.wait();
    assert!(status.success(), "{status}\n{stderr}");
    assert!(stderr.contains("stopped gracefully"), "{stderr}");
    assert_eq!(
        stderr.matches("done").count(),
        2,
        "both jobs finished: {stderr}"
    );

    // The child has exited; wait until its last messages are recorded too.
    manager
        .wait_for("EXTEND_TIMEOUT_USEC=", DEADLINE, |r| {
            r.get("EXTEND_TIMEOUT_USEC").is_some()
        })
        .unwrap();
    let records = manager.records();
    let stopping = records.iter().position(|r| r.has("STOPPING", "1")).unwrap();
    let extend: Vec<u64> = records[stopping..]
        .iter()
        .filter_map(|r| r.get("EXTEND_TIMEOUT_USEC"))
        .map(|v| v.parse().unwrap())
        .collect();
    assert!(!extend.is_empty(), "no EXTEND_TIMEOUT_USEC while stopping");
    // Our bound (10 s) plus the 1 s margin, at most.
    assert!(extend.iter().all(|&u| u <= 11_000_000), "{extend:?}");
    manager.wait_stopping(DEADLINE).unwrap();
    manager.check_stopped_cleanly().unwrap();
}

/// SIGTERM before READY=1: the start is cut short and the exit is clean (exit 0), as systemd
/// expects from a unit stopped while it was activating; nothing claims readiness.
#[test]
fn sigterm_during_the_start_is_a_clean_stop() {
    let manager = FakeManager::start().unwrap();
    let service = Service::start(
        &manager,
        "01_ready_status",
        &["--start-secs", "30"],
        None,
        &[],
    );
    // The signal handlers are installed before the first warm-up status.
    manager
        .wait_for("the first warm-up step", DEADLINE, |r| {
            r.get("STATUS") == Some("warming up: step 1 of 30")
        })
        .unwrap();
    service.signal(Signal::TERM);
    let (status, stderr) = service.wait();
    assert!(status.success(), "{status}\n{stderr}");
    manager.wait_stopping(DEADLINE).unwrap();
    assert!(
        !manager.records().iter().any(|r| r.has("READY", "1")),
        "READY=1 after the stop began"
    );
    manager.check_stopped_cleanly().unwrap();
}
