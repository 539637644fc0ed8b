//! The README's testkit snippet, in its order, against `examples/03_reload` (a service that
//! pings, reloads on SIGHUP and stops on SIGTERM): every step of it must hold.

use std::time::Duration;

use watchkeeper_testkit::{ChildExt as _, FakeManager, UnitConfig, UnitResult, wait_exit};

#[test]
fn the_readme_testkit_snippet_works_as_written() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let greeting = dir.path().join("greeting");
    std::fs::write(&greeting, "hello\n")?;
    let my_service_binary = watchkeeper_testkit::example_path("03_reload")?;

    // From here on as in README.md (plus the service's argument).
    let watchdog = Duration::from_secs(2);
    let manager = FakeManager::start_unit(UnitConfig::new().watchdog(watchdog))?;
    let mut command = manager.command(my_service_binary, Some(watchdog));
    command.arg("--config").arg(&greeting);
    let mut child = manager.spawn(&mut command)?;
    manager.wait_ready(Duration::from_secs(5))?;
    manager.wait_pings(3, Duration::from_secs(5))?;
    manager.check_ping_cadence(watchdog, Duration::from_millis(300), 3)?;
    child.hangup()?;
    child.terminate()?;
    let status = manager.wait_result(Duration::from_secs(10))?;
    assert_eq!(
        status.result,
        UnitResult::Success,
        "{:?}",
        manager.unit_events()
    );
    wait_exit(&mut child, Duration::from_secs(1))?;
    manager.check_stopped_cleanly()?;
    Ok(())
}
