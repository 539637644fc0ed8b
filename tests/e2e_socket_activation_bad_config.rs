//! End to end, under a real `systemd --user`: the shipped `watchkeeper-daemon.socket` with a
//! broken `daemon.toml`. The daemon must not be started again and again until the socket unit
//! fails (`service-start-limit-hit`) and clients see `ENOENT`: it starts once, stays up, and
//! every client gets the configuration error; stopped, it exits 6 and the socket keeps
//! listening.

mod support;

use std::time::Duration;

use anyhow::{Result, ensure};
use support::wk::{DAEMON, SOCKET, Wk};

const DEADLINE: Duration = Duration::from_secs(20);

#[test]
fn a_broken_config_under_socket_activation_is_reported_to_every_client_without_a_restart_loop()
-> Result<()> {
    let Some(wk) = Wk::start(Some("max_attempts = 0\n"), None)? else {
        return Ok(());
    };
    wk.systemctl_ok(["start", SOCKET])?;
    for _ in 0..8 {
        let e = wk.wk_jobs(&["ping"]).unwrap_err().to_string();
        ensure!(
            e.contains("unavailable: configuration error: ")
                && e.contains("max_attempts = 0 is invalid"),
            "wk-jobs ping: {e}"
        );
    }
    wk.wait_for(DAEMON, "ActiveState", "active", DEADLINE)?;
    let p = wk.show(DAEMON, &["StatusText", "NRestarts"]);
    ensure!(
        p["StatusText"].starts_with("configuration error: "),
        "{DAEMON}: {p:?}"
    );
    let s = wk.show(SOCKET, &["ActiveState", "SubState", "Result"]);
    ensure!(
        s["ActiveState"] == "active" && s["Result"] == "success",
        "{SOCKET} after 8 clients: {s:?}"
    );
    wk.systemctl_ok(["stop", DAEMON])?;
    let p = wk.show(DAEMON, &["ExecMainStatus", "Result", "ActiveState"]);
    ensure!(p["ExecMainStatus"] == "6", "{DAEMON} after stop: {p:?}");
    let s = wk.show(SOCKET, &["ActiveState", "SubState"]);
    ensure!(
        s["ActiveState"] == "active" && s["SubState"] == "listening",
        "{SOCKET} after the daemon stopped: {s:?}"
    );
    Ok(())
}
