//! The two binaries together: `wk-notify-script` under `FakeManager` and under
//! `wk-fake-manager`. (Also makes `cargo test` build both, for the workspace's conformance
//! suite.)

use std::process::Command;
use std::time::Duration;

use watchkeeper_testkit::{ActiveState, FakeManager, UnitConfig, UnitResult};

const SCRIPT: &str = env!("CARGO_BIN_EXE_wk-notify-script");
const FAKE: &str = env!("CARGO_BIN_EXE_wk-fake-manager");

#[test]
fn a_scripted_service_is_supervised_and_its_status_arrives() {
    let manager =
        FakeManager::start_unit(UnitConfig::new().watchdog(Duration::from_secs(5))).unwrap();
    let mut cmd = manager.command(SCRIPT, Some(Duration::from_secs(5)));
    cmd.args([
        "STATUS=up\\nREADY=1",
        "reloading",
        "READY=1",
        "STOPPING=1",
        "exit:0",
    ]);
    let mut child = manager.spawn(&mut cmd).unwrap();
    let status = manager.wait_result(Duration::from_secs(10)).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(status.result, UnitResult::Success);
    assert_eq!(status.active_state, ActiveState::Inactive);
    assert_eq!(status.status_text.as_deref(), Some("up"));
    manager.check_stopped_cleanly().unwrap();
    // One main process per manager.
    let e = manager.spawn(&mut Command::new("true")).unwrap_err();
    assert!(e.to_string().contains("already supervises"), "{e}");
}

#[test]
fn a_spawned_child_gets_the_watchdogs_sigabrt_and_a_stop_request_its_sigterm() {
    use std::os::unix::process::ExitStatusExt as _;
    let watchdog = Duration::from_millis(300);
    let manager = FakeManager::start_unit(UnitConfig::new().watchdog(watchdog)).unwrap();
    let mut cmd = manager.command(SCRIPT, Some(watchdog));
    cmd.args(["WATCHDOG=1", "hang"]);
    let mut child = manager.spawn(&mut cmd).unwrap();
    let status = manager.wait_result(Duration::from_secs(10)).unwrap();
    assert_eq!(status.result, UnitResult::Watchdog);
    assert_eq!(status.active_state, ActiveState::Failed);
    assert_eq!(child.wait().unwrap().signal(), Some(6));
    assert_eq!(manager.signals().len(), 1, "{:?}", manager.unit_events());

    let manager = FakeManager::start_unit(UnitConfig::new()).unwrap();
    let mut cmd = manager.command(SCRIPT, None);
    cmd.args(["READY=1", "hang"]);
    let mut child = manager.spawn(&mut cmd).unwrap();
    manager.wait_ready(Duration::from_secs(5)).unwrap();
    manager.stop_unit();
    let status = manager.wait_result(Duration::from_secs(10)).unwrap();
    // Death by SIGTERM is a clean exit for a daemon.
    assert_eq!(status.result, UnitResult::Success);
    assert_eq!(child.wait().unwrap().signal(), Some(15));
}

#[test]
fn wk_fake_manager_exits_with_the_result_and_a_bad_script_is_named() {
    let out = Command::new(FAKE)
        .args(["--watchdog-sec", "0", "--", SCRIPT, "READY=1", "exit:3"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(stdout.contains("result: exit-code"), "{stdout}");

    let out = Command::new(SCRIPT).arg("bogus").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"bogus\""));
}
