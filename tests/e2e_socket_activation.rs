//! End to end, under a real `systemd --user`: the shipped `watchkeeper-daemon.socket` starts
//! the daemon on the first connection, and the daemon answers on the passed fd.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use support::wk::{DAEMON, SOCKET, Wk};

const DEADLINE: Duration = Duration::from_secs(20);

#[test]
fn the_socket_starts_the_daemon_on_first_connect() -> Result<()> {
    let Some(wk) = Wk::start(None, None)? else {
        return Ok(());
    };

    wk.systemctl_ok(["start", SOCKET])?;
    let p = wk.show(SOCKET, &["ActiveState", "SubState", "Listen"]);
    ensure!(
        p["ActiveState"] == "active" && p["SubState"] == "listening",
        "{SOCKET}: {p:?}"
    );
    ensure!(
        p["Listen"] == format!("{} (Stream)", wk.socket_path()),
        "{SOCKET} Listen: {p:?}"
    );
    // The socket file exists with the shipped mode, the service has not been started.
    let ls = wk.run("stat", ["-c", "%a %F %U", &wk.socket_path()]);
    let ls = String::from_utf8_lossy(&ls.stdout);
    ensure!(
        ls.trim() == format!("600 socket {}", wk.user_name()),
        "socket file: {ls}"
    );
    let p = wk.show(DAEMON, &["ActiveState", "MainPID"]);
    ensure!(
        p["ActiveState"] == "inactive" && p["MainPID"] == "0",
        "{DAEMON} before any connection: {p:?}"
    );

    // First connection: systemd starts the daemon, which answers on the queued connection.
    let t = Instant::now();
    let pong = wk.wk_jobs(&["ping"])?;
    let took = t.elapsed();
    eprintln!("wk-jobs ping answered {pong:?} after {took:?}");
    ensure!(pong.contains(env!("CARGO_PKG_VERSION")), "ping: {pong:?}");
    wk.wait_for(DAEMON, "ActiveState", "active", DEADLINE)?;
    let p = wk.assert_running(DAEMON)?;
    ensure!(p["StatusText"].starts_with("queued 0"), "{p:?}");
    let p = wk.show(DAEMON, &["TriggeredBy"]);
    ensure!(p["TriggeredBy"].contains(SOCKET), "{p:?}");
    let j = wk.wait_journal(DAEMON, "ready;", DEADLINE)?;
    ensure!(
        support::wk::field(&j, "F_SOCKET") == "the socket-activated fd",
        "the daemon did not use the activated fd: {j}"
    );
    // The socket stays with systemd: the daemon keeps serving on it.
    let stats = wk.stats()?;
    ensure!(stats["queued"] == 0, "{stats:?}");
    let p = wk.show(SOCKET, &["ActiveState", "SubState", "NAccepted"]);
    ensure!(
        p["SubState"] == "running",
        "{SOCKET} after activation: {p:?}"
    );
    Ok(())
}
