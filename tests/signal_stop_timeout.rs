//! A job that outlives the stop bound: the service gives up waiting and exits non-zero, naming
//! the bound and the unfinished task count.

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
        stderr.contains("graceful stop did not finish within 300ms: 2 task(s) still running"),
        "{stderr}"
    );
    manager.wait_stopping(DEADLINE).unwrap();
    manager.check_stopped_cleanly().unwrap();
}
