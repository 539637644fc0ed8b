//! SIGHUP → RELOADING=1 with MONOTONIC_USEC=, the reload, READY=1; a failed reload keeps the
//! old configuration, says so in STATUS= and still ends with READY=1.

mod common;

use common::{DEADLINE, Service};
use rustix::process::Signal;
use watchkeeper_testkit::FakeManager;

#[test]
fn sighup_reloads_and_a_bad_config_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("greeting");
    std::fs::write(&config, "hello\n").unwrap();
    let manager = FakeManager::start().unwrap();
    let service = Service::start(
        &manager,
        "03_reload",
        &["--config", config.to_str().unwrap()],
        None,
        &[],
    );
    let ready = manager.wait_ready(DEADLINE).unwrap();
    assert_eq!(ready.get("STATUS"), Some("config: hello"));

    // A good reload.
    std::fs::write(&config, "bonjour\n").unwrap();
    let since = manager.len();
    service.signal(Signal::HUP);
    let reloading = manager
        .wait_for_since(since, "RELOADING=1", DEADLINE, |r| r.has("RELOADING", "1"))
        .unwrap();
    let usec: u64 = reloading.get("MONOTONIC_USEC").unwrap().parse().unwrap();
    assert!(usec > 0);
    manager
        .wait_for_since(reloading.seq, "READY=1", DEADLINE, |r| r.has("READY", "1"))
        .unwrap();
    let status = manager
        .wait_for_since(since, "new status", DEADLINE, |r| {
            r.get("STATUS") == Some("config: bonjour")
        })
        .unwrap();
    assert!(status.seq > reloading.seq);

    // A failed reload.
    std::fs::write(&config, "").unwrap();
    let since = manager.len();
    service.signal(Signal::HUP);
    let failed = manager
        .wait_for_since(since, "READY=1 after a failed reload", DEADLINE, |r| {
            r.has("READY", "1")
        })
        .unwrap();
    let status = failed.get("STATUS").unwrap();
    assert!(
        status.starts_with("reload failed:") && status.contains("empty configuration"),
        "{status}"
    );

    service.signal(Signal::TERM);
    let (st, stderr) = service.wait();
    assert!(st.success(), "{st}\n{stderr}");
    manager.wait_stopping(DEADLINE).unwrap();
    manager.check_stopped_cleanly().unwrap();
}
