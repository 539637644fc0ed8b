//! Malformed supervision variables end the service with an error naming the variable, as
//! sd_watchdog_enabled() would refuse them; a WATCHDOG_PID of another process turns the
//! watchdog off for us.

mod common;

use std::time::Duration;

use common::{DEADLINE, Service};
use rustix::process::Signal;
use watchkeeper_testkit::FakeManager;

fn fails_naming(env: &[(&str, &str)], var: &str) {
    let manager = FakeManager::start().unwrap();
    let service = Service::start(&manager, "02_poll_loop", &[], None, env);
    let (status, stderr) = service.wait();
    assert_eq!(status.code(), Some(1), "{env:?}: {stderr}");
    assert!(stderr.contains(var), "{env:?}: {stderr}");
    // A marker from the test itself: once it is recorded, anything the child sent is too.
    let marker = watchkeeper::Notifier::from_env(&manager.env()).unwrap();
    marker
        .notify(&[watchkeeper::Notification::custom("X_MARK", "end").unwrap()])
        .unwrap();
    let end = manager
        .wait_for("marker", DEADLINE, |r| r.get("X_MARK") == Some("end"))
        .unwrap();
    assert_eq!(end.seq, 0, "nothing may be sent: {:?}", manager.records());
}

#[test]
fn watchdog_usec_zero_is_refused() {
    fails_naming(&[("WATCHDOG_USEC", "0")], "invalid WATCHDOG_USEC=\"0\"");
}

#[test]
fn watchdog_usec_garbage_is_refused() {
    fails_naming(&[("WATCHDOG_USEC", "2s")], "invalid WATCHDOG_USEC=\"2s\"");
}

#[test]
fn malformed_watchdog_pid_is_refused() {
    fails_naming(
        &[("WATCHDOG_USEC", "1000000"), ("WATCHDOG_PID", "12ab")],
        "invalid WATCHDOG_PID=\"12ab\"",
    );
}

#[test]
fn relative_notify_socket_is_refused() {
    let service =
        std::process::Command::new(watchkeeper_testkit::example_path("02_poll_loop").unwrap())
            .env("NOTIFY_SOCKET", "run/notify")
            .output()
            .unwrap();
    assert_eq!(service.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&service.stderr);
    assert!(
        stderr.contains("invalid NOTIFY_SOCKET=\"run/notify\""),
        "{stderr}"
    );
}

#[test]
fn watchdog_pid_of_another_process_disables_pings() {
    let manager = FakeManager::start().unwrap();
    let watchdog = Duration::from_millis(200);
    let service = Service::start(
        &manager,
        "02_poll_loop",
        &["--interval-ms", "20"],
        Some(watchdog),
        &[("WATCHDOG_PID", "1")],
    );
    manager.wait_ready(DEADLINE).unwrap();
    // Five would-be ping windows.
    manager.expect_no_ping(watchdog * 5 / 2).unwrap();
    service.signal(Signal::TERM);
    let (status, stderr) = service.wait();
    assert!(status.success(), "{stderr}");
}
