//! A job that outlives the stop bound: the service gives up waiting and exits non-zero, naming
//! the bound and the unfinished tasks; a bound too large for the clock means no bound.

mod common;

use common::{DEADLINE, Service};
use rustix::process::Signal;
use watchkeeper_testkit::FakeManager;

#[test]
fn stop_past_the_bound_fails_with_a_clear_error() {
    let manager = FakeManager::start().unwrap();
    let service = Service::start(
        &manager,
        "04_graceful_stop",
        &[
            "--jobs",
            "2",
            "--job-ms",
            "60000",
            "--stop-timeout-ms",
            "300",
        ],
        None,
        &[],
    );
    manager.wait_ready(DEADLINE).unwrap();
    service.signal(Signal::TERM);
    let (status, stderr) = service.wait();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "graceful stop did not finish within 300ms: 2 task(s) still running: 'job-0', 'job-1'"
        ),
        "{stderr}"
    );
    manager.wait_stopping(DEADLINE).unwrap();
    manager.check_stopped_cleanly().unwrap();
}

/// `stop_timeout(Duration::MAX)` is "no bound", not an overflow at SIGTERM.
#[test]
fn a_stop_bound_beyond_the_clock_means_no_bound() {
    let manager = FakeManager::start().unwrap();
    let service = Service::start(
        &manager,
        "04_graceful_stop",
        &[
            "--jobs",
            "1",
            "--job-ms",
            "100",
            "--stop-timeout-ms",
            "none",
        ],
        None,
        &[],
    );
    manager.wait_ready(DEADLINE).unwrap();
    service.signal(Signal::TERM);
    let (status, stderr) = service.wait();
    assert!(status.success(), "{status}\n{stderr}");
    assert!(stderr.contains("stopped gracefully"), "{stderr}");
    let extend = manager
        .wait_for("EXTEND_TIMEOUT_USEC=", DEADLINE, |r| {
            r.get("EXTEND_TIMEOUT_USEC").is_some()
        })
        .unwrap();
    // The longest extension systemd takes (u64::MAX is its infinity).
    assert_eq!(
        extend.get("EXTEND_TIMEOUT_USEC"),
        Some(&*(u64::MAX - 1).to_string())
    );
    manager.check_stopped_cleanly().unwrap();
}
